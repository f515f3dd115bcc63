"""Domain logic: predict and evaluate on NumPy arrays. No HTTP, no parsing.

MC dropout reuses the deterministic pass's backbone features: the backbone runs once per image
and only the cheap head is sampled T times (`SplitClassifier.mc_logits_from_features`), in
chunks of at most `mc_chunk_rows` = T x images so memory stays bounded for any T and batch.
The backbone may also have run earlier, on several requests' images at once (`service.batching`).
"""

from __future__ import annotations

import dataclasses
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
from models.calibration.uncertainty import MCSummary, chunked_mc_summary
from service.inputs import InputError
from service.prediction_sets import CARD_SOURCE, evaluate_block
from service.registry import LoadedModel

_SEED_MOD = 2**31 - 1


class WorkCancelled(Exception):
    """Long model work (evaluate, compare) gave up between two chunks because its `stop` event
    was set: the server is stopping and its graceful timeout is over. A thread cannot be killed,
    so this is how a 10,000-image evaluation ends within one chunk instead of running on."""


def _check(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise WorkCancelled("the model work was cancelled")


# Images per backbone call of a cancellable predict: the micro-batcher's batch size, so a request
# the client abandoned stops within one such call (512 images took 12 s in one call on a loaded
# 2-core machine); the features equal a single call's up to float32 rounding.
STOPPABLE_CHUNK = 64


def _checked(stop: threading.Event, fn, *args):
    _check(stop)
    return fn(*args)


def _stoppable(mc_logits_from_features, stop: threading.Event):
    """The classifier's MC head call, checking `stop` before each chunk it is called for."""
    def call(*args):
        _check(stop)
        return mc_logits_from_features(*args)
    return call


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
class ReportWarning:
    """Something about the batch that limits what its report means; `code` is stable."""

    code: str
    message: str

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message}


MISSING_CLASSES = "missing_classes"


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
    warnings: tuple[ReportWarning, ...] = ()
    after_profile: CalibrationMetrics | None = None  # under a recalibration profile (calibration=<id>)
    conformal: dict | None = None  # service.prediction_sets.evaluate_block, with a ConformalRequest


@dataclass(frozen=True)
class ConformalRequest:
    """Evaluate's conformal block: the calibration set (the card's, or a profile's) and what to report."""

    calibration: object  # models.calibration.conformal.ConformalCalibration
    coverages: tuple[float, ...]
    methods: tuple[str, ...]
    mondrian: bool = False
    source: str = CARD_SOURCE  # named in the block (a profile names itself)
    calibrator: object = None  # a models.calibration.recalibration.Calibrator; None: the card's temperature


def predict(model: LoadedModel, x: np.ndarray, *, mc_samples: int, seed: int | None,
            mc_chunk_rows: int = 65_536, batch_size: int = 500,
            features: np.ndarray | None = None, logits: np.ndarray | None = None,
            stop: threading.Event | None = None, calibrator=None) -> Prediction:
    """`features` (and `logits`, the deterministic head on them): the backbone's output for `x`
    when already computed (the micro-batcher, `service.batching`, runs both for several requests
    at once); the MC sampling depends only on the features and the seed, never on which other
    images shared the pass. `stop` set (the client went away): WorkCancelled before the backbone
    and before each MC chunk, the same chunks and seeds as without it. `calibrator` (a recalibration
    profile's `Calibrator`) replaces the card's temperature: the probabilities and every MC sample
    are calibrated by it."""
    _check(stop)
    clf = model.classifier
    t = model.temperature
    if features is None and stop is not None:  # cancellable: the backbone in chunks, `stop` checked between
        features = np.concatenate([_checked(stop, clf.features, x[i:i + STOPPABLE_CHUNK], STOPPABLE_CHUNK)
                                   for i in range(0, len(x), STOPPABLE_CHUNK)])
    elif features is None:
        features = clf.features(x, batch_size)
    elif len(features) != len(x):
        raise ValueError(f"{len(features)} feature rows for {len(x)} images")
    if logits is None:
        logits = clf.head_logits(features)
    elif len(logits) != len(x):
        raise ValueError(f"{len(logits)} logit rows for {len(x)} images")
    summary = None
    if calibrator is not None:
        if mc_samples > 0:
            seed = 0 if seed is None else int(seed)
            summary = chunked_mc_summary(_calibrated_samples(clf, calibrator), features, mc_samples, seed,
                                         1.0, mc_chunk_rows)
        return Prediction(logits, calibrator.probabilities(logits), softmax(logits, 1.0), summary, seed)
    if mc_samples > 0:
        seed = 0 if seed is None else int(seed)
        if stop is None:
            summary = clf.mc_summary_from_features(features, mc_samples, seed, t, mc_chunk_rows)
        else:
            summary = chunked_mc_summary(_stoppable(clf.mc_logits_from_features, stop), features, mc_samples,
                                         seed, t, mc_chunk_rows)
    return Prediction(logits, softmax(logits, t), softmax(logits, 1.0), summary, seed)


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


