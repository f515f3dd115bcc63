"""The storage side: artifacts on disk -> a registry of loaded, verified models.

One bad artifact must not take the others down, so each failure is logged and recorded (the
readiness endpoint reports it) and loading goes on. Nothing here knows about HTTP.
"""

from __future__ import annotations

import functools
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger("service.registry")

CARD_FILE = "model_card.json"
MODEL_FILE = "model.keras"


class UnknownModelError(KeyError):
    """No loaded model has this name."""

    def __init__(self, name: str, available: list[str]):
        super().__init__(name)
        self.name = name
        self.available = available


@dataclass
class LoadedModel:
    """A verified artifact with its backbone/head split ready for inference."""

    name: str
    path: Path
    card: dict
    classifier: object  # models.inference.SplitClassifier or models.litert_classifier.LiteRTClassifier
    # The card's conformal calibration set (validation split) at the card's temperature; None when
    # the artifact has none (or a stale one): predict then serves no prediction sets.
    conformal: object = None  # models.calibration.conformal.ConformalCalibration | None

    @property
    def runtime(self) -> str:
        """keras or litert: what runs this model (each classifier says)."""
        return self.classifier.runtime

    @property
    def classes(self) -> list[str]:
        return list(self.card.get("classes") or [str(i) for i in range(self.num_classes)])

    @property
    def num_classes(self) -> int:
        return int(self.classifier.num_classes)

    @property
    def temperature(self) -> float:
        return float(self.card["temperature"])


@dataclass(frozen=True)
class LoadFailure:
    path: str
    error: str


@dataclass
class ModelRegistry:
    """Name -> model. Read-only after startup, so request threads share it without locks."""

    model_dir: Path
    default: str | None = None           # listed first (clients use the first listed model)
    models: dict[str, LoadedModel] = field(default_factory=dict)
    failures: list[LoadFailure] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def get(self, name: str) -> LoadedModel:
        try:
            return self.models[name]
        except KeyError:
            raise UnknownModelError(name, sorted(self.models)) from None

    def names(self) -> list[str]:
        """Sorted, with the default model (if loaded) first."""
        return sorted(self.models, key=lambda name: (name != self.default, name))

    @property
    def ready(self) -> bool:
        return bool(self.models)

    def add(self, model: LoadedModel) -> None:
        with self._lock:
            if model.name in self.models:
                raise ValueError(f"duplicate model name {model.name!r} "
                                 f"({self.models[model.name].path} and {model.path})")
            self.models[model.name] = model


def candidate_dirs(model_dir: Path) -> list[Path]:
    """The artifact folders: `model_dir` itself if it is one, else its non-hidden subfolders
    holding a card or a model file (other folders are not artifacts and are ignored)."""
    if (model_dir / CARD_FILE).exists() or (model_dir / MODEL_FILE).exists():
        return [model_dir]
    if not model_dir.is_dir():
        return []
    return sorted(p for p in model_dir.iterdir()
                  if p.is_dir() and not p.name.startswith(".")
                  and ((p / CARD_FILE).exists() or (p / MODEL_FILE).exists()))


def resolve_runtime(runtime: str) -> str:
    """`auto` -> keras when TensorFlow and Keras are installed, else litert (the container's)."""
    if runtime != "auto":
        return runtime
    import importlib.util

    installed = all(importlib.util.find_spec(name) is not None for name in ("tensorflow", "keras"))
    return "keras" if installed else "litert"


def _load_keras(folder: Path) -> LoadedModel:
    from models.artifact import load_artifact  # imports TensorFlow: only when loading
    from models.inference import SplitClassifier

    artifact = load_artifact(folder)
    return LoadedModel(artifact.name, folder, artifact.card, SplitClassifier(artifact.model))


def _load_litert(folder: Path, num_threads: int | None = None) -> LoadedModel:
    from models.litert_classifier import LiteRTClassifier  # NumPy + LiteRT: no TensorFlow

    card, classifier = LiteRTClassifier.from_artifact(folder, num_threads=num_threads)
    return LoadedModel(card.get("name", folder.name), folder, card, classifier)


