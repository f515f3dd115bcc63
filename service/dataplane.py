"""Domain logic: predict and evaluate on NumPy arrays. No HTTP, no parsing.

MC dropout reuses the deterministic pass's backbone features: the backbone runs once per image
and only the cheap head is sampled T times (`SplitClassifier.mc_logits_from_features`), in
chunks of at most `mc_chunk_rows` = T x images so memory stays bounded for any T and batch.
The backbone may also have run earlier, on several requests' images at once (`service.batching`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from models.calibration import (
    CalibrationMetrics,
    TemperatureFitError,
    compute_metrics,
    fit_temperature,
    reliability_diagram_png,
    softmax,
)
from models.calibration.risk_coverage_diagram import risk_coverage_png
from models.calibration.selective import SelectiveReport, confidence_and_correct, selective_report
from models.calibration.ood import (
    FLAG_SCORE,
    SCORES as OOD_SCORES,
    Detection,
    detection,
    ood_threshold_problem,
    uncertainty_scores,
)
from models.calibration.ood_diagram import score_histograms_png
from models.calibration.uncertainty import MCSummary
from service.inputs import InputError
from service.registry import LoadedModel

_SEED_MOD = 2**31 - 1


class WorkCancelled(Exception):
    """Long model work (evaluate, compare) gave up between two chunks because its `stop` event
    was set: the server is stopping and its graceful timeout is over. A thread cannot be killed,
    so this is how a 10,000-image evaluation ends within one chunk instead of running on."""


def _check(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise WorkCancelled("the model work was cancelled")


@dataclass(frozen=True)
class Prediction:
    """Arrays over the batch; `mc` is None when no MC samples were asked for."""

    logits: np.ndarray         # [N, K] uncalibrated
    probabilities: np.ndarray  # [N, K] softmax(logits / T)
    uncalibrated: np.ndarray   # [N, K] softmax(logits)
    mc: MCSummary | None
    seed: int | None


@dataclass(frozen=True)
class SelectiveEvaluation:
    """Selective prediction on the calibrated probabilities (the model's T, the confidence that
    predict returns, so a threshold found here applies there), with the per-image confidence
    and correctness the risk-coverage PNG is drawn from."""

    report: SelectiveReport
    confidence: np.ndarray
    correct: np.ndarray


@dataclass(frozen=True)
class Evaluation:
    n: int
    n_bins: int
    temperature: float
    before: CalibrationMetrics
    after: CalibrationMetrics
    fitted_temperature: float | None
    after_fitted: CalibrationMetrics | None
    selective: SelectiveEvaluation | None = None


def predict(model: LoadedModel, x: np.ndarray, *, mc_samples: int, seed: int | None,
            mc_chunk_rows: int = 65_536, batch_size: int = 500,
            features: np.ndarray | None = None, logits: np.ndarray | None = None) -> Prediction:
    """`features` (and `logits`, the deterministic head on them): the backbone's output for `x`
    when already computed; the MC sampling depends only on the features and the seed."""
    clf = model.classifier
    if features is None:
        features = clf.features(x, batch_size)
    elif len(features) != len(x):
        raise ValueError(f"{len(features)} feature rows for {len(x)} images")
    if logits is None:
        logits = clf.head_logits(features)
    elif len(logits) != len(x):
        raise ValueError(f"{len(logits)} logit rows for {len(x)} images")
    return predict_many(model, features, logits, [PredictRequest(0, len(x), mc_samples, seed)], mc_chunk_rows)[0]


@dataclass(frozen=True)
class PredictRequest:
    """One request's rows [start, stop) of a micro-batch, its T (0: no MC dropout) and seed."""

    start: int
    stop: int
    mc_samples: int
    seed: int | None


