"""The Mahalanobis feature score (models.calibration.feature_density) against SciPy's distance,
and its use: shifted features score higher than held-out in-distribution ones."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import mahalanobis

from models.calibration import auroc
from models.calibration.feature_density import FeatureGaussian


def gaussian_classes(rng, n_per_class=200, k=4, d=6):
    means = rng.normal(0.0, 3.0, size=(k, d))
    mix = rng.normal(size=(d, d))
    x = np.concatenate([means[c] + rng.normal(size=(n_per_class, d)) @ mix for c in range(k)])
    return x, np.repeat(np.arange(k), n_per_class), means, mix


def test_score_is_the_squared_distance_to_the_nearest_class_mean():
    rng = np.random.default_rng(0)
    x, y, _, _ = gaussian_classes(rng)
    g = FeatureGaussian.fit(x, y, num_classes=4, ridge=0.0)
    means = np.stack([x[y == c].mean(axis=0) for c in range(4)])
    centred = x - means[y]
    precision = np.linalg.inv(centred.T @ centred / len(x))          # tied maximum-likelihood covariance
    queries = rng.normal(0.0, 4.0, size=(25, x.shape[1]))
    expected = [min(mahalanobis(q, m, precision) ** 2 for m in means) for q in queries]
    np.testing.assert_allclose(g.score(queries), expected, rtol=1e-9)
    np.testing.assert_allclose(g.score(queries, chunk=7), expected, rtol=1e-9)   # chunking changes nothing
    np.testing.assert_allclose(g.whitening @ g.whitening.T, precision, rtol=1e-8)


def test_shifted_features_score_higher_than_held_out_ones():
    rng = np.random.default_rng(1)
    x, y, means, mix = gaussian_classes(rng, n_per_class=400)
    g = FeatureGaussian.fit(x[::2], y[::2], num_classes=4)
    held_out = x[1::2]
    shifted = held_out + rng.normal(size=held_out.shape) @ mix * 1.5   # more spread than training
    s_in, s_out = g.score(held_out), g.score(shifted)
    assert np.all(s_in >= 0) and s_in.mean() == pytest.approx(x.shape[1], rel=0.25)   # ~ chi2(d)
    assert auroc(s_in, s_out) > 0.9


def test_rank_deficient_features_fit_thanks_to_the_ridge():
    rng = np.random.default_rng(2)
    x, y, _, _ = gaussian_classes(rng)
    x = np.concatenate([x, np.zeros((len(x), 2))], axis=1)             # dead ReLU units
    g = FeatureGaussian.fit(x, y, num_classes=4)
    assert np.all(np.isfinite(g.score(x)))
    with pytest.raises(np.linalg.LinAlgError):
        FeatureGaussian.fit(x, y, num_classes=4, ridge=0.0)


@pytest.mark.parametrize("labels, fragment", [
    (np.array([0, 0, 1, 1, 2]), "at least 2 images"),        # class 2 has one image, class 3 none
    (np.array([0, 1, 2, 3]), "one label each"),              # 4 labels for 5 rows
])
def test_bad_fits_are_refused(labels, fragment):
    with pytest.raises(ValueError, match=fragment):
        FeatureGaussian.fit(np.ones((5, 3)), labels, num_classes=4)
