"""/v1/models: model cards, predict and evaluate. HTTP in, arrays to the dataplane, JSON out."""

from __future__ import annotations

import secrets
import time
from typing import Literal, Optional

from fastapi import APIRouter, Path, Query, Request, Response

from service import card_diagram, dataplane, inputs, prediction_sets
from service.rest import calibrations, monitoring
from service.rest.errors import error_responses
from service.rest.requests import (
    charge_uncompressed,
    in_thread,
    model_of,
    off_loop,
    on_model_executor,
    read_payload,
    registry_of,
    run_predict,
    settings_of,
    upload_limits,
)
from service.schemas import (
    COMPARE_BODY,
    EVALUATE_BODY,
    PNG_CONTENT,
    PREDICT_BODY,
    CompareResponse,
    EvaluateResponse,
    ModelCard,
    ModelList,
    PredictResponse,
)

# Error statuses every /v1 route can answer with; the routes add their own below.
V1_ERRORS = (503,)
BODY_ERRORS = (400, 404, 413, 415, 422)  # the routes that read a request body

router = APIRouter(prefix="/v1/models", tags=["models"], responses=error_responses(*V1_ERRORS))

ModelName = Path(description="a model's name, as listed by GET /v1/models", examples=["cifar10-resnet"])


def _summary(model, versions: list[str]) -> dict:
    card = model.card
    return {"name": model.name, "version": model.version, "loaded_versions": versions,
            "classes": model.classes, "temperature": model.temperature,
            "input": card.get("input", {}), "mc_dropout": card.get("mc_dropout"),
            "metrics": card.get("metrics", {}), "ood_threshold": dataplane.ood_threshold(model),
            "runtime": model.runtime}


@router.get("", response_model=ModelList, summary="Loaded models and their calibration metrics")
async def list_models(request: Request) -> dict:
    registry = registry_of(request)
    return {"models": [_summary(registry.get(n), registry.versions_of(n)) for n in registry.names()]}


@router.get("/{name}", response_model=ModelCard, summary="A model's card", responses=error_responses(404, 422))
async def get_model(request: Request, name: str = ModelName) -> dict:
    model = model_of(request, name)
    return {**model.card, "name": model.name, "version": model.version,
            "ood_threshold": dataplane.ood_threshold(model),
            "runtime": model.runtime}


@router.get("/{name}/reliability.png", response_class=Response,
            summary="The model's reliability diagram on its test split, from its card",
            description="Before and after the card's temperature, redrawn from the reliability bins training "
                        "recorded in the card (`metrics.test_before_temperature` / `test_after_temperature`): no "
                        "data is uploaded and nothing is inferred. 404 `diagram_unavailable` when the card has "
                        "no such bins.",
            responses={**error_responses(404, 422),
                       200: {"content": PNG_CONTENT, "description": "the reliability diagram (PNG)"}})
async def card_reliability_diagram(request: Request, name: str = ModelName) -> Response:
    model = model_of(request, name)
    try:
        png = await in_thread(card_diagram.card_reliability_png, model.name, model.card)
    except card_diagram.DiagramUnavailable as exc:
        raise inputs.InputError("diagram_unavailable", str(exc), 404) from exc
    return Response(png, media_type="image/png",
                    headers={"Content-Disposition": f'inline; filename="reliability-{model.name}-card.png"',
                             "Cache-Control": "private, max-age=300"})


@router.post("/{name}/predict", response_model=PredictResponse,
             responses={**error_responses(*BODY_ERRORS), **calibrations.USE_ERRORS},
             openapi_extra=PREDICT_BODY, summary="Calibrated class probabilities with MC-dropout uncertainty")
