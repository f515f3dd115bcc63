"""Service settings, read from the environment (prefix ``CALIB_``) by pydantic-settings.

Defaults make ``python -m service`` work on a fresh checkout or install: the model directory
is resolved relative to the installed packages, never the working directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

from pydantic import Field, PrivateAttr, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.api_keys import check_keys, read_key_file, split_keys

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

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_api_keys(cls, value):
        return split_keys(value)

    @model_validator(mode="after")
    def _load_api_keys(self):
        keys = check_keys(self.api_keys, "CALIB_API_KEYS")
        if self.api_keys_file is not None:
            keys += read_key_file(self.api_keys_file)
        if self.metrics_require_key and not keys:
            raise ValueError("CALIB_METRICS_REQUIRE_KEY=true needs CALIB_API_KEYS or CALIB_API_KEYS_FILE")
        self._all_api_keys = tuple(keys)
        return self

    @property
    def all_api_keys(self) -> tuple[SecretStr, ...]:
        """The keys of CALIB_API_KEYS and CALIB_API_KEYS_FILE together (empty: authentication off)."""
        return self._all_api_keys

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
    warmup: bool = Field(True, description="trace the model functions once at startup")
    gc_freeze: bool = Field(
        True, description="after loading the models, exclude every object alive then from the cyclic GC "
                          "(gc.freeze): full collections stop re-scanning the ~400k TensorFlow/Keras "
                          "objects, which otherwise pause the server for 0.2-0.4 s at a time under load")

    # --- admission control (service.admission): bound the heavy work and the buffered bytes ---
    max_concurrent_evaluations: int = Field(
        1, ge=1, description="evaluate requests that run at once. 1 on this 2-core service: one evaluation "
                             "already keeps both cores busy (TensorFlow spreads each forward pass over them), "
                             "so a second would add its memory (~2x its upload) but no throughput, and it "
                             "would take the second inference thread that predict requests use")
    evaluation_queue: int = Field(
        32, ge=0, description="evaluate requests that may wait for a slot; their bodies stay unread while "
                              "they wait, so a place costs no memory and the queue only bounds waiting (with "
                              "the timeout); beyond that: 503 overloaded + Retry-After")
    evaluation_queue_timeout_s: float = Field(
        30.0, gt=0, description="how long an evaluate request may wait in the queue before 503 overloaded")
    max_buffered_bytes: int = Field(
        512 * 1024 * 1024, ge=1024,
        description="memory budget for the requests in flight, charged from the body size as the request "
                    "will hold it: JSON 8x (parsed pixel lists), other bodies 2x (upload + decoded arrays). "
                    "Over budget: 503 overloaded + Retry-After (a request larger than the whole budget still "
                    "runs when nothing else is buffered)")
