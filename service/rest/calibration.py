"""/v1/calibration: calibration reports for any classifier's outputs (models not served here).

HTTP only: parse the query and body (`service.logits_inputs`), run the domain logic
(`service.logits_evaluation`) in a worker thread, answer JSON or the reliability-diagram PNG.
"""

from __future__ import annotations

from typing import Literal, Optional

from fastapi import APIRouter, Query, Request, Response

from service import inputs, prediction_sets
from service.logits_evaluation import evaluate_outputs, outputs_diagram_png
from service.logits_inputs import outputs_from_files, outputs_from_json
from service.rest.errors import error_responses
from service.rest.requests import in_thread, read_payload, settings_of, upload_limits
from service.schemas import LOGITS_EVALUATE_BODY, PNG_CONTENT, LogitsEvaluateResponse

router = APIRouter(prefix="/v1/calibration", tags=["calibration"], responses=error_responses(400, 413, 415, 422))


@router.post("/evaluate", response_model=LogitsEvaluateResponse, openapi_extra=LOGITS_EVALUATE_BODY,
             summary="ECE report, fitted temperature and split-conformal coverage for any classifier's "
                     "logits or probabilities",
             responses={200: {"content": {"application/json": {}, **PNG_CONTENT},
                              "description": "the report, or the reliability diagram with format=png"}})
async def evaluate_outputs_route(
    request: Request,
    bins: Optional[int] = Query(None, description="equal-width confidence bins (default 15)"),
    fit_temperature: bool = Query(False, description="also fit T on this batch and report metrics at it"),
    format: Literal["json", "png"] = Query("json", description="png: the reliability diagram"),
    coverage: Optional[list[float]] = Query(
        None, description="split-conformal coverage at these levels (repeat the parameter), 0 < c < 1: a seeded "
                          "half of the batch sets the thresholds, the other half is measured"),
    conformal_method: Optional[list[Literal["lac", "aps", "raps"]]] = Query(
        None, description="the scores to report (repeatable; default all three); needs coverage"),
    mondrian: bool = Query(False, description="class-conditional (Mondrian) sets; needs coverage"),
    seed: int = Query(0, ge=0, lt=2**31 - 1, description="seed of the calibration/measured split"),
):
    settings = settings_of(request)
    n_bins = inputs.check_bins(settings.default_bins if bins is None else bins, settings.max_bins)
    if not coverage and (conformal_method or mondrian):
        raise inputs.InputError("needs_coverage", "conformal_method and mondrian need coverage")
    levels = prediction_sets.coverage_levels(coverage or [])
    methods = tuple(dict.fromkeys(conformal_method)) if conformal_method else prediction_sets.METHODS
    payload = await read_payload(request, max_files=1)
    if payload.json is not None:
        outputs = await in_thread(outputs_from_json, payload.json, settings.max_eval_images)
    else:
        outputs = await in_thread(outputs_from_files, payload.files,
                                  upload_limits(settings, settings.max_eval_images))
    report = await in_thread(evaluate_outputs, outputs, n_bins=n_bins, fit=fit_temperature, coverages=levels,
                             methods=methods, mondrian=mondrian, seed=seed)
    if format == "png":
        png = await in_thread(outputs_diagram_png, report)
        return Response(png, media_type="image/png",
                        headers={"Content-Disposition": 'inline; filename="reliability.png"'})
    return {"kind": report.kind, "n": report.n, "num_classes": report.num_classes, "n_bins": n_bins,
            "uploaded": report.uploaded.to_dict(), "fitted_temperature": report.fitted_temperature,
            "after_fitted_temperature": None if report.after_fitted is None else report.after_fitted.to_dict(),
            "conformal": report.conformal}
