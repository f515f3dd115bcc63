"""Service settings, read from the environment (prefix ``CALIB_``) by pydantic-settings.

Defaults make ``python -m service`` work on a fresh checkout or install: the model directory
is resolved relative to the installed packages, never the working directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

from pydantic import Field, PrivateAttr, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.api_keys import load_keys, split_keys

# `models/shipped` sits next to this package both in the repo and in site-packages.
DEFAULT_MODEL = "cifar10-augmix"   # AugMix + shift-aware temperature: calibrated under corruption
DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "shipped"
ENV_PREFIX = "CALIB_"


class Settings(BaseSettings):
    """Every knob of the server; e.g. ``CALIB_PORT=9000 python -m service``."""

    # hide_input_in_errors: a validation error must not print the API keys it was given
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True,
                                      hide_input_in_errors=True)

    model_dir: Path = Field(DEFAULT_MODEL_DIR, description="a folder of artifacts, or one artifact")
    default_model: str = Field(DEFAULT_MODEL, description="listed first by /v1/models, so clients that take "
                                                        "the first model get it (ignored if not loaded)")
    host: str = Field("127.0.0.1", description="bind address (the container sets 0.0.0.0)")
    port: int = Field(8000, ge=0, le=65535)
    graceful_timeout_s: float = Field(
        10.0, ge=0, le=3600, description="on SIGTERM/SIGINT: stop accepting at once, give the requests in flight "
                                         "this long to finish, then cancel them (an evaluation stops at its next "
                                         "chunk; its client gets 503 shutting_down) and exit")
    workers: int = Field(
        1, ge=1, le=32, description="server processes on the port, each with its own copy of the models "
                                    "(memory x N, see docs/workers.md); /metrics sums them")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

    # --- API keys (off unless a key is configured); see service.api_keys -----------------------
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="comma-separated API keys; when any key is set (here or in "
                                          "the file), /v1 needs 'Authorization: Bearer <key>' or 'X-API-Key'")
    api_keys_file: Optional[Path] = Field(
        None, description="file with one API key a line (blank lines and #comments ignored), e.g. a "
                          "container secret; unreadable or empty is a startup error")
    metrics_require_key: bool = Field(False, description="/metrics needs an API key too")
    _all_api_keys: tuple[SecretStr, ...] = PrivateAttr(())

    @field_validator("api_keys", "admin_api_keys", mode="before")
    @classmethod
    def _split_api_keys(cls, value):
        return split_keys(value)

    @model_validator(mode="after")
    def _load_api_keys(self):
        keys = load_keys(self.api_keys, self.api_keys_file, "CALIB_API_KEYS")
        self._all_admin_api_keys = tuple(load_keys(self.admin_api_keys, self.admin_api_keys_file,
                                                   "CALIB_ADMIN_API_KEYS"))
        if self.metrics_require_key and not keys and not self._all_admin_api_keys:
            raise ValueError("CALIB_METRICS_REQUIRE_KEY=true needs CALIB_API_KEYS or CALIB_API_KEYS_FILE "
                             "(or admin keys)")
        self._all_api_keys = tuple(keys)
        return self

    @property
    def all_api_keys(self) -> tuple[SecretStr, ...]:
        """The keys of CALIB_API_KEYS and CALIB_API_KEYS_FILE together (the read scope)."""
        return self._all_api_keys

    # --- admin scope: creating and deleting calibration profiles ------------------------------
    admin_api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="comma-separated admin API keys: they may create and delete "
                                          "calibration profiles, and do everything a CALIB_API_KEYS key may. "
                                          "Any key configured (read or admin) turns authentication on; then "
                                          "a read key on an admin route gets 403 forbidden")
    admin_api_keys_file: Optional[Path] = Field(
        None, description="file with one admin API key a line (as CALIB_API_KEYS_FILE)")
    _all_admin_api_keys: tuple[SecretStr, ...] = PrivateAttr(())

    @property
    def all_admin_api_keys(self) -> tuple[SecretStr, ...]:
        """The keys of CALIB_ADMIN_API_KEYS and CALIB_ADMIN_API_KEYS_FILE together."""
        return self._all_admin_api_keys

    # --- calibration profiles: storage (service.storage) --------------------------------------
    data_dir: Path = Field(
        Path("data"), description="where the default SQLite database (calibrations.db) lives, relative to the "
                                  "working directory unless absolute; created if missing")
    database_url: Optional[SecretStr] = Field(
        None, description="the calibration profiles' database: postgresql+psycopg://user:password@host:5432/db "
                          "(several replicas share it) or sqlite:///path; default: SQLite (WAL mode) in "
                          "CALIB_DATA_DIR/calibrations.db")
    database_timeout_s: float = Field(
        5.0, gt=0, le=120, description="connecting to the database, or waiting for SQLite's write lock, gives "
                                       "up after this long (then 503 storage_unavailable)")
    max_calibrations: int = Field(
        1000, ge=1, description="calibration profiles the service keeps (all models together); creating one "
                                "more gets 409 calibration_limit_reached")

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value):
        if value is not None:
            from service.storage.engine import backend_of

            backend_of(value.get_secret_value())  # ValueError naming the problem, never the URL
        return value

    @property
    def storage_url(self) -> str:
        """CALIB_DATABASE_URL, or the default SQLite file under CALIB_DATA_DIR."""
        if self.database_url is not None:
            return self.database_url.get_secret_value()
        from service.storage.engine import default_url

        return default_url(self.data_dir)

    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="larger bodies get 413")
    max_instances: int = Field(512, ge=1, description="images per predict request")
    max_eval_images: int = Field(50_000, ge=1, description="images per evaluate request")
    default_mc_samples: int = Field(100, ge=0)
    max_mc_samples: int = Field(1000, ge=1)
    default_bins: int = Field(15, ge=1)
    max_bins: int = Field(100, ge=1)
    eval_chunk: int = Field(500, ge=1, description="images per forward pass when evaluating")
    mc_chunk_rows: int = Field(65_536, ge=1, description="T x images per batched MC head call")
    inference_threads: int = Field(2, ge=1, description="worker threads that run the model")
    batch_max_images: int = Field(
        64, ge=1, description="predict micro-batching: at most this many images (from concurrent requests "
                              "to one model) share one backbone pass; larger requests bypass the batcher")
    batch_wait_ms: float = Field(
        2.0, ge=0, le=1000, description="predict micro-batching: how long a batch stays open for more "
                                        "requests after its first one (ms), when others are queued (a lone "
                                        "request goes at once); 0 disables batching")
    runtime: Literal["auto", "keras", "litert"] = Field(
        "auto", description="what runs the models: keras (TensorFlow), litert (the exported backbone.tflite + "
                            "head.npz, no TensorFlow: the container's), auto = keras when TensorFlow is "
                            "installed, else litert")
    litert_threads: int = Field(
        0, ge=0, le=64, description="CALIB_RUNTIME=litert: threads of each LiteRT interpreter (one per "
                                    "inference thread that runs the backbone); 0 = the CPU count")
    batch_policy: Literal["window", "continuous"] = Field(
        "window", description="predict micro-batching: 'window' keeps a batch open CALIB_BATCH_WAIT_MS "
                              "while other requests are queued (a lone request goes at once); "
                              "'continuous' takes what is queued whenever the backbone is free, never waits "
                              "(see docs/workers.md)")
    batch_passes: int = Field(
        1, ge=1, le=16, description="predict micro-batching: batches of one model computed at once (each in "
                                    "its own inference thread); 1: one after the other")
    model_version_policy: str = Field(
        "latest", description="which versions of a model folder's <name>/<version>/ folders are served: latest "
                              "(the newest that loads; a newer one that fails leaves the one before serving), "
                              "all, or specific:<v>,<v>... (docs/model-versions.md)")
    model_poll_s: float = Field(
        0.0, ge=0, le=86_400, description="poll CALIB_MODEL_DIR for new models and versions every this many "
                                          "seconds, and swap them in without downtime (0: off; "
                                          "POST /v2/repository/models/{name}/load does it on demand)")

    @field_validator("model_version_policy")
    @classmethod
    def _check_version_policy(cls, value):
        from service.model_repository import VersionPolicy

        return str(VersionPolicy.parse(value))

    warmup: bool = Field(True, description="trace the model functions once at startup")
    gc_freeze: bool = Field(
        True, description="after loading the models, exclude every object alive then from the cyclic GC "
                          "(gc.freeze): full collections stop re-scanning the ~400k TensorFlow/Keras "
                          "objects, which otherwise pause the server for 0.2-0.4 s at a time under load")

    # --- admission control (service.admission_limits): bound the heavy work and the buffered bytes ---
    max_concurrent_evaluations: int = Field(
        1, ge=1, description="evaluate requests that run at once. 1 on this 2-core service: one evaluation "
                             "already keeps both cores busy (TensorFlow spreads each forward pass over them), "
                             "so a second would add its memory (~2x its upload) but no throughput, and it "
                             "would take the second inference thread that predict requests use")
    evaluation_queue: int = Field(
        32, ge=0, description="evaluate (and compare) requests that may wait for a slot once their body is "
                              "read (a slow upload never holds a slot); their bodies are charged to "
                              "CALIB_MAX_BUFFERED_BYTES while they wait; beyond that: 503 overloaded + Retry-After")
    evaluation_queue_timeout_s: float = Field(
        30.0, gt=0, description="how long an evaluate request may wait in the queue before 503 overloaded")
    max_buffered_bytes: int = Field(
        512 * 1024 * 1024, ge=1024,
        description="memory budget for the requests in flight, charged as the body arrives, as the request "
                    "will hold it: JSON 8x (parsed pixel lists), other bodies 2x (upload + decoded arrays), "
                    "plus what an .npz declares it inflates to. "
                    "Over budget: 503 overloaded + Retry-After (a request larger than the whole budget still "
                    "runs when nothing else is buffered)")

    buffer_wait_s: float = Field(
        10.0, ge=0, le=600, description="how long a body chunk may wait for room in CALIB_MAX_BUFFERED_BYTES "
                                        "(its upload held in the socket meanwhile; the oldest request in flight "
                                        "always gets room) before 503 overloaded")

    # --- hardening (docs/hardening.md) ------------------------------------------------------------
    max_uncompressed_bytes: Optional[int] = Field(
        None, ge=1024, description="what the archives and .npz files of one request may inflate to, by their "
                                   "declared sizes, checked before anything is inflated (413 payload_too_large); "
                                   "default: CALIB_MAX_EVAL_IMAGES uint8 images and their int64 labels")
    body_read_timeout_s: float = Field(
        60.0, gt=0, le=3600, description="a request body must arrive within this many seconds of the request "
                                         "start, else 408 request_timeout and the connection is closed")
    max_queued_predict_work: int = Field(
        1_048_576, ge=1, description="predict work admitted at once, in images x max(1, MC samples) over the "
                                     "requests in flight (512 images at T=1000 is 512,000); beyond: 503 "
                                     "overloaded + Retry-After (one request larger than this runs when "
                                     "nothing else is admitted)")
    docs_require_key: bool = Field(
        False, description="/docs, /redoc and /openapi.json need an API key too (needs CALIB_API_KEYS); "
                           "by default they stay open: the schema holds no secret and lets clients be "
                           "generated")

    # --- monitoring of what was served and labelled feedback (docs/monitoring.md) ----------------
    monitoring: bool = Field(
        True, description="record every predict answer (numbers only: confidence, entropy, class, OOD flag, set "
                          "size, probabilities and logits; never the image) for GET /v1/models/{name}/monitoring "
                          "and POST /v1/feedback; false: nothing is recorded, predictions carry no prediction_id "
                          "and those routes answer 409 monitoring_disabled")
    monitoring_retention: str = Field(
        "100000,30d", description="what the monitoring table keeps: at most this many predictions per model and "
                                  "version (a count), none older than a duration (e.g. 30d), or both "
                                  "comma-separated; applied by the writer every minute")
    monitoring_queue_rows: int = Field(
        20_000, ge=1, description="predictions waiting for the background writer; when full, predict drops the "
                                  "new rows (counted in calib_monitoring_rows_dropped) instead of waiting")
    monitoring_flush_rows: int = Field(500, ge=1, description="the writer inserts as soon as this many rows wait")
    monitoring_flush_s: float = Field(0.5, gt=0, le=60, description="... and at least this often")
    monitoring_window: int = Field(1000, ge=1, description="the default monitoring window: the last N predictions")
    monitoring_max_window: int = Field(
        100_000, ge=1, description="predictions one monitoring or timeline answer reads at most (a duration "
                                   "window keeps the newest)")
    monitoring_gauges_s: float = Field(
        30.0, ge=0, description="the writer recomputes the monitoring gauges of the card's calibration for the "
                                "models that served predictions this often (0: only when the endpoint is called)")
    drift_p_value: float = Field(
        0.01, gt=0, lt=1, description="family-wise p-value threshold of the drift tests (entropy KS, class-prior "
                                      "chi-square, OOD share), Bonferroni-split over the tests that ran")
    drift_psi: float = Field(0.2, gt=0, description="class-prior PSI at or above which a window is drift as well")
    drift_min_predictions: int = Field(
        200, ge=1, description="a window with fewer predictions never reports drift (too little to test)")
    alert_ece: float = Field(
        0.05, gt=0, lt=1, description="an alert when the ECE-15 of the window's labelled predictions exceeds this")
    alert_min_labelled: int = Field(
        100, ge=1, description="labelled predictions the window needs before an alert can fire (ECE on a few "
                               "labels is mostly noise)")

    @field_validator("monitoring_retention")
    @classmethod
    def _check_retention(cls, value):
        from service.durations import parse_retention

        parse_retention(value)
        return value

    @property
    def retention(self):
        """CALIB_MONITORING_RETENTION parsed (service.durations.Retention)."""
        from service.durations import parse_retention

        return parse_retention(self.monitoring_retention)

    @model_validator(mode="after")
    def _docs_key_needs_keys(self):
        if self.docs_require_key and not self._all_api_keys:
            raise ValueError("CALIB_DOCS_REQUIRE_KEY=true needs CALIB_API_KEYS or CALIB_API_KEYS_FILE")
        return self

    @property
    def uncompressed_cap(self) -> int:
        """CALIB_MAX_UNCOMPRESSED_BYTES, or its default tied to CALIB_MAX_EVAL_IMAGES."""
        if self.max_uncompressed_bytes is not None:
            return self.max_uncompressed_bytes
        return self.max_eval_images * (32 * 32 * 3 + 8) + 65_536  # + room for the .npy headers


def load_settings() -> Settings:
    """`Settings()` from the environment; a bad value is a UsageError naming the variable
    (pydantic's own report spans several lines and names the field, not the variable)."""
    import pydantic

    from commandline import UsageError

    try:
        return Settings()
    except pydantic.ValidationError as exc:
        raise UsageError("bad setting " + "; ".join(map(_setting_problem, exc.errors()))) from None


def _setting_problem(err: dict) -> str:
    """`CALIB_PORT='99999': <why>`; the value is shown only for a named field that holds no secret
    (an API-key field, or a whole-model check whose input is every setting, shows none)."""
    name = "_".join(map(str, err["loc"])).upper()
    if not name:
        return err["msg"]
    shown = "" if "KEY" in name else f"={err.get('input')!r}"
    return f"{ENV_PREFIX}{name}{shown}: {err['msg']}"
