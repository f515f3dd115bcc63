"""Regression tests for the defects the schemathesis run (tests/test_service_fuzz.py) and the
probing around it found, each with the exact input that broke it. Plain requests, not fuzzing.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.service_helpers import MODEL, error_of

PREDICT = f"/v1/models/{MODEL}/predict"
EVALUATE = f"/v1/models/{MODEL}/evaluate"


def _json_example(spec: dict, path: str) -> dict:
    return spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["example"]


def test_the_documented_request_examples_are_accepted(app_client):
    """The predict example used to be {"instances": [{"b64": "iVBORw0KGgo..."}]}: a truncated PNG,
    so a client copying it (and schemathesis' examples phase) got 422 undecodable_image."""
    spec = app_client.get("/openapi.json").json()
    r = app_client.post(PREDICT, json=_json_example(spec, "/v1/models/{name}/predict"))
    assert r.status_code == 200, r.text
    assert len(r.json()["predictions"]) == 2
    example = _json_example(spec, "/v1/models/{name}/evaluate")
    r = app_client.post(EVALUATE, json=example)
    assert r.status_code == 200, r.text
    assert r.json()["n"] == len(example["labels"])
    png = app_client.post(EVALUATE, json=example, params={"format": "png"})
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"


def test_v1_before_the_models_are_loaded_is_503_not_ready(service_settings):
    """Before the lifespan has loaded the registry, GET /v1/models raised AttributeError
    ('NoneType' object has no attribute 'names'): 500 internal_error."""
    from fastapi.testclient import TestClient

    from service.app import create_app

    client = TestClient(create_app(service_settings), raise_server_exceptions=False)  # no `with`: no lifespan
    for method, path in (("GET", "/v1/models"), ("GET", f"/v1/models/{MODEL}"), ("POST", PREDICT)):
        msg = error_of(client.request(method, path, json={"instances": []}), 503, "not_ready")
        assert "not loaded yet" in msg
    error_of(client.get("/health/ready"), 503, "not_ready")
    assert client.get("/health/live").status_code == 200


def _pixels_with_one_boolean() -> list:
    pixels = np.zeros((32, 32, 3), np.int64).tolist()
    pixels[5][7][1] = True
    return pixels


def test_a_boolean_among_pixel_values_is_refused(app_client):
    """[[[0, true, 0], ...]] was read by NumPy as the integer 1 and predicted on (200), although an
    all-boolean image was already refused with invalid_dtype."""
    msg = error_of(app_client.post(PREDICT, json={"instances": [_pixels_with_one_boolean()]}), 422, "invalid_dtype")
    assert "instance 0" in msg and "boolean" in msg


def test_a_boolean_among_labels_is_refused(app_client):
    """{"labels": [true, 3]} was read as [1, 3] and evaluated (200)."""
    pixels = np.zeros((32, 32, 3), np.int64).tolist()
    msg = error_of(app_client.post(EVALUATE, json={"instances": [pixels, pixels], "labels": [True, 3]}),
                   422, "invalid_dtype")
    assert "boolean" in msg


def test_unparseable_content_type_is_named_in_the_415(app_client):
    """Content-Type ';;;' was reported as 'Content-Type none'."""
    r = app_client.post(PREDICT, content=b"{}", headers={"content-type": ";;;"})
    assert "Content-Type ;;;" in error_of(r, 415, "unsupported_media_type")


@pytest.mark.parametrize("path, method", [
    ("/health/ready", "get"), ("/v1/models", "get"), ("/v1/models/{name}", "get"),
    ("/v1/models/{name}/predict", "post"), ("/v1/models/{name}/evaluate", "post"),
])
def test_every_documented_error_response_is_the_error_envelope(app_client, path, method):
    """GET /v1/models/{name} documented its 422 as FastAPI's HTTPValidationError ({"detail": [...]}),
    which the service never sends; /v1 documented no 503."""
    spec = app_client.get("/openapi.json").json()
    responses = spec["paths"][path][method]["responses"]
    errors = {status: r for status, r in responses.items() if int(status) >= 400}
    assert "503" in errors
    for status, response in errors.items():
        assert response["content"] == {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
        assert response["description"]
    assert "HTTPValidationError" not in spec["components"]["schemas"]


def test_documented_non_json_bodies(app_client):
    spec = app_client.get("/openapi.json").json()
    evaluate_ok = spec["paths"]["/v1/models/{name}/evaluate"]["post"]["responses"]["200"]["content"]
    assert evaluate_ok["image/png"]["schema"] == {"type": "string", "format": "binary"}
    assert "EvaluateResponse" in evaluate_ok["application/json"]["schema"]["$ref"]
    metrics_ok = spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert metrics_ok == {"text/plain": {"schema": {"type": "string"}}}
    assert app_client.get("/metrics").headers["content-type"].startswith("text/plain")


def test_v2_schema_enums_are_what_the_server_accepts():
    """The OpenAPI document lists exactly the input name, datatypes and outputs service.v2_tensors
    accepts (schemathesis' positive_data_acceptance holds the document to that)."""
    from service import v2_tensors
    from service.v2_schemas import REQUESTABLE_OUTPUTS, RequestInput

    fields = RequestInput.model_json_schema()["properties"]
    assert fields["name"]["enum"] == [v2_tensors.INPUT_NAME]
    assert fields["datatype"]["enum"] == [*v2_tensors.PIXEL_DATATYPES, v2_tensors.BYTES]
    assert REQUESTABLE_OUTPUTS == list(v2_tensors.OUTPUT_NAMES)