async def predict(
    request: Request,
    name: str = ModelName,
    mc_samples: Optional[int] = Query(None, description="MC dropout samples T (0 = none); default 100"),
    seed: Optional[int] = Query(None, description="seed of the dropout masks (random if omitted)"),
    return_logits: bool = Query(False, description="also return raw logits and uncalibrated probabilities"),
    resize: bool = Query(False, description="resize encoded images that are not 32x32 RGB"),
    coverage: Optional[float] = Query(None, description="conformal prediction sets at this coverage, 0 < c < 1 "
                                                        "(docs/conformal.md)"),
    conformal_method: Optional[Literal["lac", "aps", "raps"]] = Query(
        None, description="the sets' non-conformity score (default lac); needs coverage"),
    mondrian: bool = Query(False, description="class-conditional (Mondrian) sets; needs coverage"),
    calibration: Optional[str] = Query(None, description="a calibration profile's id: use it instead of the "
                                                         "card's temperature (probabilities, MC samples, OOD "
                                                         "entropy, and the sets from its own conformal calibration)"),
) -> dict:
    settings = settings_of(request)
    model = model_of(request, name)
    profile = await calibrations.profile_for(request, model, calibration)
    set_options = prediction_sets.set_options(coverage, conformal_method, mondrian)
    conformal_set = None if set_options is None else calibrations.conformal_of(model, profile)
    t = inputs.check_mc_samples(settings.default_mc_samples if mc_samples is None else mc_samples,
                                settings.max_mc_samples)
    seed = inputs.check_seed(seed)
    if seed is None and t > 0:
        seed = secrets.randbelow(2**31 - 1)
    metrics = request.app.state.metrics
    started = time.perf_counter()
    payload = await read_payload(request, max_files=settings.max_instances)
    read = time.perf_counter()
    if payload.json is not None:
        x = await off_loop(request, payload.body_bytes, inputs.instances_from_json, payload.json, resize=resize,
                           max_instances=settings.max_instances)
    else:
        await charge_uncompressed(request, payload.files)
        x = await in_thread(inputs.images_from_files, payload.files, resize=resize,
                            limits=upload_limits(settings, settings.max_instances))
    decoded = time.perf_counter()
    result = await run_predict(request, model, x, mc_samples=t, seed=seed,
                               calibrator=None if profile is None else profile.calibrator)
    metrics.images.labels(model.name, "predict").inc(len(x))
    metrics.mc_samples.labels(model.name).inc(t * len(x))
    predicted = time.perf_counter()
    ood = dataplane.ood_flags(model, result.probabilities)
    body = _predict_body(model, result, t, return_logits, ood)
    body["calibration"] = calibrations.used(model, profile)
    mask = None
    if set_options is not None:
        mask = prediction_sets.sets(conformal_set, result.probabilities, set_options)
        for row, prediction_set in zip(body["predictions"], prediction_sets.set_rows(mask, set_options, model.classes)):
            row["prediction_set"] = prediction_set
    ids = monitoring.record(request, model, profile, result, ood, mask,
                            None if set_options is None else set_options.coverage)
    for row, prediction_id in zip(body["predictions"], ids or ()):
        row["prediction_id"] = prediction_id
    for stage, seconds in (("read_body", read - started), ("decode", decoded - read),
                           ("respond", time.perf_counter() - predicted)):
        metrics.observe_stage(model.name, stage, seconds)
    return body


def _predict_body(model, result: dataplane.Prediction, t: int, return_logits: bool, ood) -> dict:
    classes = model.classes
    probs = result.probabilities
    index = probs.argmax(axis=1)
    rows = []
    for i, k in enumerate(index.tolist()):
        row = {"class_index": k, "label": classes[k], "confidence": float(probs[i, k]),
               "probabilities": probs[i].tolist(), "uncertainty": None}
        if result.mc is not None:
            mc = result.mc
            row["uncertainty"] = {"n_samples": mc.n_samples, "mean": mc.mean[i].tolist(),
                                  "variance": mc.variance[i].tolist(),
                                  "predictive_entropy": float(mc.predictive_entropy[i]),
                                  "expected_entropy": float(mc.expected_entropy[i]),
                                  "mutual_information": float(mc.mutual_information[i])}
        row["ood"] = {"score": ood.score, "value": float(ood.values[i]), "threshold": ood.threshold,
                      "flag": None if ood.flags is None else bool(ood.flags[i])}
        if return_logits:
            row["logits"] = result.logits[i].astype(float).tolist()
            row["uncalibrated_probabilities"] = result.uncalibrated[i].tolist()
        rows.append(row)
    return {"model": model.name, "version": model.version, "temperature": model.temperature, "classes": classes,
            "mc_samples": t,
            "seed": result.seed, "predictions": rows}