def predict_many(model: LoadedModel, features: np.ndarray, logits: np.ndarray, requests: list[PredictRequest],
                 mc_chunk_rows: int = 65_536) -> list[Prediction]:
    """The predictions of several requests whose backbone features and deterministic logits were
    computed together (the micro-batcher, `service.batching`). MC dropout is drawn for all of
    them at once where the runtime can (`mc_summaries_from_features`: each request's own seed and
    T, the same numbers as its own call, bit for bit), else request by request; either way a
    request's answer never depends on which other requests shared its batch."""
    clf = model.classifier
    t = model.temperature
    seeds = [None if r.mc_samples <= 0 else (0 if r.seed is None else int(r.seed)) for r in requests]
    sampled = [i for i, r in enumerate(requests) if r.mc_samples > 0]
    summaries: dict[int, MCSummary] = {}
    batched = getattr(clf, "mc_summaries_from_features", None)
    if batched is not None and len(sampled) > 1:
        found = batched(features, [(requests[i].start, requests[i].stop, requests[i].mc_samples, seeds[i])
                                   for i in sampled], t, mc_chunk_rows)
        summaries = dict(zip(sampled, found))
    else:
        for i in sampled:
            r = requests[i]
            summaries[i] = clf.mc_summary_from_features(features[r.start:r.stop], r.mc_samples, seeds[i], t,
                                                        mc_chunk_rows)
    out = []
    for i, r in enumerate(requests):
        z = logits[r.start:r.stop]
        out.append(Prediction(z, softmax(z, t), softmax(z, 1.0), summaries.get(i),
                              seeds[i] if r.mc_samples > 0 else r.seed))
    return out


def logits_in_chunks(model: LoadedModel, x: np.ndarray, chunk: int,
                     stop: threading.Event | None = None) -> np.ndarray:
    """Deterministic logits, `chunk` images per forward pass: activations stay bounded. `stop`
    set: WorkCancelled before the next chunk."""
    parts = []
    for i in range(0, len(x), chunk):
        _check(stop)
        parts.append(model.classifier.logits(x[i:i + chunk], batch_size=chunk))
    return np.concatenate(parts).astype(np.float64)


def evaluate(model: LoadedModel, x: np.ndarray, y: np.ndarray, *, n_bins: int, fit: bool,
             chunk: int = 500, target_accuracy: float | None = None,
             stop: threading.Event | None = None) -> Evaluation:
    logits = logits_in_chunks(model, x, chunk, stop)
    return evaluate_logits(logits, y, temperature=model.temperature, n_bins=n_bins, fit=fit,
                           target_accuracy=target_accuracy)


def evaluate_logits(logits: np.ndarray, y: np.ndarray, *, temperature: float, n_bins: int,
                    fit: bool, target_accuracy: float | None = None) -> Evaluation:
    before = compute_metrics(logits, y, temperature=1.0, n_bins=n_bins)
    after = compute_metrics(logits, y, temperature=temperature, n_bins=n_bins)
    fitted = after_fitted = None
    if fit:
        try:
            fitted = fit_temperature(logits, y)
        except TemperatureFitError as exc:
            raise InputError("temperature_fit_failed", f"cannot fit a temperature on this batch: {exc}") from None
        after_fitted = compute_metrics(logits, y, temperature=fitted, n_bins=n_bins)
    return Evaluation(len(y), n_bins, temperature, before, after, fitted, after_fitted,
                      selective_evaluation(logits, y, temperature=temperature, target_accuracy=target_accuracy))


def selective_evaluation(logits: np.ndarray, y: np.ndarray, *, temperature: float,
                         target_accuracy: float | None = None) -> SelectiveEvaluation:
    probabilities = softmax(logits, temperature)
    confidence, correct = confidence_and_correct(probabilities, y)
    return SelectiveEvaluation(selective_report(probabilities, y, target_accuracy=target_accuracy),
                               confidence, correct)


def diagram_png(evaluation: Evaluation, model_name: str) -> bytes:
    title = (f"{model_name}: N={evaluation.n}, T={evaluation.temperature:.3f}, "
             f"ECE {evaluation.before.ece:.4f} -> {evaluation.after.ece:.4f}")
    return reliability_diagram_png(evaluation.before, evaluation.after, title=title)


def risk_coverage_diagram_png(evaluation: Evaluation, model_name: str) -> bytes:
    sel = evaluation.selective
    if sel is None:
        raise ValueError("this evaluation has no selective-prediction block")
    title = f"{model_name}: N={evaluation.n}, T={evaluation.temperature:.3f}, risk-coverage"
    return risk_coverage_png(sel.confidence, sel.correct, sel.report, title=title)


# --- out-of-distribution flag and batch comparison ---------------------------------------------
@dataclass(frozen=True)
class OODFlags:
    """Per image: the flag score and, when the card has a usable threshold, whether it is above."""

    score: str
    values: np.ndarray          # [N] predictive entropy (nats) of the calibrated probabilities
    threshold: float | None     # None: the card has no (usable) ood_threshold
    flags: np.ndarray | None    # [N] bool, values > threshold; None without a threshold


