"""The shift benchmark's domain: run calibrated models over image sets, then calibration and OOD figures.

Inference follows the service (`service/dataplane.py`): the backbone runs once per image
(`SplitClassifier.features`); the deterministic logits and the T MC-dropout samples both come from
those features, so the mutual information costs only T passes of the small head.
Probabilities are the calibrated ones the service returns: softmax(logits / T_model).

Aggregates follow google/uncertainty-baselines (CIFAR-10-C): a metric is computed on each
corruption x severity set, then averaged over the sets (cA, cNLL, cBrier, cCE = mean ECE);
per-severity figures average over the types at that severity.
OOD scores: 1 - max probability and predictive entropy of the deterministic calibrated
probabilities (what a client sees without MC), the mutual information of the MC samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from models.calibration import compute_metrics, detection, softmax, uncertainty_scores
from models.calibration.metrics import CalibrationMetrics

METRICS = ("accuracy", "nll", "brier", "ece")
AGGREGATE_NAMES = {"accuracy": "cA", "nll": "cNLL", "brier": "cBrier", "ece": "cCE"}
MC_CHUNK_ROWS = 65_536   # T x images per head pass: bounds the tiled [T*B, D] features
FEATURE_SCORE = "feature_mahalanobis"   # with --feature-density: Mahalanobis distance of the backbone features


def stratified_subset(labels: np.ndarray, n: int, *, seed: int) -> np.ndarray:
    """Sorted indices of `n` images whose class counts follow the full split's (largest remainder).

    Seeded and independent of any model, so every set and every model sees the same images."""
    labels = np.asarray(labels)
    total = len(labels)
    if not 1 <= n <= total:
        raise ValueError(f"n must be in 1..{total}, got {n}")
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * (n / total)
    take = np.floor(exact).astype(int)
    remainder_order = np.lexsort((classes, -(exact - take)))   # largest remainder, then class index
    take[remainder_order[: n - take.sum()]] += 1
    rng = np.random.default_rng([seed, 0x5EB])
    picked = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)]
    return np.sort(np.concatenate(picked))


@dataclass(frozen=True, eq=False)
class SetOutputs:
    """One model on one set: uncalibrated deterministic logits and the per-image OOD scores."""

    logits: np.ndarray                 # [N, K] float32, divide by the model's temperature to calibrate
    scores: dict[str, np.ndarray]      # OOD score name -> [N]


class ModelRunner:
    """A loaded artifact as the benchmark uses it (name, temperature, features -> outputs)."""

    def __init__(self, name: str, path, card: dict, classifier, *, mc_samples: int, seed: int,
                 batch_size: int = 500):
        self.density = None        # a FeatureGaussian (fit_density): adds the FEATURE_SCORE score
        self.name = name
        self.path = path
        self.card = card
        self.classifier = classifier
        self.temperature = classifier.temperature
        self.mc_samples = mc_samples
        self.seed = seed
        self.batch_size = batch_size

    def run(self, images: np.ndarray) -> SetOutputs:
        features = self.classifier.features(images, self.batch_size)
        logits = self.classifier.head_logits(features)
        mutual = self._mutual_information(features) if self.mc_samples > 1 else None
        scores = uncertainty_scores(softmax(logits, self.temperature), mutual)
        if self.density is not None:
            scores[FEATURE_SCORE] = self.density.score(features)
        return SetOutputs(np.asarray(logits, np.float32), scores)

    def fit_density(self, train_images: np.ndarray, train_labels: np.ndarray) -> None:
        """Fit the class-conditional feature Gaussian on training-split images (never test ones)."""
        from models.calibration.feature_density import FeatureGaussian

        features = self.classifier.features(train_images, self.batch_size)
        self.density = FeatureGaussian.fit(features, train_labels, self.classifier.num_classes)

    def _mutual_information(self, features: np.ndarray) -> np.ndarray:
        return self.classifier.mc_summary_from_features(features, self.mc_samples, self.seed, self.temperature,
                                                        MC_CHUNK_ROWS).mutual_information


def set_metrics(outputs: SetOutputs, labels: np.ndarray, temperature: float) -> CalibrationMetrics:
    return compute_metrics(outputs.logits, labels, temperature=temperature, n_bins=15)


def pooled_metrics(outputs: Iterable[SetOutputs], labels: np.ndarray, temperature: float) -> CalibrationMetrics:
    """One reliability diagram's worth of metrics over several sets of the same images."""
    outputs = list(outputs)
    return compute_metrics(np.concatenate([o.logits for o in outputs]), np.tile(labels, len(outputs)),
                           temperature=temperature, n_bins=15)


def ood_detection(clean: SetOutputs, shifted: SetOutputs) -> dict[str, dict]:
    """AUROC / AUPR-Out / FPR at 95% TPR of each score, clean images as in-distribution."""
    return {name: detection(name, clean.scores[name], shifted.scores[name]).to_dict()
            for name in clean.scores if name in shifted.scores}


