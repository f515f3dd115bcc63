"""Patch-whitening filters for the first convolution (airbench's stem), in plain NumPy.

The filters are the eigenvectors of the (uncentred) covariance of k x k image patches, scaled
by 1/sqrt(eigenvalue + eps), and stacked with their negatives so that a ReLU/GELU after them
keeps both signs. A network whose first layer whitens patches does not have to learn that
decorrelation itself, which saves epochs when the training budget is a few minutes of CPU.
"""

from __future__ import annotations

import numpy as np


def image_patches(images: np.ndarray, kernel_size: int) -> np.ndarray:
    """[N,H,W,C] -> [N*(H-k+1)*(W-k+1), k*k*C], each row one patch flattened as (ky, kx, c).

    The (ky, kx, c) order is the memory order of a Keras conv kernel [k, k, C, out].
    """
    if images.ndim != 4:
        raise ValueError(f"images must be [N,H,W,C], got shape {images.shape}")
    windows = np.lib.stride_tricks.sliding_window_view(images, (kernel_size, kernel_size), axis=(1, 2))
    # windows: [N, H-k+1, W-k+1, C, ky, kx] -> [..., ky, kx, C]
    windows = np.moveaxis(windows, 3, -1)
    return windows.reshape(-1, kernel_size * kernel_size * images.shape[-1])


def patch_whitening_kernel(images: np.ndarray, kernel_size: int = 2, eps: float = 5e-4) -> np.ndarray:
    """Conv kernel [k, k, C, 2*k*k*C] whitening k x k patches of normalised `images`.

    Filters come in order of decreasing eigenvalue, first the +eigenvectors then the negatives.
    """
    patches = image_patches(np.asarray(images, dtype=np.float32), kernel_size).astype(np.float64)
    if len(patches) < patches.shape[1]:
        raise ValueError(f"need at least {patches.shape[1]} patches to whiten, got {len(patches)}")
    covariance = patches.T @ patches / len(patches)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)          # ascending
    eigenvalues, eigenvectors = eigenvalues[::-1], eigenvectors[:, ::-1]
    scaled = eigenvectors / np.sqrt(np.maximum(eigenvalues, 0.0) + eps)  # columns are filters
    filters = np.concatenate([scaled, -scaled], axis=1)
    channels = images.shape[-1]
    return filters.reshape(kernel_size, kernel_size, channels, -1).astype(np.float32)