def _calibrated_samples(clf, calibrator):
    """MC head samples [T, B, K] mapped to the profile's calibrated log-probabilities: their
    softmax at temperature 1 is the calibrated softmax of each sample, so the MC summary (mean,
    variance, entropies) is over per-sample calibrated probabilities, with the same seeds and
    chunking as the card's path."""
    def sample(features: np.ndarray, n_samples: int, seed: int) -> np.ndarray:
        z = clf.mc_logits_from_features(features, n_samples, seed)
        t, b, k = z.shape
        return calibrator.log_probabilities(z.reshape(t * b, k)).reshape(t, b, k)
    return sample


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
             stop: threading.Event | None = None, conformal: ConformalRequest | None = None,
             calibrator=None) -> Evaluation:
    """`calibrator`: a recalibration profile's; its metrics go to `after_profile`, and the
    conformal block (with `conformal`, then the profile's own calibration set) uses its probabilities."""
    logits = logits_in_chunks(model, x, chunk, stop)
    evaluation = evaluate_logits(logits, y, temperature=model.temperature, n_bins=n_bins, fit=fit,
                                 target_accuracy=target_accuracy, class_names=model.classes)
    if calibrator is not None:
        evaluation = dataclasses.replace(evaluation, after_profile=compute_metrics(
            calibrator.log_probabilities(logits), y, n_bins=n_bins))
    if conformal is None:
        return evaluation
    probabilities = (softmax(logits, model.temperature) if conformal.calibrator is None
                     else conformal.calibrator.probabilities(logits))
    block = evaluate_block(conformal.calibration, probabilities, y, conformal.coverages,
                           conformal.methods, conformal.mondrian, conformal.source)
    return dataclasses.replace(evaluation, conformal=block)


def evaluate_logits(logits: np.ndarray, y: np.ndarray, *, temperature: float, n_bins: int,
                    fit: bool, target_accuracy: float | None = None,
                    class_names: list[str] | None = None) -> Evaluation:
    before = compute_metrics(logits, y, temperature=1.0, n_bins=n_bins)
    after = compute_metrics(logits, y, temperature=temperature, n_bins=n_bins)
    fitted, after_fitted = batch_temperature(logits, y, n_bins) if fit else (None, None)
    return Evaluation(len(y), n_bins, temperature, before, after, fitted, after_fitted,
                      selective_evaluation(logits, y, temperature=temperature, target_accuracy=target_accuracy),
                      batch_warnings(y, logits.shape[1], class_names))


def batch_warnings(y: np.ndarray, num_classes: int, class_names: list[str] | None = None,
                   ) -> tuple[ReportWarning, ...]:
    """A batch without some classes gives figures about the classes it has only (the first 1,000
    images of a class-ordered folder are all one class): say so, with the missing ones."""
    missing = sorted(set(range(num_classes)) - set(np.unique(y).tolist()))
    if not missing:
        return ()
    names = [class_names[k] if class_names is not None else str(k) for k in missing]
    shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
    present = num_classes - len(missing)
    return (ReportWarning(MISSING_CLASSES,
                          f"the batch holds {present} of the model's {num_classes} classes (missing: {shown}); "
                          "its figures describe those classes only. Evaluate a sample of every class, e.g. "
                          "a stratified one"),)


def batch_temperature(logits: np.ndarray, y: np.ndarray, n_bins: int) -> tuple[float, CalibrationMetrics]:
    """The temperature fitted on this batch and the metrics at it (in-sample); 422
    `temperature_fit_failed` when the batch cannot determine one."""
    try:
        fitted = fit_temperature(logits, y)
    except TemperatureFitError as exc:
        raise InputError("temperature_fit_failed", f"cannot fit a temperature on this batch: {exc}") from None
    return fitted, compute_metrics(logits, y, temperature=fitted, n_bins=n_bins)


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
                 stop: threading.Event | None = None, calibrator=None) -> dict[str, np.ndarray]:
    """1 - max probability and predictive entropy of the deterministic calibrated probabilities;
    with `mc_samples` >= 2 also the MC mutual information. `chunk` images per forward pass, so
    features and activations stay bounded for any batch. `calibrator`: a profile's, instead of
    the card's temperature."""
    clf, t = model.classifier, model.temperature
    probs, mi = [], []
    for c, start in enumerate(range(0, len(x), chunk)):
        _check(stop)
        features = clf.features(x[start:start + chunk], chunk)
        logits = clf.head_logits(features)
        probs.append(softmax(logits, t) if calibrator is None else calibrator.probabilities(logits))
        if mc_samples >= 2:
            chunk_seed = (int(seed or 0) + 7_919 * c) % _SEED_MOD
            if calibrator is None:
                summary = clf.mc_summary_from_features(features, mc_samples, chunk_seed, t, mc_chunk_rows)
            else:
                summary = chunked_mc_summary(_calibrated_samples(clf, calibrator), features, mc_samples,
                                             chunk_seed, 1.0, mc_chunk_rows)
            mi.append(summary.mutual_information)
    return uncertainty_scores(np.concatenate(probs), np.concatenate(mi) if mi else None)


def compare(model: LoadedModel, x_in: np.ndarray, x_suspect: np.ndarray, *, mc_samples: int,
            seed: int | None, chunk: int = 500, mc_chunk_rows: int = 65_536,
            stop: threading.Event | None = None, calibrator=None) -> Comparison:
    """AUROC / AUPR-Out / FPR@95%TPR per score, the suspect batch as the positive class
    (`models.calibration.ood`). Both batches use the same seed: their MC masks are drawn alike."""
    kw = {"mc_samples": mc_samples, "seed": seed, "chunk": chunk, "mc_chunk_rows": mc_chunk_rows, "stop": stop,
          "calibrator": calibrator}
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
