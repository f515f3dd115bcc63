"""Sync and async clients of the calibration service (httpx only).

Both build the same requests (`_Call`) and read answers the same way (`_decode`); they differ
only in how the request is awaited. Error bodies become `ServiceError(status, code, message)`
(`AuthenticationError` for 401), carrying the server's request ID like the results do.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import httpx

from clients.payloads import Body, compare_body, evaluate_body, outputs_body, predict_body, scores_body
from clients.types import (
    AuthenticationError,
    CalibrationProfile,
    ComparisonReport,
    EvaluationReport,
    ModelInfo,
    OutputsReport,
    PredictResult,
    ServiceError,
    TransportError,
)

DEFAULT_URL = os.environ.get("CALIB_URL", "http://127.0.0.1:8000")
DEFAULT_TIMEOUT = 300.0
API_KEY_ENV = "CALIB_API_KEY"
REQUEST_ID_HEADER = "X-Request-ID"


def _auth_headers(api_key: Optional[str]) -> dict:
    """`api_key=None` -> the env CALIB_API_KEY (if set); "" -> send none."""
    key = os.environ.get(API_KEY_ENV) if api_key is None else api_key
    return {"Authorization": f"Bearer {key}"} if key else {}


@dataclass
class _Call:
    method: str
    path: str
    params: dict = field(default_factory=dict)
    body: Optional[Body] = None
    raw: bool = False                       # return bytes instead of decoded JSON
    parse: Callable[[Any], Any] = lambda d: d

    def kwargs(self) -> dict:
        params = {k: (str(v).lower() if isinstance(v, bool) else v)
                  for k, v in self.params.items() if v is not None}
        out = {"params": params}
        if self.body is not None:
            out.update(self.body.httpx_kwargs())
        return out


def _decode(call: _Call, response: httpx.Response, sent_key: bool = False) -> Any:
    request_id = response.headers.get(REQUEST_ID_HEADER)
    if response.status_code >= 400:
        try:
            err = response.json()["error"]
            if isinstance(err, str):   # /v2 answers errors in the protocol's {"error": "<message>"}
                err = {"code": f"http_{response.status_code}", "message": err}
            code, message, details = err["code"], err["message"], err.get("details")
            request_id = err.get("request_id") or request_id
        except (ValueError, KeyError, TypeError):
            code, message, details = (f"http_{response.status_code}",
                                      response.text[:500] or response.reason_phrase, None)
        if response.status_code == 401:
            message += ("; check the API key (CALIB_API_KEY, api_key=..., --api-key)" if sent_key else
                        "; the service needs an API key: set CALIB_API_KEY or pass api_key=... (--api-key)")
            raise AuthenticationError(401, code, message, details, request_id)
        raise ServiceError(response.status_code, code, message, details, request_id)
    if call.raw:
        return response.content
    result = call.parse(response.json())
    if dataclasses.is_dataclass(result) and any(f.name == "request_id" for f in dataclasses.fields(result)):
        result = dataclasses.replace(result, request_id=request_id)
    return result


def _set_params(coverage, conformal_method, mondrian) -> dict:
    """Query parameters of the conformal prediction sets (lists repeat the parameter)."""
    return {"coverage": coverage, "conformal_method": conformal_method, "mondrian": mondrian or None}


def _profiles(d: dict) -> list[CalibrationProfile]:
    return [CalibrationProfile.from_dict(p) for p in d["calibrations"]]


class _Calls:
    """Request builders shared by both clients."""

    model: Optional[str]

    def _name(self, model: Optional[str]) -> str:
        name = model or self.model
        if name is None:
            raise ValueError("no model name: pass model=... here or to the client")
        return name

    @staticmethod
    def _index_call(ready: Optional[bool]) -> _Call:
        return _Call("POST", "/v2/repository/index", body=Body(json={} if ready is None else {"ready": ready}))

    def _load_call(self, model: Optional[str], version) -> _Call:
        body = {} if version is None else {"parameters": {"version": str(version)}}
        return _Call("POST", f"/v2/repository/models/{self._name(model)}/load", body=Body(json=body))

    def _unload_call(self, model: Optional[str]) -> _Call:
        return _Call("POST", f"/v2/repository/models/{self._name(model)}/unload", body=Body(json={}))

    @staticmethod
    def _models_call() -> _Call:
        return _Call("GET", "/v1/models",
                     parse=lambda d: [ModelInfo.from_dict(m) for m in d["models"]])

    def _predict_call(self, images, model, mc_samples, seed, return_logits, resize, sets=None) -> _Call:
        return _Call("POST", f"/v1/models/{self._name(model)}/predict",
                     {"mc_samples": mc_samples, "seed": seed, "return_logits": return_logits or None,
                      "resize": resize or None, **(sets or {})},
                     predict_body(images), parse=PredictResult.from_dict)

    def _evaluate_call(self, x, y, model, bins, fit_temperature, resize, split, png,
                       target_accuracy=None, sets=None) -> _Call:
        """`png`: False (the JSON report), True (reliability diagram) or "risk_coverage_png"."""
        fmt = png if isinstance(png, str) else ("png" if png else None)
        return _Call("POST", f"/v1/models/{self._name(model)}/evaluate",
                     {"bins": bins, "fit_temperature": fit_temperature or None, "resize": resize or None,
                      "split": split, "format": fmt, "target_accuracy": target_accuracy, **(sets or {})},
                     evaluate_body(x, y), raw=bool(png), parse=EvaluationReport.from_dict)

    @staticmethod
    def _outputs_call(scores, y, probabilities, bins, fit_temperature, png, sets, seed) -> _Call:
        return _Call("POST", "/v1/calibration/evaluate",
                     {"bins": bins, "fit_temperature": fit_temperature or None, "format": "png" if png else None,
                      "seed": seed, **(sets or {})},
                     outputs_body(scores, y, probabilities=probabilities), raw=png, parse=OutputsReport.from_dict)

    def _compare_call(self, in_distribution, suspect, model, mc_samples, seed, resize, png,
                      calibration=None) -> _Call:
        return _Call("POST", f"/v1/models/{self._name(model)}/compare",
                     {"mc_samples": mc_samples, "seed": seed, "resize": resize or None,
                      "format": "png" if png else None, "calibration": calibration},
                     compare_body(in_distribution, suspect), raw=png, parse=ComparisonReport.from_dict)


    # --- recalibration profiles -----------------------------------------------------------
    def _profile_path(self, model: Optional[str], profile_id: Optional[str] = None) -> str:
        base = f"/v1/models/{self._name(model)}/calibrations" if model else "/v1/calibrations"
        return base if profile_id is None else f"{base}/{profile_id}"

    def _create_profile_call(self, x, y, model, method, label, folds, resize=False, split=None) -> _Call:
        return _Call("POST", self._profile_path(model),
                     {"method": method, "label": label, "folds": folds, "resize": resize or None, "split": split},
                     evaluate_body(x, y), parse=CalibrationProfile.from_dict)

    def _create_logits_profile_call(self, scores, y, probabilities, method, label, folds) -> _Call:
        return _Call("POST", "/v1/calibrations", {"method": method, "label": label, "folds": folds},
                     outputs_body(scores, y, probabilities=probabilities), parse=CalibrationProfile.from_dict)

    # --- monitoring and feedback -----------------------------------------------------------
    def _monitoring_call(self, model, window, calibration) -> _Call:
        return _Call("GET", f"/v1/models/{self._name(model)}/monitoring",
                     {"window": None if window is None else str(window), "calibration": calibration})

    def _timeline_call(self, model, bucket, buckets, calibration) -> _Call:
        return _Call("GET", f"/v1/models/{self._name(model)}/monitoring/timeline",
                     {"bucket": bucket, "buckets": buckets, "calibration": calibration})

    @staticmethod
    def _feedback_call(items) -> _Call:
        return _Call("POST", "/v1/feedback", body=Body(json={"feedback": [dict(item) for item in items]}))

    def _feedback_profile_call(self, model, method, label, folds, since) -> _Call:
        return _Call("POST", self._profile_path(model), {"from": "feedback", "since": since, "method": method,
                                                         "label": label, "folds": folds},
                     parse=CalibrationProfile.from_dict)

    def _apply_call(self, profile_id, scores, probabilities, sets) -> _Call:
        return _Call("POST", f"/v1/calibrations/{profile_id}/apply", dict(sets or {}),
                     scores_body(scores, probabilities=probabilities))


class CalibClient(_Calls):
    """Blocking client. `model` is the default model name (else the only/first loaded one);
    `api_key` is sent as a bearer token (default: the env CALIB_API_KEY; "" sends none)."""

    def __init__(self, base_url: str = DEFAULT_URL, *, model: Optional[str] = None,
                 timeout: float = DEFAULT_TIMEOUT, transport: Optional[httpx.BaseTransport] = None,
                 api_key: Optional[str] = None):
        headers = _auth_headers(api_key)
        self._http = httpx.Client(base_url=base_url, timeout=timeout, transport=transport, headers=headers)
        self._sent_key = bool(headers)
        self.model = model
        self.last_request_id: Optional[str] = None  # X-Request-ID of the latest answer

    def _do(self, call: _Call) -> Any:
        try:
            response = self._http.request(call.method, call.path, **call.kwargs())
        except httpx.TransportError as exc:
            raise TransportError(f"{call.method} {call.path}: {exc!r}") from exc
        self.last_request_id = response.headers.get(REQUEST_ID_HEADER)
        return _decode(call, response, self._sent_key)

    def live(self) -> dict:
        return self._do(_Call("GET", "/health/live"))

    def ready(self) -> dict:
        return self._do(_Call("GET", "/health/ready"))

    def models(self) -> list[ModelInfo]:
        infos = self._do(self._models_call())
        if self.model is None and infos:
            self.model = infos[0].name
        return infos

    def card(self, model: Optional[str] = None) -> dict:
        return self._do(_Call("GET", f"/v1/models/{self._resolve(model)}"))

    def _resolve(self, model: Optional[str]) -> str:
        if model is None and self.model is None:
            self.models()
        return self._name(model)

    def predict(self, images, *, model: Optional[str] = None, mc_samples: Optional[int] = None,
                seed: Optional[int] = None, return_logits: bool = False, resize: bool = False,
                coverage: Optional[float] = None, conformal_method: Optional[str] = None,
                mondrian: bool = False, calibration: Optional[str] = None) -> PredictResult:
        """`coverage` in (0, 1): each prediction carries its conformal `prediction_set`. `calibration`: a
        profile's id, used instead of the card's temperature."""
        return self._do(self._predict_call(images, self._resolve(model), mc_samples, seed, return_logits, resize,
                                           {**_set_params(coverage, conformal_method, mondrian),
                                            "calibration": calibration}))

    def evaluate(self, x, y=None, *, model: Optional[str] = None, bins: Optional[int] = None,
                 fit_temperature: bool = False, resize: bool = False, split: Optional[str] = None,
                 target_accuracy: Optional[float] = None, coverage=None, conformal_method=None,
                 mondrian: bool = False, calibration: Optional[str] = None) -> EvaluationReport:
        """`target_accuracy` in (0, 1]: `report.selective.target` holds the confidence threshold.
        `coverage` (one level or a list): `report.conformal` measures the prediction sets on this batch.
        `calibration`: a profile's id (`report.raw["after_calibration"]`)."""
        return self._do(self._evaluate_call(x, y, self._resolve(model), bins, fit_temperature, resize, split, False,
                                            target_accuracy, {**_set_params(coverage, conformal_method, mondrian),
                                                              "calibration": calibration}))

    def calibrate_evaluate(self, scores, y=None, *, probabilities: bool = False, bins: Optional[int] = None,
                           fit_temperature: bool = False, coverage=None, conformal_method=None,
                           mondrian: bool = False, seed: Optional[int] = None) -> OutputsReport:
        """Calibration report of any classifier's outputs: an .npz path (`logits` or `probs`, and `y`),
        or arrays / nested lists [N, K] with labels `y`. `coverage`: split conformal on the batch."""
        return self._do(self._outputs_call(scores, y, probabilities, bins, fit_temperature, False,
                                           _set_params(coverage, conformal_method, mondrian), seed))

    def calibration_diagram(self, scores, y=None, *, probabilities: bool = False, bins: Optional[int] = None,
                            fit_temperature: bool = False) -> bytes:
        """PNG reliability diagram of any classifier's outputs (and at the fitted T, if asked)."""
        return self._do(self._outputs_call(scores, y, probabilities, bins, fit_temperature, True, None, None))

    def reliability_diagram(self, x, y=None, *, model: Optional[str] = None, bins: Optional[int] = None,
                            resize: bool = False, split: Optional[str] = None) -> bytes:
        return self._do(self._evaluate_call(x, y, self._resolve(model), bins, False, resize, split, True))

    def risk_coverage_diagram(self, x, y=None, *, model: Optional[str] = None, resize: bool = False,
                              split: Optional[str] = None, target_accuracy: Optional[float] = None) -> bytes:
        """PNG of the risk-coverage curve (with the threshold for `target_accuracy`, if given)."""
        return self._do(self._evaluate_call(x, y, self._resolve(model), None, False, resize, split,
                                            "risk_coverage_png", target_accuracy))

    def compare(self, in_distribution, suspect, *, model: Optional[str] = None, mc_samples: Optional[int] = None,
                seed: Optional[int] = None, resize: bool = False,
                calibration: Optional[str] = None) -> ComparisonReport:
        """AUROC/AUPR/FPR@95 of each uncertainty score between two unlabelled batches (each: paths,
        a folder of images, PNG/JPEG bytes, a NumPy array [N,32,32,3], or nested lists).
        `calibration`: a profile's id, for the scores instead of the card's temperature."""
        return self._do(self._compare_call(in_distribution, suspect, self._resolve(model), mc_samples, seed,
                                           resize, False, calibration))

    def ood_histogram(self, in_distribution, suspect, *, model: Optional[str] = None,
                      mc_samples: Optional[int] = None, seed: Optional[int] = None, resize: bool = False) -> bytes:
        """PNG: histograms of the scores of both batches."""
        return self._do(self._compare_call(in_distribution, suspect, self._resolve(model), mc_samples, seed,
                                           resize, True))

    def create_calibration(self, x, y=None, *, model: Optional[str] = None, method: Optional[str] = None,
                           label: Optional[str] = None, folds: Optional[int] = None, resize: bool = False,
                           split: Optional[str] = None) -> CalibrationProfile:
        """Fit and store a recalibration profile of the model on a labelled batch (any form evaluate takes)."""
        return self._do(self._create_profile_call(x, y, self._resolve(model), method, label, folds, resize, split))

    def create_logits_calibration(self, scores, y=None, *, probabilities: bool = False, method: Optional[str] = None,
                                  label: Optional[str] = None, folds: Optional[int] = None) -> CalibrationProfile:
        """A model-independent profile from any classifier's labelled logits (or probabilities)."""
        return self._do(self._create_logits_profile_call(scores, y, probabilities, method, label, folds))

    def calibrations(self, *, model: Optional[str] = None) -> list[CalibrationProfile]:
        """A model's profiles, or (model=None) the model-independent ones."""
        return self._do(_Call("GET", self._profile_path(model), parse=_profiles))

    def calibration(self, profile_id: str, *, model: Optional[str] = None) -> CalibrationProfile:
        return self._do(_Call("GET", self._profile_path(model, profile_id), parse=CalibrationProfile.from_dict))

    def delete_calibration(self, profile_id: str, *, model: Optional[str] = None) -> None:
        self._do(_Call("DELETE", self._profile_path(model, profile_id), raw=True))

    def apply_calibration(self, profile_id: str, scores, *, probabilities: bool = False,
                          coverage: Optional[float] = None, conformal_method: Optional[str] = None,
                          mondrian: bool = False) -> dict:
        """Calibrated probabilities (and prediction sets with `coverage`) of logits under a profile."""
        return self._do(self._apply_call(profile_id, scores, probabilities,
                                         _set_params(coverage, conformal_method, mondrian)))

    def repository_index(self, *, ready: Optional[bool] = None) -> list[dict]:
        """Every model version on disk: [{"name", "version", "state", "reason"}] (admin key)."""
        return self._do(self._index_call(ready))

    def load_model(self, model: Optional[str] = None, *, version=None) -> dict:
        """Load (or re-load) a model from disk, or one `version` of it (a roll-back; admin key):
        {"name", "serving", "versions"}. ServiceError 409 when it fails to load (the old one serves)."""
        return self._do(self._load_call(model, version))

    def unload_model(self, model: Optional[str] = None) -> dict:
        """Stop serving every version of a model (admin key)."""
        return self._do(self._unload_call(model))

    def monitoring(self, *, model: Optional[str] = None, window=None, calibration: Optional[str] = None) -> dict:
        """The monitoring verdict (docs/monitoring.md); `window`: a count (500) or a duration ("15m")."""
        return self._do(self._monitoring_call(self._resolve(model), window, calibration))

    def monitoring_timeline(self, *, model: Optional[str] = None, bucket: Optional[int] = None,
                            buckets: Optional[int] = None, calibration: Optional[str] = None) -> dict:
        return self._do(self._timeline_call(self._resolve(model), bucket, buckets, calibration))

    def feedback(self, items) -> dict:
        """True labels of earlier predictions: dicts {"prediction_id", "label"} or {"request_id", "index",
        "label"}; all or nothing (ServiceError 404 unknown_prediction / 409 feedback_exists / 422)."""
        return self._do(self._feedback_call(items))

    def create_calibration_from_feedback(self, *, model: Optional[str] = None, method: Optional[str] = None,
                                         label: Optional[str] = None, folds: Optional[int] = None,
                                         since: Optional[str] = None) -> CalibrationProfile:
        """A profile fitted on the predictions that got labels through feedback (admin key)."""
        return self._do(self._feedback_profile_call(self._resolve(model), method, label, folds, since))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "CalibClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncCalibClient(_Calls):
    """The same API for asyncio: `await client.predict(...)`."""

    def __init__(self, base_url: str = DEFAULT_URL, *, model: Optional[str] = None,
                 timeout: float = DEFAULT_TIMEOUT, transport: Optional[httpx.AsyncBaseTransport] = None,
                 api_key: Optional[str] = None):
        headers = _auth_headers(api_key)
        self._http = httpx.AsyncClient(base_url=base_url, timeout=timeout, transport=transport, headers=headers)
        self._sent_key = bool(headers)
        self.model = model
        self.last_request_id: Optional[str] = None  # X-Request-ID of the latest answer

    async def _do(self, call: _Call) -> Any:
        try:
            response = await self._http.request(call.method, call.path, **call.kwargs())
        except httpx.TransportError as exc:
            raise TransportError(f"{call.method} {call.path}: {exc!r}") from exc
        self.last_request_id = response.headers.get(REQUEST_ID_HEADER)  # racy under concurrency:
        return _decode(call, response, self._sent_key)                  # results carry their own

    async def live(self) -> dict:
        return await self._do(_Call("GET", "/health/live"))

    async def ready(self) -> dict:
        return await self._do(_Call("GET", "/health/ready"))

    async def models(self) -> list[ModelInfo]:
        infos = await self._do(self._models_call())
        if self.model is None and infos:
            self.model = infos[0].name
        return infos

    async def _resolve(self, model: Optional[str]) -> str:
        if model is None and self.model is None:
            await self.models()
        return self._name(model)

    async def card(self, model: Optional[str] = None) -> dict:
        return await self._do(_Call("GET", f"/v1/models/{await self._resolve(model)}"))

    async def calibrate_evaluate(self, scores, y=None, *, probabilities: bool = False, bins: Optional[int] = None,
                                 fit_temperature: bool = False, coverage=None, conformal_method=None,
                                 mondrian: bool = False, seed: Optional[int] = None) -> OutputsReport:
        return await self._do(self._outputs_call(scores, y, probabilities, bins, fit_temperature, False,
                                                 _set_params(coverage, conformal_method, mondrian), seed))

    async def predict(self, images, *, model: Optional[str] = None, mc_samples: Optional[int] = None,
                      seed: Optional[int] = None, return_logits: bool = False, resize: bool = False,
                      coverage: Optional[float] = None, conformal_method: Optional[str] = None,
                      mondrian: bool = False, calibration: Optional[str] = None) -> PredictResult:
        name = await self._resolve(model)
        return await self._do(self._predict_call(images, name, mc_samples, seed, return_logits, resize,
                                                 {**_set_params(coverage, conformal_method, mondrian),
                                                  "calibration": calibration}))

    async def evaluate(self, x, y=None, *, model: Optional[str] = None, bins: Optional[int] = None,
                       fit_temperature: bool = False, resize: bool = False,
                       split: Optional[str] = None, target_accuracy: Optional[float] = None,
                       coverage=None, conformal_method=None, mondrian: bool = False,
                       calibration: Optional[str] = None) -> EvaluationReport:
        name = await self._resolve(model)
        return await self._do(self._evaluate_call(x, y, name, bins, fit_temperature, resize, split, False,
                                                  target_accuracy, {**_set_params(coverage, conformal_method, mondrian),
                                                                    "calibration": calibration}))

    async def reliability_diagram(self, x, y=None, *, model: Optional[str] = None, bins: Optional[int] = None,
                                  resize: bool = False, split: Optional[str] = None) -> bytes:
        name = await self._resolve(model)
        return await self._do(self._evaluate_call(x, y, name, bins, False, resize, split, True))

    async def risk_coverage_diagram(self, x, y=None, *, model: Optional[str] = None, resize: bool = False,
                                    split: Optional[str] = None, target_accuracy: Optional[float] = None) -> bytes:
        name = await self._resolve(model)
        return await self._do(self._evaluate_call(x, y, name, None, False, resize, split,
                                                  "risk_coverage_png", target_accuracy))

    async def compare(self, in_distribution, suspect, *, model: Optional[str] = None,
                      mc_samples: Optional[int] = None, seed: Optional[int] = None,
                      resize: bool = False, calibration: Optional[str] = None) -> ComparisonReport:
        name = await self._resolve(model)
        return await self._do(self._compare_call(in_distribution, suspect, name, mc_samples, seed, resize, False,
                                                 calibration))

    async def ood_histogram(self, in_distribution, suspect, *, model: Optional[str] = None,
                            mc_samples: Optional[int] = None, seed: Optional[int] = None,
                            resize: bool = False) -> bytes:
        name = await self._resolve(model)
        return await self._do(self._compare_call(in_distribution, suspect, name, mc_samples, seed, resize, True))

    async def create_calibration(self, x, y=None, *, model: Optional[str] = None, method: Optional[str] = None,
                                 label: Optional[str] = None, folds: Optional[int] = None, resize: bool = False,
                                 split: Optional[str] = None) -> CalibrationProfile:
        name = await self._resolve(model)
        return await self._do(self._create_profile_call(x, y, name, method, label, folds, resize, split))

    async def create_logits_calibration(self, scores, y=None, *, probabilities: bool = False,
                                        method: Optional[str] = None, label: Optional[str] = None,
                                        folds: Optional[int] = None) -> CalibrationProfile:
        return await self._do(self._create_logits_profile_call(scores, y, probabilities, method, label, folds))

    async def calibrations(self, *, model: Optional[str] = None) -> list[CalibrationProfile]:
        return await self._do(_Call("GET", self._profile_path(model), parse=_profiles))

    async def calibration(self, profile_id: str, *, model: Optional[str] = None) -> CalibrationProfile:
        return await self._do(_Call("GET", self._profile_path(model, profile_id), parse=CalibrationProfile.from_dict))

    async def delete_calibration(self, profile_id: str, *, model: Optional[str] = None) -> None:
        await self._do(_Call("DELETE", self._profile_path(model, profile_id), raw=True))

    async def apply_calibration(self, profile_id: str, scores, *, probabilities: bool = False,
                                coverage: Optional[float] = None, conformal_method: Optional[str] = None,
                                mondrian: bool = False) -> dict:
        return await self._do(self._apply_call(profile_id, scores, probabilities,
                                               _set_params(coverage, conformal_method, mondrian)))

    async def repository_index(self, *, ready: Optional[bool] = None) -> list[dict]:
        return await self._do(self._index_call(ready))

    async def load_model(self, model: Optional[str] = None, *, version=None) -> dict:
        return await self._do(self._load_call(model, version))

    async def unload_model(self, model: Optional[str] = None) -> dict:
        return await self._do(self._unload_call(model))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncCalibClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()
