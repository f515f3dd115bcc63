"""Schemathesis fuzzing of every HTTP operation against the app's own OpenAPI document.

Stateless, in-process (ASGI) and seeded, so a run is repeatable and bounded. What must hold for
every generated request: no 5xx, and the response (status, content type, body) is one the
document lists for that operation. Requests that break the documented schema (negative mode)
must be refused with a 4xx. Defects this found are pinned, with their exact inputs, in
tests/test_service_fuzz_regressions.py.
"""

from __future__ import annotations

import os

import pytest

schemathesis = pytest.importorskip("schemathesis")

from schemathesis.checks import CHECKS as REGISTERED_CHECKS  # noqa: E402
from schemathesis.checks import load_all_checks  # noqa: E402
from schemathesis.openapi.checks import RejectedPositiveData  # noqa: E402
from schemathesis.specs.openapi.checks import positive_data_acceptance  # noqa: E402

from tests.service_helpers import BROKEN, MAX_MC, MODEL  # noqa: E402

pytestmark = pytest.mark.slow

# A longer or different campaign: CALIB_FUZZ_SEED=7 CALIB_FUZZ_EXAMPLES=500 pytest tests/test_service_fuzz.py
SEED = int(os.environ.get("CALIB_FUZZ_SEED", "20240514"))
MAX_EXAMPLES = int(os.environ.get("CALIB_FUZZ_EXAMPLES", "25"))  # per operation, on top of the explicit
# and coverage cases

# The `name` path parameter should mostly name the loaded model, sometimes the corrupt artifact
# (skipped at startup) or nothing at all: generated strings alone would only ever hit 404.
MODEL_NAMES = [MODEL] * 8 + [BROKEN, "no-such-model"]

FUZZ_CONFIG = {
    "seed": SEED,
    # large_base_example: predict's and evaluate's smallest bodies pass it now ({"b64": ...} first),
    # compare's (two required batches) still trips it
    "suppress-health-check": ["too_slow", "filter_too_much", "data_too_large", "large_base_example"],
    "generation": {"deterministic": True, "max-examples": MAX_EXAMPLES, "database": "none"},
    "phases": {"stateful": {"enabled": False}},
    "dictionaries": {"model_names": {"values": MODEL_NAMES}},
    "parameters": {"path.name": {"dictionary": "model_names", "probability": 0.9}},
}

# Every check schemathesis has (as `schemathesis run --checks all`): besides no 5xx and answers as
# documented, schema-valid requests are accepted (positive_data_acceptance), a 405 carries `Allow`
# (unsupported_method, allow_header_conformance), headers conform, and so on.
load_all_checks()

# positive_data_acceptance: a schema-valid request must be accepted. The document states every
# structural rule (types, ranges, required fields, enums), but some refusals depend on content no
# JSON Schema can state: whether base64 or file bytes decode to a 32x32 image or hold labelled
# arrays, whether a tensor's data matches its shape, how many labels the images need, how many
# classes the loaded model has, that the MC outputs need mc_samples, how many images a profile
# fit needs, that conformal options need coverage. Those refusals (by their
# stable codes; /v2 by its message) are the only ones this check lets pass.
CONTENT_CODES = {"undecodable_image", "invalid_base64", "wrong_image_size", "unsupported_image_mode",
                 "image_too_large", "invalid_array_file", "invalid_archive", "unsupported_file", "missing_labels",
                 "invalid_shape", "invalid_dtype", "value_out_of_range", "non_finite_value", "empty_batch",
                 "length_mismatch", "label_out_of_range",
                 # how many labelled images a fit needs depends on the method, the folds and K
                 "too_few_images",
                 # one query parameter that needs another (mondrian or conformal_method without
                 # coverage): OpenAPI's parameters cannot state a dependency between them
                 "needs_coverage",
                 # feedback: a label beyond the model's K, a prediction not stored, one already labelled
                 "invalid_label"}
V2_CONTENT = ("shape", "elements", "base64", "decode", "image", "value", "needs MC dropout",
              "needs parameters.coverage")


# Refusals of schema-valid parameters that depend on each other or on a setting, which OpenAPI's
# parameters cannot state: `since` needs `from=feedback`; bucket x buckets (or a window) over
# CALIB_MONITORING_MAX_WINDOW; a feedback item with both or neither of its two alternative forms;
# a body beside `from=feedback`.
DEPENDENT_PARAMETER_MESSAGES = ("applies to from=feedback only", "CALIB_MONITORING_MAX_WINDOW", "not both",
                                "give prediction_id", "from=feedback fits on the stored")


def _content_refusal(response) -> bool:
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return False
    if isinstance(error, dict):
        if response.status_code == 422 and error.get("code") in ("invalid_parameter", "invalid_request") \
                and any(m in str(error.get("message")) for m in DEPENDENT_PARAMETER_MESSAGES):
            return True
        return response.status_code == 422 and error.get("code") in CONTENT_CODES
    return response.status_code == 400 and any(word in str(error) for word in V2_CONTENT)


@schemathesis.check
def positive_data_acceptance_beyond_content(ctx, response, case):
    try:
        return positive_data_acceptance(ctx, response, case)
    except RejectedPositiveData:
        if _content_refusal(response):
            return None
        raise


CHECKS = [c for c in REGISTERED_CHECKS.get_all() if c is not positive_data_acceptance]


def _documented_schema() -> dict:
    """The app's OpenAPI document (built from the routes alone: no model is loaded here), its
    example model name swapped for the test app's, which the explicit and coverage cases use."""
    from service.app import create_app
    from service.settings import Settings

    doc = create_app(Settings(max_mc_samples=MAX_MC)).openapi()  # the limits of the app under test
    for item in doc["paths"].values():
        for op in item.values():
            for param in op.get("parameters", []):
                if param["name"] == "name" and param["in"] == "path":
                    param["schema"]["examples"] = [MODEL]
    return doc


schema = schemathesis.openapi.from_dict(_documented_schema(), config=schemathesis.Config.from_dict(FUZZ_CONFIG))


@pytest.fixture(scope="module")
def fuzz_client(service_settings):
    """An in-process client of a fresh app; entering it runs the lifespan (models loaded once)."""
    from schemathesis.python import asgi

    from service.app import create_app

    with asgi.get_client(create_app(service_settings)) as client:
        yield client
    asgi.shutdown_lifespans()


@schema.parametrize()
def test_every_operation_answers_as_documented(case, fuzz_client):
    case.call_and_validate(session=fuzz_client, base_url=fuzz_client.base_url, checks=CHECKS)