def load_registry(model_dir: str | Path, *, warmup: bool = True, default: str | None = None,
                  runtime: str = "auto", litert_threads: int | None = None) -> ModelRegistry:
    """Load every artifact under `model_dir` with `runtime` (keras, litert or auto), verifying
    checksums; skip (and record) bad ones. `litert_threads`: per LiteRT interpreter (None: CPU count)."""
    from models.artifact import ArtifactError

    runtime = resolve_runtime(runtime)
    load = _load_keras if runtime == "keras" else functools.partial(_load_litert, num_threads=litert_threads)
    logger.info("runtime: %s", runtime)
    registry = ModelRegistry(Path(model_dir), default=default)
    if not registry.model_dir.is_dir():
        msg = f"model directory {registry.model_dir} does not exist"
        logger.error(msg)
        registry.failures.append(LoadFailure(str(registry.model_dir), msg))
        return registry
    for folder in candidate_dirs(registry.model_dir):
        try:
            loaded = load(folder)
            loaded.conformal = _conformal_calibration(loaded)
            if warmup:
                _warm_up(loaded)
            registry.add(loaded)
        except ArtifactError as exc:
            logger.error("skipping artifact %s: %s", folder, exc)
            registry.failures.append(LoadFailure(str(folder), str(exc)))
            continue
        except Exception as exc:  # anything else about one artifact must not stop the others
            logger.exception("skipping artifact %s", folder)
            registry.failures.append(LoadFailure(str(folder), f"{type(exc).__name__}: {exc}"))
            continue
        _warn_if_unusable_ood_threshold(loaded)
        logger.info("loaded model %r from %s (T=%.4f, %s)", loaded.name, folder, loaded.temperature, loaded.runtime)
    if not registry.models:
        logger.error("no model could be loaded from %s", registry.model_dir)
    return registry


def _conformal_calibration(model: LoadedModel):
    """The card's conformal calibration set, checksum verified (ArtifactError when altered or
    missing: the artifact is refused like a tampered model); None, with a warning, when stale."""
    import numpy as np

    from models.calibration import softmax
    from models.calibration.conformal import ConformalCalibration
    from models.conformal_set import load_calibration_set, stale_reason

    stored = load_calibration_set(model.path, model.card)
    if stored is None:
        return None
    problem = stale_reason(model.card)
    if problem:
        logger.warning("model %r: ignoring its conformal calibration set (%s); no prediction sets",
                       model.name, problem)
        return None
    logits, labels = stored
    if logits.shape[1] != model.num_classes:
        logger.warning("model %r: its conformal calibration set has K = %d, the model %d; no prediction sets",
                       model.name, logits.shape[1], model.num_classes)
        return None
    return ConformalCalibration(softmax(logits.astype(np.float64), model.temperature), labels)


def _warn_if_unusable_ood_threshold(model: LoadedModel) -> None:
    """A card without `ood_threshold` (older models) serves without the OOD flag, silently; one
    whose block is unusable (e.g. fitted at another temperature) serves without it too, but says so."""
    from models.calibration.ood import ood_threshold_problem

    block = model.card.get("ood_threshold")
    problem = None if block is None else ood_threshold_problem(block, model.temperature)
    if problem:
        logger.warning("model %r: ignoring its ood_threshold (%s); predictions carry no OOD flag",
                       model.name, problem)


def _warm_up(model: LoadedModel) -> None:
    """Trace the tf.functions now, so the first request is not the slow one: for one image and
    for a batch of two, which makes them retrace once for any batch size (`reduce_retracing`) --
    the predict micro-batcher runs the backbone on batches of every size (~0.5 s per retrace).
    (LiteRT: allocates the first interpreter's tensors.)"""
    import numpy as np

    for n in (1, 2):
        x = np.zeros((n, 32, 32, 3), np.uint8)
        features = model.classifier.features(x)
        model.classifier.head_logits(features)
        model.classifier.mc_logits_from_features(features, 2, seed=0)
