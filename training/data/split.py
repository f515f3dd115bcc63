"""Deterministic train/validation split."""

from __future__ import annotations

import operator

import numpy as np

__all__ = ["train_validation_split"]


def train_validation_split(
    x: np.ndarray,
    y: np.ndarray,
    *,
    n_validation: int = 5000,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Split ``(x, y)`` into ``(x_train, y_train, x_val, y_val)``.

    A seeded permutation (``np.random.default_rng(seed).permutation(N)``): the
    first ``n_validation`` permuted indices form the validation set, the rest
    the training set, both in permuted (shuffled) order.  Same inputs and seed
    give the same split; the sets are disjoint.  With the 50,000 CIFAR-10
    training images and the default this is the 45,000/5,000 split of Guo et
    al. (2017).  Returns new arrays (the inputs are not modified).

    Raises ValueError if ``len(x) != len(y)`` or ``n_validation`` is not in
    ``[0, N)``.
    """
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim == 0 or y.ndim == 0 or len(x) != len(y):
        raise ValueError(f"x and y must have the same length, got shapes {x.shape} and {y.shape}")
    if isinstance(n_validation, bool):
        raise TypeError("n_validation must be an int")
    n_validation = operator.index(n_validation)
    n = len(x)
    if n_validation < 0 or n_validation >= n:
        raise ValueError(f"n_validation must be in [0, {n}) for {n} examples, got {n_validation}")
    perm = np.random.default_rng(seed).permutation(n)
    val_idx, train_idx = perm[:n_validation], perm[n_validation:]
    return x[train_idx], y[train_idx], x[val_idx], y[val_idx]
