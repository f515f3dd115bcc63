"""The monitoring verdict: a window of served predictions against the reference distribution of the
validation split, and (where labels came back) against the truth. Domain logic on the arrays the
store returns (`service.storage.monitoring_store.WindowRows`); the statistics are
`models.calibration.monitoring`. docs/monitoring.md explains how to read the answer.

The reference is the conformal calibration set the predictions were served with: the card's
(`LoadedModel.conformal`: the validation split's probabilities at the card's temperature) or a
profile's (its own fit images under the profile). Its entropies and predicted classes are what a
window of in-distribution images should look like.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from models.calibration import monitoring as stats
from service.storage.monitoring_store import WindowRows

EXPECTED_OOD_SHARE = 0.05  # the card's threshold lets 95% of clean validation images pass
INTERVAL_LEVEL = 0.95
ECE_BINS = 15


@dataclass(frozen=True)
class Thresholds:
    """The drift and alert settings (CALIB_DRIFT_*, CALIB_ALERT_*)."""

    p_value: float
    psi: float
    min_predictions: int
    alert_ece: float
    alert_min_labelled: int

    @classmethod
    def from_settings(cls, settings) -> "Thresholds":
        return cls(settings.drift_p_value, settings.drift_psi, settings.drift_min_predictions, settings.alert_ece,
                   settings.alert_min_labelled)


@dataclass(frozen=True)
class Reference:
    """What in-distribution looks like: entropies and predicted classes of the validation split."""

    entropy: np.ndarray
    predicted_class: np.ndarray
    num_classes: int
    n: int
    source: str


def reference_of(conformal, source: str) -> Optional[Reference]:
    """The reference of a ConformalCalibration (None when there is none)."""
    if conformal is None:
        return None
    cached = getattr(conformal, "_monitoring_reference", None)
    if cached is not None and cached.source == source:
        return cached
    p = conformal.probabilities
    reference = Reference(stats.entropy(p), p.argmax(axis=1), int(p.shape[1]), int(p.shape[0]), source)
    try:
        conformal._monitoring_reference = reference  # computed once per loaded set
    except AttributeError:
        pass
    return reference


def expected_ood_share(model) -> float:
    """1 - the card's `ood_threshold.tpr` (0.05 for the shipped models)."""
    block = model.card.get("ood_threshold") or {}
    try:
        return float(1.0 - float(block.get("tpr", 1 - EXPECTED_OOD_SHARE)))
    except (TypeError, ValueError):
        return EXPECTED_OOD_SHARE


def _rounded(value: Optional[float]) -> Optional[float]:
    return None if value is None else float(value)


def window_verdict(rows: WindowRows, reference: Optional[Reference], thresholds: Thresholds,
                   expected_ood: float) -> dict:
    """estimated_accuracy, ood, entropy_drift, class_prior_drift and drift of a window."""
    n = len(rows)
    out: dict = {"estimated_accuracy": None, "ood": None, "entropy_drift": None, "class_prior_drift": None}
    p_values: dict[str, Optional[float]] = {"entropy_ks": None, "class_prior_chi2": None, "ood_share": None}
    psi_value = None
    if n:
        estimate = stats.cbpe_accuracy(rows.confidence, INTERVAL_LEVEL)
        out["estimated_accuracy"] = {"value": estimate.value, "interval": [estimate.low, estimate.high],
                                     "level": INTERVAL_LEVEL, "method": "mean calibrated confidence (CBPE)"}
        flagged = rows.ood_flag[rows.ood_flag >= 0]
        if flagged.size:
            k = int(flagged.sum())
            p = stats.ood_share_test(k, int(flagged.size), expected_ood)
            out["ood"] = {"share": k / flagged.size, "flagged": k, "n": int(flagged.size), "expected": expected_ood,
                          "test": "binomial, one-sided (more flags than expected)", "p_value": p}
            p_values["ood_share"] = p
        if reference is not None:
            statistic, p = stats.ks_two_sample(rows.entropy, reference.entropy)
            out["entropy_drift"] = {"test": "ks", "statistic": statistic, "p_value": p,
                                    "window_mean": float(rows.entropy.mean()),
                                    "reference_mean": float(reference.entropy.mean())}
            p_values["entropy_ks"] = p
            shift = stats.class_prior_shift(rows.predicted_class, reference.predicted_class, reference.num_classes)
            out["class_prior_drift"] = {"psi": shift.psi, "chi2": shift.chi2, "dof": shift.dof,
                                        "p_value": shift.p_value}
            p_values["class_prior_chi2"] = shift.p_value
            psi_value = shift.psi
    verdict = stats.drift_verdict(p_values, n=n, p_value=thresholds.p_value, min_predictions=thresholds.min_predictions,
                                  psi_value=psi_value, psi_threshold=thresholds.psi)
    out["drift"] = {"status": verdict.status, "reasons": verdict.reasons, "enough_predictions": verdict.enough,
                    "thresholds": {"p_value": thresholds.p_value, "p_value_per_test": verdict.p_value_per_test,
                                   "tests": verdict.tests, "correction": "bonferroni", "psi": thresholds.psi,
                                   "min_predictions": thresholds.min_predictions}}
    return out