@router.post("/{name}/evaluate", response_model=EvaluateResponse, openapi_extra=EVALUATE_BODY,
             summary="ECE and selective-prediction report (JSON), reliability diagram or risk-coverage "
                     "curve (PNG) on a labelled batch",
             responses={**error_responses(*BODY_ERRORS), **calibrations.USE_ERRORS,
                        200: {"content": {"application/json": {}, **PNG_CONTENT},
                              "description": "the report; the reliability diagram with format=png; the "
                                             "risk-coverage curve with format=risk_coverage_png"}})
async def evaluate(
    request: Request,
    name: str = ModelName,
    bins: Optional[int] = Query(None, description="equal-width confidence bins (default 15)"),
    fit_temperature: bool = Query(False, description="also fit T on this batch and report metrics at it"),
    format: Literal["json", "png", "risk_coverage_png"] = Query(
        "json", description="png: the reliability diagram; risk_coverage_png: the risk-coverage curve"),
    target_accuracy: Optional[float] = Query(
        None, gt=0, le=1, description="also report the lowest confidence threshold whose accepted images "
                                      "reach this accuracy, and its coverage (selective.target)"),
    resize: bool = Query(False, description="resize archive images that are not 32x32 RGB"),
    split: Optional[str] = Query(None, description="archive sub-folder holding the class folders, e.g. test"),
    coverage: Optional[list[float]] = Query(None, description="report the conformal prediction sets (the card's, "
                                                              "or the profile's with calibration=<id>) at these "
                                                              "coverages (repeat the parameter), 0 < c < 1"),
    conformal_method: Optional[list[Literal["lac", "aps", "raps"]]] = Query(
        None, description="the scores to report (repeatable; default all three); needs coverage"),
    mondrian: bool = Query(False, description="class-conditional (Mondrian) sets; needs coverage"),
    calibration: Optional[str] = Query(None, description="a calibration profile's id: also report the metrics "
                                                         "under it (after_calibration); the conformal block then "
                                                         "uses it"),
):
    settings = settings_of(request)
    model = model_of(request, name)
    profile = await calibrations.profile_for(request, model, calibration)
    conformal = _conformal_request(model, coverage, conformal_method, mondrian, profile)
    n_bins = inputs.check_bins(settings.default_bins if bins is None else bins, settings.max_bins)
    x, y = await read_labelled_batch(request, model, resize=resize, split=split)
    report = await on_model_executor(request, dataplane.evaluate, model, x, y, n_bins=n_bins,
                                     fit=fit_temperature, chunk=settings.eval_chunk,
                                     target_accuracy=target_accuracy, conformal=conformal,
                                     calibrator=None if profile is None else profile.calibrator)
    request.app.state.metrics.images.labels(model.name, "evaluate").inc(len(x))
    if format == "png":
        png = await in_thread(dataplane.diagram_png, report, model.name)
        return Response(png, media_type="image/png",
                        headers={"Content-Disposition": f'inline; filename="reliability-{model.name}.png"'})
    if format == "risk_coverage_png":
        png = await in_thread(dataplane.risk_coverage_diagram_png, report, model.name)
        return Response(png, media_type="image/png",
                        headers={"Content-Disposition": f'inline; filename="risk-coverage-{model.name}.png"'})
    return {"model": model.name, "version": model.version, "n": report.n, "n_bins": report.n_bins, "temperature": report.temperature,
            "before_temperature": report.before.to_dict(), "after_temperature": report.after.to_dict(),
            "fitted_temperature": report.fitted_temperature,
            "after_fitted_temperature": None if report.after_fitted is None else report.after_fitted.to_dict(),
            "selective": report.selective.report.to_dict(), "conformal": report.conformal,
            "warnings": [w.to_dict() for w in report.warnings],
            "calibration": calibrations.used(model, profile),
            "after_calibration": None if report.after_profile is None else report.after_profile.to_dict()}


