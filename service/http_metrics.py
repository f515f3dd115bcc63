"""Prometheus metrics, one CollectorRegistry per app (so several apps can live in one process,
as they do in the tests) and a pure-ASGI middleware that counts and times every request.

With several server processes (CALIB_WORKERS > 1, service.workers) the values live in
prometheus-client's multiprocess files and a scrape sums every worker's, whichever worker answers.

Every label takes its value from a bounded set, so no client can add series: the route template
(`/v1/models/{name}/predict`, or "unmatched"), never the raw path; the model label only names
loaded models; the method is one of METHODS (else "other"); the status is a 3-digit code.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

disable_created_metrics()  # no *_created series: they double the scrape for no use here

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# The stages of `calib_predict_stage_seconds`, in the order a predict request goes through them.
# What the whole request took minus their sum is the framework's share: middleware, routing,
# query validation, response validation and JSON encoding (FastAPI), and the write.
PREDICT_STAGES = {
    "read_body": "receive the body and parse it as JSON (or multipart)",
    "decode": "JSON instances / uploaded files to a uint8 array",
    "batch_queue": "queued in the micro-batcher until its shared backbone pass starts",
    "backbone": "the shared backbone pass, from its submission to the executor until it returns",
    "wakeup": "from the end of the backbone pass until the request's coroutine runs again (event loop lag)",
    "head_mc": "this request's head and MC dropout in the executor, with its wait for a thread",
    "unbatched": "the whole model call in the executor, for a request the micro-batcher does not take",
    "respond": "the response dict built from the arrays",
}


def multiprocess_dir() -> str | None:
    """The multiprocess directory prometheus_client writes to (it reads the variable at import)."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


_LIVE_GAUGE_FILE = re.compile(r"^gauge_live\w*?_(\d+)\.db$")


def forget_dead_processes(path: str) -> None:
    """mark_process_dead for every worker whose live-gauge file outlived it: a worker that
    exits cleanly does it itself (ServiceMetrics.close), one that crashed (and that uvicorn
    replaced) cannot. POSIX only (os.kill(pid, 0) would kill the process on Windows)."""
    if os.name != "posix":
        return
    for file in Path(path).glob("gauge_live*.db"):
        match = _LIVE_GAUGE_FILE.match(file.name)
        if match is None:
            continue
        pid = int(match.group(1))
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            mark_process_dead(pid, path)
        except PermissionError:
            pass  # alive, someone else's


