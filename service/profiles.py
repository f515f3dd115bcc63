"""Recalibration profiles as the data plane uses them: fitting one from labelled logits (the
cross-fitted report and the conformal set come from `models.calibration.recalibration`), and
loading a stored one into a ready `Calibrator` + `ConformalCalibration`, cached in memory.

Profiles are immutable, so a loaded one never goes stale; only a deletion matters. A cached
profile is re-checked against the database after CACHE_TTL_S (another replica may have
deleted it) and dropped at once when this process deletes it, so predict with a profile costs
a dictionary lookup, not a query.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

from models.calibration.conformal import METHODS as CONFORMAL_METHODS
from models.calibration.conformal import ConformalCalibration
from models.calibration.recalibration import Calibrator, ProfileFit, fit_profile
from service.storage import CalibrationRepository, NewProfile, ProfileRecord, StoredProfile

CACHE_TTL_S = 30.0
CACHE_SIZE = 256
PROBABILITY_FLOOR = 1e-12  # log(p) of a probability input, so a 0 stays a finite logit


def data_sha256(*arrays: np.ndarray) -> str:
    """SHA-256 over the arrays as fitted (dtype, shape and bytes of each, in order)."""
    digest = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        digest.update(f"{a.dtype.str}{a.shape}".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


def logits_from_probabilities(p: np.ndarray) -> np.ndarray:
    """log p: logits whose softmax is p (a profile fitted on them calibrates p)."""
    return np.log(np.clip(p, PROBABILITY_FLOOR, None))


def conformal_summary(conformal: ConformalCalibration) -> dict:
    return {"n": conformal.n, "class_counts": conformal.class_counts().tolist(),
            "methods": list(CONFORMAL_METHODS)}


def fit_new_profile(logits: np.ndarray, labels: np.ndarray, *, method: str, folds: int, seed: int = 0,
                    reference: Optional[np.ndarray] = None, model_name: Optional[str] = None,
                    model_sha256: Optional[str] = None, label: Optional[str] = None,
                    data_digest: str) -> tuple[NewProfile, ProfileFit]:
    """Fit (TooFewImagesError / ValueError on bad input) and describe the profile to store."""
    fit = fit_profile(logits, labels, method, folds=folds, seed=seed, reference=reference)
    report = {**fit.report, "conformal": conformal_summary(fit.conformal)}
    new = NewProfile(model_name=model_name, model_sha256=model_sha256, num_classes=int(logits.shape[1]),
                     method=fit.calibrator.method, parameters=fit.calibrator.parameters, n=int(len(labels)),
                     data_sha256=data_digest, report=report, label=label, conformal=fit.conformal.to_bytes())
    return new, fit


def of_model_file(records: list, model_sha256: str) -> list:
    """The profiles fitted for this model file: a model's profiles are kept per version, and a
    version is known by its sha256 (a profile of another version is refused when used)."""
    return [r for r in records if r.model_sha256 == model_sha256]


@dataclass(frozen=True)
class LoadedProfile:
    """A stored profile made usable: its calibrator and (if it has one) its conformal set."""

    record: ProfileRecord
    calibrator: Calibrator
    conformal: Optional[ConformalCalibration]

    @property
    def id(self) -> str:
        return self.record.id

    def used(self) -> dict:
        """The `calibration` block of an answer that used this profile."""
        return {"id": self.record.id, "method": self.record.method, "source": "profile"}


def load_profile(stored: StoredProfile) -> LoadedProfile:
    calibrator = Calibrator.from_parameters(stored.method, stored.parameters)
    conformal = None if stored.conformal is None else ConformalCalibration.from_bytes(stored.conformal)
    return LoadedProfile(record=stored, calibrator=calibrator, conformal=conformal)


def card_calibration(model) -> dict:
    """The `calibration` block of an answer that used the model card's temperature."""
    return {"id": None, "method": "temperature", "source": "card"}


def fit_model_profile(model, x: np.ndarray, y: np.ndarray, *, method: str, folds: int, label: Optional[str],
                      chunk: int, stop: Optional[threading.Event] = None) -> NewProfile:
    """The model's logits on the labelled batch (chunked, stoppable like evaluate), then the fit;
    "before" in the report is the card's temperature on the same images."""
    from models.calibration.metrics import log_softmax
    from service.dataplane import logits_in_chunks

    logits = logits_in_chunks(model, x, chunk, stop)
    new, _ = fit_new_profile(logits, y, method=method, folds=folds,
                             reference=log_softmax(logits, model.temperature), model_name=model.name,
                             model_sha256=model.card.get("model_sha256"), label=label,
                             data_digest=data_sha256(x, y))
    return new


def fit_feedback_profile(model, logits: np.ndarray, served: np.ndarray, y: np.ndarray, *, method: str, folds: int,
                         label: Optional[str]) -> NewProfile:
    """A profile of `model` from the labelled predictions monitoring stored: their raw logits (what
    a profile is applied to at predict time; a vector or Dirichlet map is not invariant to the
    per-row shift that separates them from log-probabilities, so the rows keep both), with "before"
    measured on the probabilities that were served. TooFewImagesError below the method's minimum."""
    from models.calibration.recalibration import TooFewImagesError, minimum_images

    need = minimum_images(method, model.num_classes, folds)
    if len(y) < need:
        raise TooFewImagesError(need, f"{len(y)} labelled predictions of {model.name!r} in the range asked for; "
                                      f"{method} with {folds} folds needs at least {need} (send more feedback, or "
                                      f"widen since)")
    new, _ = fit_new_profile(logits, y, method=method, folds=folds, reference=logits_from_probabilities(served),
                             model_name=model.name, model_sha256=model.card.get("model_sha256"), label=label,
                             data_digest=data_sha256(logits.astype(np.float32), y))
    return new


def fit_logits_profile(logits: np.ndarray, y: np.ndarray, *, method: str, folds: int,
                       label: Optional[str]) -> NewProfile:
    """A model-independent profile from a client's logits; "before" is their plain softmax."""
    new, _ = fit_new_profile(logits, y, method=method, folds=folds, label=label,
                             data_digest=data_sha256(logits, y))
    return new


class ProfileCache:
    """id -> LoadedProfile, re-checked against the repository after `ttl_s` seconds."""

    def __init__(self, ttl_s: float = CACHE_TTL_S, size: int = CACHE_SIZE) -> None:
        self.ttl_s = ttl_s
        self.size = size
        self._entries: dict[str, tuple[float, LoadedProfile]] = {}
        self._lock = threading.Lock()

    def fresh(self, profile_id: str) -> Optional[LoadedProfile]:
        """A cached profile younger than the TTL, or None (no I/O: callable on the event loop)."""
        hit = self._entries.get(profile_id)
        if hit is not None and time.monotonic() - hit[0] < self.ttl_s:
            return hit[1]
        return None

    def get(self, repository: CalibrationRepository, profile_id: str) -> LoadedProfile:
        """The loaded profile (NotFound / StorageUnavailable from the repository on a miss)."""
        now = time.monotonic()
        with self._lock:
            hit = self._entries.get(profile_id)
        if hit is not None and now - hit[0] < self.ttl_s:
            return hit[1]
        loaded = load_profile(repository.get(profile_id))
        with self._lock:
            if len(self._entries) >= self.size:
                self._entries.pop(next(iter(self._entries)))
            self._entries[profile_id] = (now, loaded)
        return loaded

    def evict(self, profile_id: str) -> None:
        with self._lock:
            self._entries.pop(profile_id, None)
