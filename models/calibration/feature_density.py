"""A class-conditional Gaussian on backbone features: the Mahalanobis out-of-distribution score.

Predictive entropy asks the classifier whether it is unsure. A model made robust to corruptions
rightly is not unsure on many corrupted images, so entropy stops telling them from clean ones.
The squared Mahalanobis distance of an image's features to the nearest class mean, under the
covariance shared by the classes (Lee et al. 2018), asks instead whether the features look like
training features at all. Plain NumPy; fit it on training-split features only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class FeatureGaussian:
    """Class means and the whitening matrix W (W @ W.T = inverse of the shared covariance)."""

    means: np.ndarray       # [K, D]
    whitening: np.ndarray   # [D, D]

    @classmethod
    def fit(cls, features, labels, num_classes: int, ridge: float = 1e-6) -> "FeatureGaussian":
        """Maximum-likelihood means and tied covariance; `ridge` (relative to the mean variance)
        keeps the covariance invertible when features are rank-deficient (e.g. after ReLU)."""
        f = np.asarray(features, np.float64)
        y = np.asarray(labels).reshape(-1)
        if f.ndim != 2 or len(f) != len(y):
            raise ValueError(f"features must be [N, D] with one label each, got {f.shape} and {y.shape}")
        counts = np.bincount(y, minlength=num_classes)
        if len(counts) != num_classes or np.any(counts < 2):
            raise ValueError(f"every class needs at least 2 images, got counts {counts.tolist()}")
        means = np.stack([f[y == k].mean(axis=0) for k in range(num_classes)])
        centred = f - means[y]
        cov = centred.T @ centred / len(f)
        cov += ridge * max(float(np.trace(cov)) / len(cov), 1e-12) * np.eye(len(cov))
        # inv(cov) = inv(L).T @ inv(L) for cov = L @ L.T: whitened features are inv(L) @ f.
        inv_chol = np.linalg.inv(np.linalg.cholesky(cov))
        return cls(means=means, whitening=inv_chol.T)

    def score(self, features, chunk: int = 4096) -> np.ndarray:
        """Squared Mahalanobis distance to the nearest class mean, [N]: higher = more OOD."""
        f = np.asarray(features, np.float64)
        w_means = self.means @ self.whitening                       # [K, D] whitened means
        m_sq = np.sum(w_means ** 2, axis=1)
        out = np.empty(len(f))
        for i in range(0, len(f), chunk):
            z = f[i:i + chunk] @ self.whitening
            d2 = np.sum(z ** 2, axis=1, keepdims=True) - 2.0 * z @ w_means.T + m_sq
            out[i:i + chunk] = np.maximum(d2.min(axis=1), 0.0)
        return out