class ServiceMetrics:
    def __init__(self) -> None:
        self.multiprocess_dir = multiprocess_dir()
        self._watched: list[tuple[Gauge, object]] = []
        self._watched_extra: list[tuple[Gauge, object]] = []   # watch(): gauges other than admission's
        self.registry = CollectorRegistry()
        self.in_flight = 0   # HTTP requests between MetricsMiddleware's entry and exit (this process)
        r = self.registry
        self.requests = Counter("calib_http_requests", "HTTP requests by endpoint, model, method and status",
                                ["endpoint", "model", "method", "status"], registry=r)
        self.latency = Histogram("calib_http_request_duration_seconds", "Request latency by endpoint and model",
                                 ["endpoint", "model"], buckets=LATENCY_BUCKETS, registry=r)
        self.errors = Counter("calib_http_errors", "Error responses by endpoint, status and error code",
                              ["endpoint", "status", "code"], registry=r)
        self.images = Counter("calib_images_scored", "Images run through a model",
                              ["model", "endpoint"], registry=r)
        self.mc_samples = Counter("calib_mc_samples_drawn", "MC dropout samples drawn (T x images)",
                                  ["model"], registry=r)
        self.batch_images = Histogram("calib_predict_batch_images",
                                      "Images per shared backbone pass of the predict micro-batcher",
                                      ["model"], buckets=BATCH_BUCKETS, registry=r)
        self.batch_requests = Histogram("calib_predict_batch_requests",
                                        "Requests per shared backbone pass of the predict micro-batcher",
                                        ["model"], buckets=BATCH_BUCKETS, registry=r)
        self.predict_stage = Histogram("calib_predict_stage_seconds",
                                       "Where a predict request's time goes, by stage (PREDICT_STAGES)",
                                       ["model", "stage"], buckets=STAGE_BUCKETS, registry=r)
        # per worker (a `pid` label when there are several): each worker loads the models itself
        self.models_loaded = Gauge("calib_models_loaded", "Models in the registry", registry=r,
                                   multiprocess_mode="liveall")
        self.load_failures = Gauge("calib_model_load_failures", "Artifacts skipped at startup", registry=r,
                                   multiprocess_mode="liveall")
        # admission control (service.admission_limits); the gauges read the live limiter state at scrape time
        # (summed over the live workers when there are several)
        self.evaluations_in_flight = Gauge("calib_evaluations_in_flight", "Evaluations holding a slot",
                                           registry=r, multiprocess_mode="livesum")
        self.evaluations_queued = Gauge("calib_evaluations_queued", "Evaluations waiting for a slot",
                                        registry=r, multiprocess_mode="livesum")
        self.buffered_bytes = Gauge("calib_buffered_bytes_reserved",
                                    "Bytes of the request-memory budget reserved by requests in flight",
                                    registry=r, multiprocess_mode="livesum")
        self.admission_rejections = Counter("calib_admission_rejections",
                                            "Requests refused with 503 overloaded, by reason "
                                            "(queue_full, queue_timeout, byte_budget)", ["reason"], registry=r)

        # monitoring (service.monitoring_writer, service.monitoring): what was recorded and dropped,
        # and the latest verdict per model, version and calibration (the card's: "card"; else a
        # profile id, bounded by CALIB_MAX_CALIBRATIONS)
        self.monitoring_recorded = Counter("calib_monitoring_rows_recorded", "Served predictions written to the "
                                           "monitoring table", ["model"], registry=r)
        self.monitoring_dropped = Counter("calib_monitoring_rows_dropped", "Served predictions not recorded, by "
                                          "reason (queue_full, storage_unavailable)", ["reason"], registry=r)
        self.monitoring_queue = Gauge("calib_monitoring_queue_rows", "Predictions waiting for the monitoring "
                                      "writer", registry=r, multiprocess_mode="livesum")
        labels = ["model", "version", "calibration"]
        gauge = lambda name, doc: Gauge(name, doc, labels, registry=r, multiprocess_mode="mostrecent")  # noqa: E731
        self.monitoring_gauges = {
            "predictions": gauge("calib_monitoring_window_predictions", "Predictions in the monitoring window"),
            "estimated_accuracy": gauge("calib_monitoring_estimated_accuracy",
                                        "Mean calibrated confidence of the window (CBPE accuracy estimate)"),
            "ood_share": gauge("calib_monitoring_ood_share", "Share of the window flagged out of distribution"),
            "entropy_ks_statistic": gauge("calib_monitoring_entropy_ks_statistic",
                                          "KS statistic of the window's entropies against the validation split"),
            "entropy_ks_p_value": gauge("calib_monitoring_entropy_ks_p_value", "p-value of that KS test"),
            "class_prior_psi": gauge("calib_monitoring_class_prior_psi",
                                     "PSI of the predicted-class mix against the validation split"),
            "drift": gauge("calib_monitoring_drift", "1 when the window's drift verdict is true"),
            "labelled": gauge("calib_monitoring_labelled", "Labelled predictions in the window"),
            "observed_accuracy": gauge("calib_monitoring_observed_accuracy", "Accuracy of the labelled predictions"),
            "ece_15": gauge("calib_monitoring_ece_15", "ECE-15 of the labelled predictions"),
            "alert": gauge("calib_monitoring_alert", "1 when the labelled ECE is over CALIB_ALERT_ECE"),
        }

    def observe_monitoring(self, model: str, version: str, calibration: str, report: dict) -> None:
        """Set the monitoring gauges from a monitoring answer's figures (None leaves a gauge as is)."""
        def number(*path):
            value = report
            for key in path:
                if value is None:
                    return None
                value = value.get(key)
            return None if value is None else float(value)

        figures = {"predictions": number("window", "predictions"),
                   "estimated_accuracy": number("estimated_accuracy", "value"),
                   "ood_share": number("ood", "share"),
                   "entropy_ks_statistic": number("entropy_drift", "statistic"),
                   "entropy_ks_p_value": number("entropy_drift", "p_value"),
                   "class_prior_psi": number("class_prior_drift", "psi"),
                   "drift": number("drift", "status"), "labelled": number("labelled", "n"),
                   "observed_accuracy": number("labelled", "accuracy"), "ece_15": number("labelled", "ece_15"),
                   "alert": number("alert", "status")}
        for name, value in figures.items():
            if value is not None:
                self.monitoring_gauges[name].labels(model, version, calibration).set(value)

    def observe_batch(self, model: str, images: int, requests: int) -> None:
        self.batch_images.labels(model).observe(images)
        self.batch_requests.labels(model).observe(requests)

    def observe_stage(self, model: str, stage: str, seconds: float) -> None:
        self.predict_stage.labels(model, stage).observe(seconds)

    def watch_admission(self, gate, budget) -> None:
        self._watched = [(self.evaluations_in_flight, lambda: gate.in_flight),
                         (self.evaluations_queued, lambda: gate.waiting),
                         (self.buffered_bytes, lambda: budget.used)]
        for gauge, read in self._watched:
            gauge.set_function(read)

    def watch(self, gauge: Gauge, read) -> None:
        """`gauge` reads `read()` at scrape time (copied to the shared files with several workers)."""
        self._watched_extra.append((gauge, read))
        gauge.set_function(read)

    async def publish_live_gauges(self, period_s: float = 1.0) -> None:
        """With several workers, copy the function gauges into the shared files every period:
        a scrape reads the files, and another worker cannot call this one's functions."""
        while True:
            for gauge, read in self._watched + self._watched_extra:
                gauge.set(read())
            await asyncio.sleep(period_s)

    def render(self) -> tuple[bytes, str]:
        if self.multiprocess_dir is None:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        forget_dead_processes(self.multiprocess_dir)
        registry = CollectorRegistry()  # a fresh one per scrape, as prometheus-client documents
        MultiProcessCollector(registry, path=self.multiprocess_dir)
        return generate_latest(registry), CONTENT_TYPE_LATEST

    def close(self) -> None:
        """The worker is stopping: its live gauges leave the sums (its counters stay counted)."""
        if self.multiprocess_dir is not None:
            mark_process_dead(os.getpid(), self.multiprocess_dir)


