"""The model repository: which versions on disk are served, and changing that while serving.

The registry (`service.registry`) holds what is loaded; this module decides what to load, builds a
version fully off to the side (`ModelBuilder`: card, SHA-256, safe_mode Keras or the LiteRT
export's checksums, conformal set, warm-up) and only then swaps it in (`ModelRegistry.swap`,
one reference replaced under a lock). A version that fails to load is logged and recorded
(UNAVAILABLE with its reason, listed by /health/ready) and changes nothing that is served.

Version policy (CALIB_MODEL_VERSION_POLICY), TF Serving's:
- `latest` (default): one version per model, the newest that loads. A newer version that fails
  leaves the one before it serving; at start-up the newest loadable one is served.
- `all`: every version on disk is loaded; requests without a version get the newest.
- `specific:1,3`: those versions (the ones present on disk).

Operations (`load`, `unload`, `poll`) run one at a time (a lock), in a worker thread; requests are
never blocked by them. `unload` keeps a model out until the next `load` (the poller leaves it);
`load` with a version pins the model to it (a roll-back) until a `load` without one.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from service.model_layout import ModelFolder, fingerprint, scan, version_key
from service.registry import (
    LOADING,
    READY,
    UNAVAILABLE,
    LoadedModel,
    ModelRegistry,
    UnknownModelError,
    UnknownVersionError,
    VersionState,
)

logger = logging.getLogger("service.model_repository")

POLICY_KINDS = ("latest", "all", "specific")


@dataclass(frozen=True)
class VersionPolicy:
    """Which versions of a model to serve (see the module docstring)."""

    kind: str = "latest"
    versions: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> "VersionPolicy":
        """`latest`, `all` or `specific:<v>,<v>...` (ValueError naming the problem)."""
        text = (text or "").strip()
        kind, _, rest = text.partition(":")
        if kind in ("latest", "all") and not rest:
            return cls(kind)
        if kind == "specific":
            versions = tuple(dict.fromkeys(v.strip() for v in rest.split(",") if v.strip()))
            bad = [v for v in versions if not v.isdigit() or int(v) < 1 or str(int(v)) != v]
            if not versions or bad:
                raise ValueError(f"specific:<versions> needs positive integer versions, e.g. specific:1,3 "
                                 f"(got {text!r})")
            return cls(kind, versions)
        raise ValueError(f"a version policy is latest, all or specific:<v>,<v>... (got {text!r})")

    def __str__(self) -> str:
        return self.kind + (":" + ",".join(self.versions) if self.versions else "")

    @property
    def single(self) -> bool:
        """One version per model (latest): a new one retires the one before it."""
        return self.kind == "latest"

    def targets(self, on_disk: list[str]) -> list[str]:
        """The versions to serve, newest first (latest: every one, in the order to try them)."""
        newest_first = sorted(on_disk, key=version_key, reverse=True)
        if self.kind == "specific":
            return [v for v in newest_first if v in self.versions]
        return newest_first


class LoadFailed(Exception):
    """An explicit load could not bring the asked-for version up; what serves now is unchanged
    (or, with nothing served before, the newest older version that loads)."""

    def __init__(self, name: str, failed: list[tuple[str, str]], serving: str | None):
        self.name, self.failed, self.serving = name, failed, serving
        what = "; ".join(f"version {v}: {reason}" for v, reason in failed)
        now = f"version {serving} keeps serving" if serving else "no version of it is served"
        super().__init__(f"model {name!r} failed to load ({what}); {now}")
        self.message = str(self)


@dataclass(frozen=True)
class LoadResult:
    name: str
    loaded: tuple[str, ...] = ()
    failed: tuple[tuple[str, str], ...] = ()
    serving: str | None = None


@dataclass
class ModelRepository:
    """Index, load, unload and poll over a registry (its `builder` loads a version folder)."""

    registry: ModelRegistry
    policy: VersionPolicy = field(default_factory=VersionPolicy)
    on_change: Callable[[], None] | None = None   # after each operation that changed something
    unloaded: set[str] = field(default_factory=set)  # unloaded by the API: the poller leaves them
    pinned: dict[str, str] = field(default_factory=dict)   # name -> the version an explicit load chose
    _ops: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def disk(self) -> dict[str, ModelFolder]:
        return scan(self.registry.model_dir)

    # --- operations ------------------------------------------------------------------------------
    def load_all(self) -> None:
        """Start-up: every model on disk, as the policy says."""
        with self._ops:
            for folder in self.disk().values():
                self._apply(folder, force=False)
        self._changed()

    def poll(self) -> list[str]:
        """Load what appeared on disk since: new models, newer versions (a version that failed is
        tried again only once its files changed). Never unloads. Returns `name:version` loaded."""
        loaded: list[str] = []
        with self._ops:
            for name, folder in self.disk().items():
                if name in self.unloaded or name in self.pinned:
                    continue
                result = self._apply(folder, force=False)
                loaded += [f"{name}:{v}" for v in result.loaded]
        if loaded:
            logger.info("poll: loaded %s", ", ".join(loaded))
            self._changed()
        return loaded

    def load(self, name: str, version: str | None = None) -> LoadResult:
        """Load (or re-load) `name` from disk: the policy's versions, or only `version` (pinned
        until a load without one). LoadFailed when the newest (or the asked-for) version does not
        load; UnknownModelError / UnknownVersionError for what is not on disk."""
        with self._ops:
            folder = self.disk().get(name)
            if folder is None:
                raise UnknownModelError(name, sorted(self.disk()))
            if version is not None and version not in folder.versions:
                raise UnknownVersionError(name, version, list(folder.versions))
            self.unloaded.discard(name)
            if version is None:
                self.pinned.pop(name, None)
            else:
                self.pinned[name] = version
            result = self._apply(folder, force=True, only=version)
        self._changed()
        wanted = [version] if version else self.policy.targets(list(folder.versions))[:1 if self.policy.single else None]
        failed = [(v, reason) for v, reason in result.failed if v in wanted]
        if failed:
            raise LoadFailed(name, failed, result.serving)
        return result

    def unload(self, name: str) -> LoadResult:
        """Take every version of `name` out of service (requests in flight finish); it stays out
        until the next load."""
        with self._ops:
            if name not in self.registry.loaded and name not in self.disk():
                raise UnknownModelError(name, sorted(set(self.registry.models) | set(self.disk())))
            self.unloaded.add(name)
            self.pinned.pop(name, None)
            removed = self.registry.remove(name)
            for model in removed:
                self._mark_out(model, "unloaded")
            if removed:
                logger.info("unloaded model %r (versions %s)", name, ", ".join(m.version for m in removed))
        self._changed()
        return LoadResult(name, serving=None)

    # --- the index ---------------------------------------------------------------------------------
    def index(self, ready_only: bool = False) -> list[dict]:
        """Every version on disk (and any loaded one whose folder is gone): Triton's
        {"name", "version", "state", "reason"}, sorted by name and version."""
        registry = self.registry
        loaded = registry.loaded
        rows: dict[tuple[str, str], dict] = {}
        for name, folder in self.disk().items():
            for version in folder.versions:
                rows[(name, version)] = self._row(name, version, loaded.get(name, {}))
        for name, versions in loaded.items():
            for version in versions:
                if (name, version) not in rows:
                    rows[(name, version)] = {"name": name, "version": version, "state": READY,
                                             "reason": "its folder is no longer on disk (still served)"}
        entries = [rows[key] for key in sorted(rows, key=lambda k: (k[0], version_key(k[1])))]
        return [e for e in entries if e["state"] == READY] if ready_only else entries

    def model_index(self, name: str) -> list[dict]:
        return [e for e in self.index() if e["name"] == name]

    def _row(self, name: str, version: str, loaded: dict[str, LoadedModel]) -> dict:
        state = self.registry.states.get((name, version))
        if version in loaded:
            reason = state.reason if state is not None and state.failed else ""
            return {"name": name, "version": version, "state": READY, "reason": reason}
        if state is not None:
            return {"name": name, "version": version, "state": state.state, "reason": state.reason}
        if name in self.unloaded:
            reason = "unloaded"
        elif loaded:
            served = ", ".join(sorted(loaded, key=version_key))
            reason = f"not loaded: the version policy ({self.policy}) serves version {served}"
        else:
            reason = f"not loaded (version policy {self.policy})"
        return {"name": name, "version": version, "state": UNAVAILABLE, "reason": reason}

    # --- the work ----------------------------------------------------------------------------------
    def _apply(self, folder: ModelFolder, *, force: bool, only: str | None = None) -> LoadResult:
        """Bring `folder`'s served versions in line with the policy (or with `only`). `force`: the
        first target is (re)loaded even when it is served or failed before (an explicit load)."""
        name = folder.name
        targets = [only] if only is not None else self.policy.targets(list(folder.versions))
        single = self.policy.single
        loaded_now, failed = [], []
        for i, version in enumerate(targets):
            current = self.registry.loaded.get(name, {})
            forced = force and (i == 0 or not single)
            if single and not forced and version in current:
                break   # the newest loadable version is already the one served
            if not single and not forced and version in current:
                continue
            if not forced and self._known_failure(name, version, folder.versions[version]):
                continue
            model, reason = self._build(folder, version)
            if model is None:
                failed.append((version, reason))
                continue
            retire = [v for v in current if v != version] if single else []
            for old in self.registry.swap(model, retire=retire):
                if old.version != version:
                    self._mark_out(old, f"unloaded: version {version} serves now")
            logger.info("serving model %r version %s from %s (T=%.4f, %s)", name, version, model.path,
                        model.temperature, model.runtime)
            loaded_now.append(version)
            if single:
                break
        serving = self.registry.models.get(name)
        return LoadResult(name, tuple(loaded_now), tuple(failed), None if serving is None else serving.version)

    def _known_failure(self, name: str, version: str, path: Path) -> bool:
        state = self.registry.states.get((name, version))
        return state is not None and state.failed and state.fingerprint == fingerprint(path)

    def _build(self, folder: ModelFolder, version: str) -> tuple[LoadedModel | None, str]:
        from models.artifact import ArtifactError

        name, path = folder.name, folder.versions[version]
        files = fingerprint(path)
        serving = version in self.registry.loaded.get(name, {})
        if not serving:
            self.registry.set_state(VersionState(name, version, str(path), LOADING))
        try:
            return self.registry.builder(path, name, version), ""
        except ArtifactError as exc:
            reason = str(exc)
            logger.error("model %r version %s (%s) failed to load: %s", name, version, path, reason)
        except Exception as exc:  # anything else about one version must not stop the others
            reason = f"{type(exc).__name__}: {exc}"
            logger.exception("model %r version %s (%s) failed to load", name, version, path)
        state = READY if serving else UNAVAILABLE
        if serving:
            reason = f"a re-load failed, the version loaded before keeps serving: {reason}"
        self.registry.set_state(VersionState(name, version, str(path), state, reason, failed=True,
                                             fingerprint=files))
        return None, reason

    def _mark_out(self, model: LoadedModel, reason: str) -> None:
        self.registry.set_state(VersionState(model.name, model.version, str(model.path), UNAVAILABLE, reason))

    def _changed(self) -> None:
        if self.on_change is not None:
            try:
                self.on_change()
            except Exception:
                logger.exception("model repository change listener failed")


class ModelPoller:
    """CALIB_MODEL_POLL_S: a daemon thread that polls the repository every `interval_s` seconds."""

    def __init__(self, repository: ModelRepository, interval_s: float):
        self.repository = repository
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="model-poller", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.repository.poll()
            except Exception:  # a bad poll must not end polling
                logger.exception("polling the model directory failed")
