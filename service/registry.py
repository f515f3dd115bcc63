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
from typing import Callable

logger = logging.getLogger("service.registry")

CARD_FILE = "model_card.json"
MODEL_FILE = "model.keras"


class UnknownModelError(KeyError):
    """No loaded model has this name."""

    def __init__(self, name: str, available: list[str]):
        super().__init__(name)
        self.name = name
        self.available = available


class UnknownVersionError(KeyError):
    """The model is loaded, but not this version of it."""

    def __init__(self, name: str, version: str, available: list[str]):
        super().__init__(version)
        self.name = name
        self.version = version
        self.available = available


@dataclass
class LoadedModel:
    """A verified artifact with its backbone/head split ready for inference: one version of a model.

    Immutable once in the registry; a new version is a new LoadedModel swapped in beside or in
    place of it. A request keeps the object it took, so it finishes on the version it started on."""

    name: str
    path: Path
    card: dict
    classifier: object  # models.inference.SplitClassifier or models.litert_classifier.LiteRTClassifier
    # The card's conformal calibration set (validation split) at the card's temperature; None when
    # the artifact has none (or a stale one): predict then serves no prediction sets.
    conformal: object = None  # models.calibration.conformal.ConformalCalibration | None
    version: str = "1"   # the version folder's number (the flat layout: "1"); service.model_layout
    # Set by the registry when this version is swapped out or unloaded: requests that already hold
    # it finish on it, but no new micro-batch is formed for it (service.batching).
    retired: bool = field(default=False, compare=False, repr=False)

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

    @property
    def sha256(self) -> str:
        return str(self.card.get("model_sha256", ""))


@dataclass(frozen=True)
class LoadFailure:
    path: str
    error: str
    name: str | None = None
    version: str | None = None


# The states of a version in the repository index (Triton's names).
READY, UNAVAILABLE, LOADING = "READY", "UNAVAILABLE", "LOADING"


@dataclass(frozen=True)
class VersionState:
    """What happened to one version folder last: loaded (READY), failed or unloaded (UNAVAILABLE,
    `reason` says which), or being loaded. `failed`: the last attempt to load it failed (reported in
    /health/ready); `fingerprint`: its files then (service.model_layout.fingerprint)."""

    name: str
    version: str
    path: str
    state: str
    reason: str = ""
    failed: bool = False
    fingerprint: tuple = ()


Listener = Callable[[LoadedModel], None]


@dataclass
class ModelRegistry:
    """Name -> the version served by default, and every loaded version of it.

    Requests read it without locks: `models[name]` and `loaded[name]` are replaced, never mutated,
    under `_lock` (a new version is built and verified off to the side first, see
    service.model_repository), so a reader sees the old or the new version, never half of one."""

    model_dir: Path
    default: str | None = None           # listed first (clients use the first listed model)
    models: dict[str, LoadedModel] = field(default_factory=dict)   # name -> newest loaded version
    loaded: dict[str, dict[str, LoadedModel]] = field(default_factory=dict)  # name -> version -> model
    states: dict[tuple[str, str], VersionState] = field(default_factory=dict)
    dir_failures: list[LoadFailure] = field(default_factory=list)  # e.g. the model directory is missing
    listeners: list[Listener] = field(default_factory=list)  # called with each retired LoadedModel
    builder: Callable[[Path, str, str], LoadedModel] | None = field(default=None, repr=False)  # ModelBuilder
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def get(self, name: str, version: str | None = None) -> LoadedModel:
        """The default version of `name`, or the loaded `version` (UnknownVersionError if not loaded)."""
        try:
            model = self.models[name]
        except KeyError:
            raise UnknownModelError(name, sorted(self.models)) from None
        if version is None:
            return model
        found = self.loaded.get(name, {}).get(version)
        if found is None:
            raise UnknownVersionError(name, version, self.versions_of(name))
        return found

    def versions_of(self, name: str) -> list[str]:
        """The loaded versions of `name`, oldest first."""
        return sorted(self.loaded.get(name, {}), key=int)

    def names(self) -> list[str]:
        """Sorted, with the default model (if loaded) first."""
        return sorted(self.models, key=lambda name: (name != self.default, name))

    @property
    def ready(self) -> bool:
        return bool(self.models)

    @property
    def failures(self) -> list[LoadFailure]:
        """Every version whose last load failed (and directory-level problems), for /health/ready."""
        states = sorted((s for s in list(self.states.values()) if s.failed), key=lambda s: (s.name, int(s.version)))
        return [*self.dir_failures, *(LoadFailure(s.path, s.reason, s.name, s.version) for s in states)]

    def add(self, model: LoadedModel) -> None:
        """Register `model` beside the loaded versions (ValueError for a version already loaded)."""
        with self._lock:
            if model.version in self.loaded.get(model.name, {}):
                raise ValueError(f"duplicate model {model.name!r} version {model.version} "
                                 f"({self.loaded[model.name][model.version].path} and {model.path})")
        self.swap(model)

    def swap(self, model: LoadedModel, *, retire: tuple[str, ...] | list[str] = ()) -> list[LoadedModel]:
        """Put `model` in (replacing a loaded object of its version) and take the `retire` versions
        out, in one step; returns the retired objects (already flagged, listeners told)."""
        with self._lock:
            versions = dict(self.loaded.get(model.name, {}))
            old = [versions.pop(v) for v in {*retire, model.version} if v in versions]
            versions[model.version] = model
            self._publish(model.name, versions)
            self.states[(model.name, model.version)] = VersionState(model.name, model.version, str(model.path), READY)
        self._retire(old)
        return old

    def remove(self, name: str, versions: list[str] | None = None) -> list[LoadedModel]:
        """Take `versions` (default: all) of `name` out; returns the retired objects."""
        with self._lock:
            loaded = dict(self.loaded.get(name, {}))
            old = [loaded.pop(v) for v in (list(loaded) if versions is None else versions) if v in loaded]
            self._publish(name, loaded)
        self._retire(old)
        return old

    def set_state(self, state: VersionState) -> None:
        self.states[(state.name, state.version)] = state

    def _publish(self, name: str, versions: dict[str, LoadedModel]) -> None:
        """New dicts in place of the old ones (under _lock): readers never see one being changed."""
        loaded = dict(self.loaded)
        models = dict(self.models)
        if versions:
            loaded[name] = versions
            models[name] = versions[max(versions, key=int)]
        else:
            loaded.pop(name, None)
            models.pop(name, None)
        self.loaded = loaded
        self.models = models

    def _retire(self, old: list[LoadedModel]) -> None:
        for model in old:
            model.retired = True
            logger.info("model %r version %s retired (requests holding it finish on it)", model.name, model.version)
            for listener in list(self.listeners):
                try:
                    listener(model)
                except Exception:
                    logger.exception("registry listener failed")


