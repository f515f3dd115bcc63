"""Request IDs: every answer (200s and every kind of error) carries `X-Request-ID`, every error
body the same `request_id`, and the "service.access" log line of the request names it."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest

from tests.service_helpers import MAX_BODY, MODEL, error_of

PREDICT = f"/v1/models/{MODEL}/predict"
GOOD = {"instances": [np.zeros((32, 32, 3), np.uint8).tolist()]}
UUID_HEX = re.compile(r"[0-9a-f]{32}")


def _id_of_error(response, status: int, code: str) -> str:
    error_of(response, status, code)
    rid = response.headers["x-request-id"]
    assert response.json()["error"]["request_id"] == rid
    return rid


@pytest.mark.parametrize("sent", ["abc-123", "0f8fad5b-d9cb-469f-a165-70867728950e", "trace:1.2_3/x+y==",
                                  "x" * 128])
def test_a_sane_client_id_is_echoed(app_client, sent):
    r = app_client.get("/health/live", headers={"X-Request-ID": sent})
    assert r.status_code == 200 and r.headers["x-request-id"] == sent
    assert _id_of_error(app_client.get("/v1/models/nope", headers={"X-Request-ID": sent}), 404,
                        "unknown_model") == sent


@pytest.mark.parametrize("sent", ["x" * 129, "has space", "semi;colon", "quote\"d", "<script>", "é-accent",
                                  "tab\there", ""], ids=["too-long", "space", "semicolon", "quote", "html",
                                                         "non-ascii", "control", "empty"])
def test_an_insane_client_id_is_replaced(app_client, sent):
    r = app_client.get("/health/live", headers=[("X-Request-ID", sent.encode("utf-8"))])
    assert r.status_code == 200
    assert UUID_HEX.fullmatch(r.headers["x-request-id"]) and r.headers["x-request-id"] != sent


def test_request_id_from_raw_headers():
    from service.rest.request_id import request_id_from

    assert request_id_from([(b"x-request-id", b"ok-1")]) == "ok-1"
    assert request_id_from([(b"X-Request-Id", b"ok-2"), (b"x-request-id", b"second")]) == "ok-2"
    for bad in (b"nul\x00", b"new\nline", b"\x7f", b"\xff\xfe", b"a" * 129):
        assert UUID_HEX.fullmatch(request_id_from([(b"x-request-id", bad)]))
    a, b = request_id_from([]), request_id_from(None)
    assert UUID_HEX.fullmatch(a) and UUID_HEX.fullmatch(b) and a != b


def test_new_ids_are_unique_per_request(app_client):
    ids = {app_client.get("/health/live").headers["x-request-id"] for _ in range(20)}
    assert len(ids) == 20 and all(UUID_HEX.fullmatch(i) for i in ids)


def test_every_error_kind_carries_the_id(app_client):
    """404 (route and model), 405, 415, 422, 413 (declared and streamed): header == body."""
    cases = [
        (app_client.get("/v3/anything"), 404, "not_found"),
        (app_client.get("/v1/models/nope"), 404, "unknown_model"),
        (app_client.get(PREDICT), 405, "method_not_allowed"),
        (app_client.post(PREDICT, content=b"hi", headers={"content-type": "text/plain"}), 415,
         "unsupported_media_type"),
        (app_client.post(PREDICT, json=GOOD, params={"mc_samples": "lots"}), 422, "invalid_parameter"),
        (app_client.post(PREDICT, json={"instances": [[[0]]]}), 422, "invalid_shape"),
        (app_client.post(PREDICT, content=b"{" + b" " * MAX_BODY + b"}",
                         headers={"content-type": "application/json"}), 413, "payload_too_large"),
        (app_client.post(PREDICT, content=(b" " * 65536 for _ in range(MAX_BODY // 65536 + 2)),
                         headers={"content-type": "application/json"}), 413, "payload_too_large"),
    ]
    ids = [_id_of_error(r, status, code) for r, status, code in cases]
    assert len(set(ids)) == len(ids)
    sent = app_client.post(PREDICT, content=b"{" + b" " * MAX_BODY + b"}",
                           headers={"content-type": "application/json", "X-Request-ID": "big-1"})
    assert _id_of_error(sent, 413, "payload_too_large") == "big-1"
    ok = app_client.post(PREDICT, json=GOOD, params={"mc_samples": 0}, headers={"X-Request-ID": "ok-7"})
    assert ok.status_code == 200 and ok.headers["x-request-id"] == "ok-7" and "request_id" not in ok.json()


def test_500_carries_the_id_in_header_body_and_traceback_log(app_client, monkeypatch, caplog):
    from service import dataplane

    def boom(*a, **k):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(dataplane, "predict", boom)
    monkeypatch.setattr(dataplane, "predict_many", boom)  # the micro-batcher's path: its pass fails
    caplog.set_level(logging.INFO)
    r = app_client.post(PREDICT, json=GOOD, headers={"X-Request-ID": "crash-42"})
    assert _id_of_error(r, 500, "internal_error") == "crash-42"
    tracebacks = [rec for rec in caplog.records if rec.name == "service.errors"]
    assert tracebacks and "request_id=crash-42" in tracebacks[0].getMessage() and tracebacks[0].exc_info
    access = [rec for rec in caplog.records if rec.name == "service.access" and rec.request_id == "crash-42"]
    assert len(access) == 1 and access[0].http_status == 500


def test_access_log_line_names_the_request(app_client, caplog):
    caplog.set_level(logging.INFO, logger="service.access")
    app_client.post(PREDICT, json=GOOD, params={"mc_samples": 0, "seed": 987654},
                    headers={"X-Request-ID": "log-me-1", "X-API-Key": "not-a-key-of-this-service"})
    app_client.get("/v1/models/nope", headers={"X-Request-ID": "log-me-2"})
    records = {rec.request_id: rec for rec in caplog.records if rec.name == "service.access"}
    ok, missing = records["log-me-1"], records["log-me-2"]
    assert ok.getMessage().endswith("request_id=log-me-1")
    assert f"POST {PREDICT} 200 " in ok.getMessage() and re.search(r" \d+\.\dms ", ok.getMessage())
    assert (ok.http_method, ok.http_path, ok.http_status) == ("POST", PREDICT, 200) and ok.duration_ms > 0
    assert "987654" not in ok.getMessage()  # no query string
    assert "not-a-key" not in caplog.text  # no headers
    assert missing.http_status == 404 and "GET /v1/models/nope 404" in missing.getMessage()


def test_access_log_escapes_control_characters_in_the_path(app_client, caplog):
    caplog.set_level(logging.INFO, logger="service.access")
    app_client.get("/v1/models/evil%0Aforged%20line%1b[31m", headers={"X-Request-ID": "esc-1"})
    rec = next(r for r in caplog.records if r.name == "service.access" and r.request_id == "esc-1")
    message = rec.getMessage()
    assert "\n" not in message and "\x1b" not in message
    assert "evil\\x0aforged line\\x1b[31m" in message


def test_openapi_error_body_documents_request_id(app_client):
    schemas = app_client.get("/openapi.json").json()["components"]["schemas"]
    assert "request_id" in schemas["ErrorBody"]["properties"]
