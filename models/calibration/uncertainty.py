"""Summaries of Monte Carlo dropout samples: mean, variance and the entropy decomposition.

Predictive entropy H[E p] splits into expected entropy E H[p] (aleatoric: noise the model sees
in the data) and mutual information H[E p] - E H[p] (epistemic: disagreement between samples),
following Gal (2016) and Depeweg et al. (2018). Entropies are in nats.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .metrics import log_softmax


@dataclass(frozen=True)
class MCSummary:
    """Per-image statistics over T samples of the calibrated softmax (arrays over the batch)."""

    n_samples: int
    mean: np.ndarray               # [B, K] mean probability
    variance: np.ndarray           # [B, K] variance of the probability over samples
    predictive_entropy: np.ndarray # [B]
    expected_entropy: np.ndarray   # [B]
    mutual_information: np.ndarray # [B]


def _entropy_from_log(logp: np.ndarray) -> np.ndarray:
    p = np.exp(logp)
    return -np.sum(np.where(p > 0, p * logp, 0.0), axis=-1)


def summarize_mc_samples(sample_logits: np.ndarray, temperature: float = 1.0) -> MCSummary:
    """`sample_logits` is [T, B, K] uncalibrated logits; the softmax uses logits / temperature."""
    z = np.asarray(sample_logits, dtype=np.float64)
    if z.ndim != 3 or z.shape[0] < 1:
        raise ValueError(f"sample_logits must be [T, B, K] with T >= 1, got shape {z.shape}")
    logp = log_softmax(z, temperature)
    p = np.exp(logp)
    mean = p.mean(axis=0)
    variance = p.var(axis=0)
    with np.errstate(divide="ignore"):
        log_mean = np.log(mean)
    predictive = _entropy_from_log(log_mean)
    expected = _entropy_from_log(logp).mean(axis=0)
    mutual = np.maximum(predictive - expected, 0.0)
    return MCSummary(z.shape[0], mean, variance, predictive, expected, mutual)


# The MC head's seeding, shared by both runtimes (models.inference, models.litert_classifier) so the
# same request seed draws the same dropout masks: the stateless seed pair of layer i is
# (seed + i, MC_SEED_SALT + i), and chunk c of a large batch draws with seed + CHUNK_SEED_STRIDE * c.
MC_SEED_MOD = 2**31 - 1
MC_SEED_SALT = 7919
CHUNK_SEED_STRIDE = 1_000_003


def mc_seed_pair(seed: int) -> tuple[int, int]:
    return int(seed) % MC_SEED_MOD, MC_SEED_SALT


def mc_chunks(n_images: int, n_samples: int, seed: int, chunk_rows: int = 65_536) -> list[tuple[int, int, int]]:
    """(start, stop, seed) of each chunk of at most `chunk_rows` (T x images) rows: chunk c of a
    batch draws its masks with seed + CHUNK_SEED_STRIDE * c."""
    per_chunk = max(1, chunk_rows // n_samples)
    return [(start, min(start + per_chunk, n_images), (seed + CHUNK_SEED_STRIDE * c) % MC_SEED_MOD)
            for c, start in enumerate(range(0, n_images, per_chunk))]


def concat_summaries(parts: list[MCSummary]) -> MCSummary:
    """One summary of consecutive image chunks (the same T)."""
    if len(parts) == 1:
        return parts[0]
    cat = lambda attr: np.concatenate([getattr(p, attr) for p in parts])  # noqa: E731
    return MCSummary(parts[0].n_samples, cat("mean"), cat("variance"), cat("predictive_entropy"),
                     cat("expected_entropy"), cat("mutual_information"))


def chunked_mc_summary(mc_logits_from_features, features: np.ndarray, n_samples: int, seed: int,
                       temperature: float, chunk_rows: int = 65_536) -> MCSummary:
    """`summarize_mc_samples` of `mc_logits_from_features(features_chunk, n_samples, seed_c)` ([T, B, K])
    with at most `chunk_rows` (T x images) rows per call, so memory stays bounded for any batch."""
    return concat_summaries([summarize_mc_samples(mc_logits_from_features(features[start:stop], n_samples, seed_c),
                                                  temperature)
                             for start, stop, seed_c in mc_chunks(len(features), n_samples, seed, chunk_rows)])