def candidate_dirs(model_dir: Path) -> list[Path]:
    """The artifact folders (every version of every model) under `model_dir`."""
    from service.model_layout import scan

    return [path for folder in scan(model_dir).values() for path in folder.versions.values()]


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


class ModelBuilder:
    """Loads one version folder into a LoadedModel, fully, off to the side: the card and the
    model file's SHA-256, then Keras with safe_mode (or the LiteRT export, whose checksums must
    match the card), the conformal set's checksum, and a warm-up pass. Raises on any problem
    (ArtifactError for a bad artifact); nothing is registered here."""

    def __init__(self, runtime: str = "auto", *, warmup: bool = True, litert_threads: int | None = None):
        self.runtime = resolve_runtime(runtime)
        self.warmup = warmup
        self._load = (_load_keras if self.runtime == "keras"
                      else functools.partial(_load_litert, num_threads=litert_threads))

    def __call__(self, folder: Path, name: str, version: str) -> LoadedModel:
        loaded = self._load(folder)
        card_name = loaded.name
        loaded.name, loaded.version = name, version
        if card_name != name:
            logger.warning("model folder %s holds a card named %r: served as %r (its folder's name)",
                           folder, card_name, name)
        loaded.conformal = _conformal_calibration(loaded)
        if self.warmup:
            _warm_up(loaded)
        _warn_if_unusable_ood_threshold(loaded)
        return loaded


def load_registry(model_dir: str | Path, *, warmup: bool = True, default: str | None = None,
                  runtime: str = "auto", litert_threads: int | None = None,
                  policy: str = "latest") -> ModelRegistry:
    """Load every model under `model_dir` with `runtime` (keras, litert or auto), verifying
    checksums, the versions the version `policy` names (service.model_repository); skip (and
    record) bad ones. `litert_threads`: per LiteRT interpreter (None: CPU count)."""
    from service.model_repository import ModelRepository, VersionPolicy

    builder = ModelBuilder(runtime, warmup=warmup, litert_threads=litert_threads)
    logger.info("runtime: %s", builder.runtime)
    registry = ModelRegistry(Path(model_dir), default=default)
    registry.builder = builder
    if not registry.model_dir.is_dir():
        msg = f"model directory {registry.model_dir} does not exist"
        logger.error(msg)
        registry.dir_failures.append(LoadFailure(str(registry.model_dir), msg))
        return registry
    ModelRepository(registry, VersionPolicy.parse(policy)).load_all()
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