def _conformal_request(model, coverage, methods, mondrian, profile=None) -> dataplane.ConformalRequest | None:
    if not coverage:
        if methods or mondrian:
            raise inputs.InputError("needs_coverage", "conformal_method and mondrian need coverage")
        return None
    return dataplane.ConformalRequest(calibrations.conformal_of(model, profile),
                                      prediction_sets.coverage_levels(coverage),
                                      tuple(dict.fromkeys(methods)) if methods else prediction_sets.METHODS, mondrian,
                                      **({} if profile is None else {"source": "profile",
                                                                    "calibrator": profile.calibrator}))


async def read_labelled_batch(request: Request, model, *, resize: bool, split: Optional[str]):
    """(images, labels) of a labelled batch in any form evaluate takes: JSON instances + labels, an
    .npz with x and y, or an archive of <class>/<image> folders (also the profile fits' input)."""
    settings = settings_of(request)
    payload = await read_payload(request, max_files=2)
    if payload.json is not None:
        return await in_thread(_labelled_json, payload.json, model.num_classes, resize, settings.max_eval_images)
    await charge_uncompressed(request, payload.files)
    return await in_thread(inputs.labelled_from_files, payload.files, class_names=model.classes,
                           split=split, resize=resize, limits=upload_limits(settings, settings.max_eval_images))


def _labelled_json(payload: dict, num_classes: int, resize: bool, max_images: int):
    x = inputs.instances_from_json(payload, resize=resize, max_instances=max_images)
    return x, inputs.labels_from_json(payload, len(x), num_classes)


@router.post("/{name}/compare", response_model=CompareResponse, openapi_extra=COMPARE_BODY,
             summary="How well the uncertainty scores separate a suspect batch from an in-distribution one",
             description="Two unlabelled batches (JSON lists, or multipart file fields `in_distribution` and "
                         "`suspect`: PNG/JPEG files or .npy/.npz arrays). Returns AUROC, AUPR-Out and FPR at 95% "
                         "TPR per score (the suspect batch is the positive class), the batch sizes and score "
                         "means, and the share of each batch the model's OOD flag marks; with `format=png`, "
                         "histograms of the scores of both batches. Admitted like evaluate (one evaluation "
                         "slot, bounded queue).",
             responses={**error_responses(*BODY_ERRORS), **calibrations.USE_ERRORS,
                        200: {"content": {"application/json": {}, **PNG_CONTENT},
                              "description": "the report, or the score histograms with format=png"}})