def mean_of(values: Iterable[float]) -> float:
    values = list(values)
    return float(np.mean(values))


@dataclass
class ModelResults:
    """Everything the report needs about one model, in plain numbers."""

    name: str
    temperature: float
    clean: dict = field(default_factory=dict)                 # metric -> value
    per_set: dict = field(default_factory=dict)               # "type/severity" -> metric -> value
    ood_per_set: dict = field(default_factory=dict)           # "type/severity" -> score -> Detection dict
    ood_synthetic: dict = field(default_factory=dict)         # set name -> score -> Detection dict
    reliability: dict = field(default_factory=dict)           # "clean" | "severity_3" ... -> CalibrationMetrics

    def per_severity(self, severities) -> dict[str, dict[str, float]]:
        out = {}
        for s in severities:
            rows = [v for k, v in self.per_set.items() if k.endswith(f"/{s}")]
            out[str(s)] = {m: mean_of(r[m] for r in rows) for m in METRICS}
        return out

    def aggregates(self) -> dict[str, float]:
        rows = list(self.per_set.values())
        return {AGGREGATE_NAMES[m]: mean_of(r[m] for r in rows) for m in METRICS}

    def ood_per_severity(self, severities) -> dict[str, dict[str, dict[str, float]]]:
        """severity -> score -> {auroc, aupr, fpr_at_95_tpr} averaged over the corruption types."""
        out = {}
        for s in severities:
            rows = [v for k, v in self.ood_per_set.items() if k.endswith(f"/{s}")]
            out[str(s)] = {score: {key: mean_of(r[score][key] for r in rows)
                                   for key in ("auroc", "aupr", "fpr_at_95_tpr")}
                           for score in rows[0]}
        return out


def metric_row(m: CalibrationMetrics) -> dict[str, float]:
    return {name: float(getattr(m, name)) for name in METRICS}


def evaluate(runners: list[ModelRunner], labels: np.ndarray, clean_images: np.ndarray,
             corrupted_sets: Iterable[tuple[str, int, object]], synthetic_sets: dict[str, np.ndarray],
             *, pooled_severities=(3, 5), progress=None, checkpoint=None) -> list[ModelResults]:
    """Run every model over the clean set, each corrupted set (built once, shared by the models)
    and each OOD set; keep only figures and the logits needed for pooled reliability diagrams.

    A corrupted set's images may be given as a callable that builds them, so that with a
    `checkpoint` (`training.shift.resume.SetCheckpoint`) a set finished by an earlier run is
    neither corrupted nor run again: its stored outputs are used, and each new set's are stored."""
    say = progress or (lambda message: None)

    def outputs_of(key: str, images) -> list[SetOutputs]:
        stored = None if checkpoint is None else checkpoint.load(key)
        if stored is not None and len(stored) == len(runners):
            return stored
        images = images() if callable(images) else images
        outputs = [runner.run(images) for runner in runners]
        if checkpoint is not None:
            checkpoint.save(key, outputs)
        return outputs

    results = [ModelResults(r.name, r.temperature) for r in runners]
    clean = outputs_of("clean", clean_images)
    for runner, res, outputs in zip(runners, results, clean):
        metrics = set_metrics(outputs, labels, runner.temperature)
        res.clean = metric_row(metrics)
        res.reliability["clean"] = metrics
    say(f"clean: {len(labels)} images, " + ", ".join(f"{r.name} acc {r.clean['accuracy']:.3f}" for r in results))
    pooled: list[dict[int, list[SetOutputs]]] = [{s: [] for s in pooled_severities} for _ in runners]
    for name, severity, images in corrupted_sets:
        key = f"{name}/{severity}"
        for i, (runner, res, outputs) in enumerate(zip(runners, results, outputs_of(key, images))):
            res.per_set[key] = metric_row(set_metrics(outputs, labels, runner.temperature))
            res.ood_per_set[key] = ood_detection(clean[i], outputs)
            if severity in pooled[i]:
                pooled[i][severity].append(outputs)
        say(f"{key}: " + ", ".join(f"{r.name} acc {r.per_set[key]['accuracy']:.3f} ece {r.per_set[key]['ece']:.3f}"
                                   for r in results))
    for i, (runner, res) in enumerate(zip(runners, results)):
        for severity, outs in pooled[i].items():
            if outs:
                res.reliability[f"severity_{severity}"] = pooled_metrics(outs, labels, runner.temperature)
    for set_name, images in synthetic_sets.items():
        for i, (res, outputs) in enumerate(zip(results, outputs_of(f"ood/{set_name}", images))):
            res.ood_synthetic[set_name] = ood_detection(clean[i], outputs)
        say(f"OOD {set_name}: {len(images)} images")
    return results