def labelled_block(rows: WindowRows, thresholds: Thresholds) -> tuple[dict, dict]:
    """(`labelled`, `alert`) over the window's labelled predictions."""
    mask = rows.label >= 0
    n = int(mask.sum())
    alert = {"status": False, "ece_threshold": thresholds.alert_ece, "min_labelled": thresholds.alert_min_labelled}
    if n == 0:
        return {"n": 0, "accuracy": None, "ece_15": None, "nll": None, "coverage": None,
                "estimated_accuracy": None, "estimated_minus_observed": None}, alert
    summary = stats.labelled_summary(rows.probabilities[mask], rows.label[mask], ECE_BINS)
    summary["coverage"] = _coverage(rows, mask)
    if n >= thresholds.alert_min_labelled and summary["ece_15"] > thresholds.alert_ece:
        floor = stats.ece_consistency_quantile(rows.probabilities[mask].max(axis=1), ECE_BINS)
        alert["ece_noise_p95"] = floor
        alert["status"] = bool(summary["ece_15"] > floor)
    return summary, alert


def _coverage(rows: WindowRows, labelled: np.ndarray) -> Optional[dict]:
    """Observed coverage of the prediction sets served at the most common requested level."""
    with_sets = labelled & (rows.set_size >= 0)
    if not with_sets.any():
        return None
    levels, counts = np.unique(rows.set_coverage[with_sets], return_counts=True)
    target = float(levels[counts.argmax()])
    at = with_sets & (rows.set_coverage == target)
    return {"target": target, "observed": float(rows.label_in_set[at].mean()), "n": int(at.sum()),
            "mean_set_size": float(rows.set_size[at].mean())}


def report(rows: WindowRows, reference: Optional[Reference], thresholds: Thresholds, expected_ood: float) -> dict:
    """The monitoring answer's figures (without model/window naming, which the route adds)."""
    out = window_verdict(rows, reference, thresholds, expected_ood)
    out["labelled"], out["alert"] = labelled_block(rows, thresholds)
    out["reference"] = None if reference is None else {"source": reference.source, "n": reference.n}
    return out


def timeline(rows: WindowRows, reference: Optional[Reference], thresholds: Thresholds, expected_ood: float,
             bucket: int, buckets: int) -> list[dict]:
    """One point per bucket of `bucket` consecutive predictions (the last `buckets` of them, oldest
    first): each bucket's own estimate, labelled figures, drift verdict and alert."""
    points = []
    for start, stop in stats.split_buckets(len(rows), bucket, buckets):
        part = rows.take(start, stop)
        verdict = window_verdict(part, reference, thresholds, expected_ood)
        labelled, alert = labelled_block(part, thresholds)
        points.append({"end": part.created_at[-1].isoformat(), "predictions": len(part),
                       "estimated_accuracy": verdict["estimated_accuracy"]["value"],
                       "observed_accuracy": labelled["accuracy"], "ece_15": labelled["ece_15"],
                       "labelled": labelled["n"], "drift": verdict["drift"]["status"], "alert": alert["status"]})
    return points