async def compare(
    request: Request,
    name: str = ModelName,
    mc_samples: int = Query(0, description="MC dropout samples T for the mutual information: 0 (none, "
                                           "the default) or at least 2"),
    seed: Optional[int] = Query(None, description="seed of the dropout masks (random if omitted)"),
    format: Literal["json", "png"] = Query("json", description="png: histograms of the scores of both batches"),
    resize: bool = Query(False, description="resize encoded images that are not 32x32 RGB"),
    calibration: Optional[str] = Query(None, description="a calibration profile's id: the scores use it instead "
                                                         "of the card's temperature"),
):
    settings = settings_of(request)
    model = model_of(request, name)
    profile = await calibrations.profile_for(request, model, calibration)
    t = inputs.check_compare_mc_samples(mc_samples, settings.max_mc_samples)
    seed = inputs.check_seed(seed)
    if t >= 2 and seed is None:
        seed = secrets.randbelow(2**31 - 1)
    payload = await read_payload(request, max_files=2 * settings.max_eval_images)
    if payload.json is not None:
        x_in, x_out = await in_thread(inputs.batches_from_json, payload.json, resize=resize,
                                      max_images=settings.max_eval_images)
    else:
        await charge_uncompressed(request, payload.files)
        x_in, x_out = await in_thread(inputs.batches_from_files, payload.files, payload.fields, resize=resize,
                                      limits=upload_limits(settings, settings.max_eval_images))
    result = await on_model_executor(request, dataplane.compare, model, x_in, x_out, mc_samples=t, seed=seed,
                                     chunk=settings.eval_chunk, mc_chunk_rows=settings.mc_chunk_rows,
                                     calibrator=None if profile is None else profile.calibrator)
    metrics = request.app.state.metrics
    metrics.images.labels(model.name, "compare").inc(len(x_in) + len(x_out))
    metrics.mc_samples.labels(model.name).inc(t * (len(x_in) + len(x_out)))
    if format == "png":
        png = await in_thread(dataplane.comparison_png, result, model.name)
        return Response(png, media_type="image/png",
                        headers={"Content-Disposition": f'inline; filename="ood-{model.name}.png"'})
    flagged = None
    if result.threshold is not None:
        flagged = {"threshold": result.threshold, "in_distribution": result.flagged_in,
                   "suspect": result.flagged_suspect}
    return {"model": model.name, "version": model.version, "temperature": model.temperature, "mc_samples": t,
            "seed": result.seed,
            "calibration": calibrations.used(model, profile), "n_in_distribution": result.n_in, "n_suspect": result.n_suspect, "flagged": flagged,
            "scores": [{"score": d.score, "auroc": d.auroc, "aupr": d.aupr, "fpr_at_95_tpr": d.fpr_at_95_tpr,
                        "mean_in_distribution": d.mean_in, "mean_suspect": d.mean_out}
                       for d in result.detections]}


def _number_schemas(schema: dict) -> list[dict]:
    """The `number` schemas in a parameter's schema: itself, its anyOf branches, array items."""
    if schema.get("type") == "number":
        return [schema]
    if schema.get("type") == "array":
        return _number_schemas(schema.get("items", {}))
    return [n for branch in schema.get("anyOf", []) for n in _number_schemas(branch)]


def document_query_limits(app, settings) -> None:
    """Put this server's limits into the OpenAPI document (they are settings, so the route
    declarations cannot hold them), so that the document admits exactly the query values the
    server accepts: `mc_samples` 0..CALIB_MAX_MC_SAMPLES (compare: 0 or 2..), `bins`
    1..CALIB_MAX_BINS, `seed` 0..2^31-2. The routes keep their own checks and error codes."""
    generate = app.openapi
    seed = {"minimum": 0, "maximum": 2**31 - 2}
    limits = {
        "/v1/models/{name}/predict": {"mc_samples": {"minimum": 0, "maximum": settings.max_mc_samples}, "seed": seed},
        "/v1/models/{name}/evaluate": {"bins": {"minimum": 1, "maximum": settings.max_bins}},
        "/v1/calibration/evaluate": {"bins": {"minimum": 1, "maximum": settings.max_bins}},
        "/v1/models/{name}/compare": {"mc_samples": {"anyOf": [{"type": "integer", "enum": [0]},
                                                               {"type": "integer", "minimum": 2,
                                                                "maximum": settings.max_mc_samples}]},
                                      "seed": seed},
    }

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        spec = generate()
        for path, params in limits.items():
            for param in spec.get("paths", {}).get(path, {}).get("post", {}).get("parameters", []):
                extra = params.get(param["name"])
                if extra is None:
                    continue
                schema = param["schema"]
                target = next((s for s in schema.get("anyOf", []) if s.get("type") == "integer"), schema)
                if "anyOf" in extra:  # replaces the integer schema
                    param["schema"] = {**{k: v for k, v in schema.items() if k not in ("type", "anyOf")}, **extra}
                else:
                    target.update(extra)
        for item in spec.get("paths", {}).values():   # a coverage level lies strictly inside (0, 1)
            for param in item.get("post", {}).get("parameters", []):
                if param["name"] == "coverage":
                    for number in _number_schemas(param["schema"]):
                        number.update(exclusiveMinimum=0, exclusiveMaximum=1)
        app.openapi_schema = spec
        return spec

    app.openapi = openapi