def ood_threshold(model: LoadedModel) -> dict | None:
    """The card's `ood_threshold` block when it can be used at the model's temperature, else None."""
    block = model.card.get("ood_threshold")
    if block is None or ood_threshold_problem(block, model.temperature) is not None:
        return None
    return block


def ood_flags(model: LoadedModel, probabilities: np.ndarray) -> OODFlags:
    """Flags from the deterministic calibrated probabilities, even when MC samples were drawn:
    the threshold was fitted on those, so only they keep its 95% pass rate on clean images."""
    values = uncertainty_scores(probabilities)[FLAG_SCORE]
    block = ood_threshold(model)
    if block is None:
        return OODFlags(FLAG_SCORE, values, None, None)
    threshold = float(block["threshold"])
    return OODFlags(FLAG_SCORE, values, threshold, values > threshold)


@dataclass(frozen=True)
class Comparison:
    """How well each uncertainty score separates an in-distribution batch from a suspect one."""

    n_in: int
    n_suspect: int
    mc_samples: int
    seed: int | None
    detections: list[Detection]              # one per score, OOD_SCORES order
    scores_in: dict[str, np.ndarray]
    scores_suspect: dict[str, np.ndarray]
    threshold: float | None                  # the card's flag threshold (predictive entropy)
    flagged_in: float | None                 # share of each batch above it
    flagged_suspect: float | None


def batch_scores(model: LoadedModel, x: np.ndarray, *, mc_samples: int, seed: int | None,
                 chunk: int = 500, mc_chunk_rows: int = 65_536,
                 stop: threading.Event | None = None) -> dict[str, np.ndarray]:
    """1 - max probability and predictive entropy of the deterministic calibrated probabilities;
    with `mc_samples` >= 2 also the MC mutual information. `chunk` images per forward pass, so
    features and activations stay bounded for any batch."""
    clf, t = model.classifier, model.temperature
    probs, mi = [], []
    for c, start in enumerate(range(0, len(x), chunk)):
        _check(stop)
        features = clf.features(x[start:start + chunk], chunk)
        probs.append(softmax(clf.head_logits(features), t))
        if mc_samples >= 2:
            chunk_seed = (int(seed or 0) + 7_919 * c) % _SEED_MOD
            mi.append(clf.mc_summary_from_features(features, mc_samples, chunk_seed, t, mc_chunk_rows).mutual_information)
    return uncertainty_scores(np.concatenate(probs), np.concatenate(mi) if mi else None)


def compare(model: LoadedModel, x_in: np.ndarray, x_suspect: np.ndarray, *, mc_samples: int,
            seed: int | None, chunk: int = 500, mc_chunk_rows: int = 65_536,
            stop: threading.Event | None = None) -> Comparison:
    """AUROC / AUPR-Out / FPR@95%TPR per score, the suspect batch as the positive class
    (`models.calibration.ood`). Both batches use the same seed: their MC masks are drawn alike."""
    kw = {"mc_samples": mc_samples, "seed": seed, "chunk": chunk, "mc_chunk_rows": mc_chunk_rows, "stop": stop}
    s_in, s_out = batch_scores(model, x_in, **kw), batch_scores(model, x_suspect, **kw)
    detections = [detection(name, s_in[name], s_out[name]) for name in OOD_SCORES if name in s_in]
    block = ood_threshold(model)
    threshold = flagged_in = flagged_out = None
    if block is not None:
        threshold = float(block["threshold"])
        flagged_in = float(np.mean(s_in[FLAG_SCORE] > threshold))
        flagged_out = float(np.mean(s_out[FLAG_SCORE] > threshold))
    return Comparison(len(x_in), len(x_suspect), mc_samples, seed if mc_samples >= 2 else None, detections,
                      s_in, s_out, threshold, flagged_in, flagged_out)


def comparison_png(comparison: Comparison, model_name: str) -> bytes:
    title = (f"{model_name}: in-distribution N={comparison.n_in} vs suspect N={comparison.n_suspect}"
             + (f", MC T={comparison.mc_samples}" if comparison.mc_samples >= 2 else ""))
    return score_histograms_png(comparison.scores_in, comparison.scores_suspect,
                                {d.score: d for d in comparison.detections},
                                thresholds={FLAG_SCORE: comparison.threshold}, title=title)