METHODS = frozenset({"GET", "POST", "HEAD", "OPTIONS"})


def method_label(scope) -> str:
    """The HTTP method if it is one the API uses, else "other" (uvicorn accepts any token)."""
    method = scope.get("method", "")
    return method if method in METHODS else "other"


def status_label(status: int) -> str:
    return str(status) if 100 <= status <= 599 else "other"


def endpoint_label(scope) -> str:
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"


def model_label(scope, known) -> str:
    name = (scope.get("path_params") or {}).get("name")
    if name is None:
        return ""
    return name if name in known else "unknown"


class MetricsMiddleware:
    """Counts and times requests; the model registry is looked up per request (it is created
    by the lifespan, after the middleware)."""

    def __init__(self, app, fastapi_app) -> None:
        self.app = app
        self.fastapi_app = fastapi_app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        metrics: ServiceMetrics = self.fastapi_app.state.metrics
        started = time.perf_counter()
        status = {"code": 500}
        metrics.in_flight += 1   # the event loop's own counter: read by service.rest.requests.off_loop

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            metrics.in_flight -= 1
            registry = getattr(self.fastapi_app.state, "registry", None)
            known = registry.models if registry is not None else {}
            endpoint, model = endpoint_label(scope), model_label(scope, known)
            metrics.requests.labels(endpoint, model, method_label(scope), status_label(status["code"])).inc()
            metrics.latency.labels(endpoint, model).observe(time.perf_counter() - started)
