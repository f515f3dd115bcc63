"""Optional API keys: off by default; when configured, every /v1 route needs `Authorization:
Bearer <key>` or `X-API-Key`, health checks stay open, /metrics optionally closed, a 401 is the
usual JSON error with `WWW-Authenticate: Bearer`, and a key is never echoed or logged.

The Python client, the CLI and the curl script are driven against a keyed app served by
uvicorn on a loopback port (in a thread of this process: the model is loaded once)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from tests.service_helpers import MAX_BODY, MODEL, error_of, npz_bytes

REPO = Path(__file__).resolve().parents[1]
KEY_A = "alpha-Key.1_zz"
KEY_B = "beta+key/2=="
FILE_KEY = "from-the-secret-file-77"
KEYS = (KEY_A, KEY_B, FILE_KEY)
PREDICT = f"/v1/models/{MODEL}/predict"
GOOD = {"instances": [np.zeros((32, 32, 3), np.uint8).tolist()]}
OPEN_PATHS = {"/health/live", "/health/ready", "/metrics", "/v2/health/live", "/v2/health/ready"}


def _settings(model_dir, **kwargs):
    from service.settings import Settings

    return Settings(model_dir=model_dir, max_body_bytes=MAX_BODY, warmup=False, **kwargs)


@pytest.fixture(scope="module")
def key_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("secrets") / "api_keys"
    path.write_text(f"# keys of the service\n\n  {FILE_KEY}  \n# {KEY_A} (a comment, not a key)\n")
    return path


@pytest.fixture(scope="module")
def keyed_settings(service_model_dir, key_file):
    """Two keys in CALIB_API_KEYS form plus one from a key file."""
    return _settings(service_model_dir, api_keys=f" {KEY_A}, {KEY_B} ,", api_keys_file=key_file)


@pytest.fixture(scope="module")
def keyed(keyed_settings):
    from fastapi.testclient import TestClient

    from service.app import create_app

    with TestClient(create_app(keyed_settings), raise_server_exceptions=False) as client:
        yield client


def _unauthorized(response) -> str:
    if response.url.path.startswith("/v2"):     # the Open Inference Protocol's {"error": "..."}
        assert response.status_code == 401 and isinstance(response.json()["error"], str), response.text
        assert response.headers["www-authenticate"] == "Bearer"
        return response.json()["error"]
    msg = error_of(response, 401, "unauthorized")
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["error"]["request_id"] == response.headers["x-request-id"]
    return msg


# --- off by default -----------------------------------------------------------------------------
def test_keys_off_by_default_everything_open_and_no_security_documented(app_client):
    assert app_client.get("/v1/models").status_code == 200
    assert app_client.post(PREDICT, json=GOOD, params={"mc_samples": 0}).status_code == 200
    spec = app_client.get("/openapi.json").json()
    assert "securitySchemes" not in spec.get("components", {})
    for path, ops in spec["paths"].items():
        for op in ops.values():
            assert "security" not in op and "401" not in op["responses"], path


# --- keys on: which requests pass -----------------------------------------------------------------
def test_missing_key_is_401_with_the_error_body_and_www_authenticate(keyed):
    msg = _unauthorized(keyed.get("/v1/models"))
    assert "missing API key" in msg and "Authorization: Bearer" in msg and "X-API-Key" in msg
    _unauthorized(keyed.post(PREDICT, json=GOOD))
    _unauthorized(keyed.get("/v1/models", headers={"Authorization": f"Basic {KEY_A}"}))  # not a bearer token
    _unauthorized(keyed.get("/v1/models", headers={"Authorization": "Bearer"}))


@pytest.mark.parametrize("headers", [
    {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}, {"X-API-Key": KEY_A + "x"},
    {"X-API-Key": KEY_A[:-1]}, {"Authorization": f"Bearer {KEY_A.upper()}"}, {"X-API-Key": ""},
], ids=["header-wrong", "bearer-wrong", "longer", "prefix", "case-of-key", "empty"])
def test_wrong_key_is_401_and_never_echoed(keyed, headers):
    r = keyed.get("/v1/models", headers=headers)
    msg = _unauthorized(r)
    presented = next(iter(headers.values())).removeprefix("Bearer ")
    if presented:
        assert "invalid API key" == msg
        assert presented not in r.text and presented not in str(r.headers)


@pytest.mark.parametrize("key", KEYS, ids=["env-list-1", "env-list-2", "key-file"])
@pytest.mark.parametrize("how", ["x-api-key", "Bearer", "bearer", "BEARER"])
def test_right_key_passes_via_either_header(keyed, key, how):
    headers = {"X-API-Key": key} if how == "x-api-key" else {"Authorization": f"{how} {key}"}
    r = keyed.get("/v1/models", headers=headers)
    assert r.status_code == 200, r.text
    assert [m["name"] for m in r.json()["models"]] == [MODEL]


def test_keyed_predict_and_card(keyed):
    r = keyed.post(PREDICT, json=GOOD, params={"mc_samples": 5, "seed": 1}, headers={"X-API-Key": KEY_B})
    assert r.status_code == 200, r.text
    assert len(r.json()["predictions"]) == 1
    # one right key among the two headers is enough
    both = {"X-API-Key": "wrong", "Authorization": f"Bearer {KEY_A}"}
    assert keyed.get(f"/v1/models/{MODEL}", headers=both).status_code == 200


def test_401_comes_before_any_other_answer(keyed):
    """Without a key nothing is revealed: not which models exist, not which parameters are bad."""
    _unauthorized(keyed.get("/v1/models/nope"))
    _unauthorized(keyed.post(PREDICT, params={"mc_samples": "lots"}, json=GOOD))
    _unauthorized(keyed.post(PREDICT, content=b"hello", headers={"content-type": "text/plain"}))
    error_of(keyed.get("/v1/models/nope", headers={"X-API-Key": KEY_A}), 404, "unknown_model")


def test_every_route_but_health_and_docs_needs_the_key(keyed):
    """Guards later routes too: a new data-plane router included without auth.protect fails here.
    (The routes are enumerated from the OpenAPI document: FastAPI nests included routers.)"""
    paths = keyed.get("/openapi.json").json()["paths"]
    assert set(paths) >= OPEN_PATHS | {"/v1/models", PREDICT.replace(MODEL, "{name}")}
    for template, ops in paths.items():
        path = template.replace("{name}", MODEL)
        for method in ops:
            r = keyed.request(method.upper(), path)
            if template in OPEN_PATHS:
                assert r.status_code == 200, (method, template, r.status_code)
            else:
                _unauthorized(r)
    for path in ("/docs", "/openapi.json"):
        assert keyed.get(path).status_code == 200


def test_metrics_behind_the_key_only_with_the_setting(keyed, service_model_dir):
    from fastapi.testclient import TestClient

    from service.app import create_app

    assert keyed.get("/metrics").status_code == 200
    with TestClient(create_app(_settings(service_model_dir, api_keys=KEY_A, metrics_require_key=True))) as c:
        _unauthorized(c.get("/metrics"))
        _unauthorized(c.get("/metrics", headers={"X-API-Key": KEY_B}))
        r = c.get("/metrics", headers={"Authorization": f"Bearer {KEY_A}"})
        assert r.status_code == 200 and "calib_http_requests_total" in r.text
        assert c.get("/health/live").status_code == 200 and c.get("/health/ready").status_code == 200
        security = c.get("/openapi.json").json()["paths"]["/metrics"]["get"]["security"]
        assert {name for req in security for name in req} == {"ApiKeyHeader", "BearerAuth"}


def test_docs_open_by_default_and_behind_the_key_with_the_setting(keyed, service_model_dir):
    """The docs stay open under keys unless CALIB_DOCS_REQUIRE_KEY=true (docs/hardening.md)."""
    from fastapi.testclient import TestClient

    from service.app import create_app

    for path in ("/docs", "/openapi.json"):
        assert keyed.get(path).status_code == 200
    with TestClient(create_app(_settings(service_model_dir, api_keys=KEY_A, docs_require_key=True))) as c:
        for path in ("/docs", "/redoc", "/openapi.json"):
            _unauthorized(c.get(path))
            _unauthorized(c.get(path, headers={"X-API-Key": KEY_B}))
            assert c.get(path, headers={"Authorization": f"Bearer {KEY_A}"}).status_code == 200
        assert c.get("/health/live").status_code == 200
    with pytest.raises(ValidationError, match="CALIB_DOCS_REQUIRE_KEY=true needs CALIB_API_KEYS"):
        _settings(service_model_dir, docs_require_key=True)


def test_metrics_require_key_without_keys_is_a_settings_error(service_model_dir):
    with pytest.raises(ValidationError, match="CALIB_METRICS_REQUIRE_KEY=true needs CALIB_API_KEYS"):
        _settings(service_model_dir, metrics_require_key=True)


# --- settings -------------------------------------------------------------------------------------
def test_env_forms_comma_list_and_file(monkeypatch, key_file):
    from service.settings import Settings

    monkeypatch.setenv("CALIB_API_KEYS", f"{KEY_A},{KEY_B}")
    assert [k.get_secret_value() for k in Settings().all_api_keys] == [KEY_A, KEY_B]
    monkeypatch.setenv("CALIB_API_KEYS", KEY_A)
    monkeypatch.setenv("CALIB_API_KEYS_FILE", str(key_file))
    assert [k.get_secret_value() for k in Settings().all_api_keys] == [KEY_A, FILE_KEY]
    monkeypatch.delenv("CALIB_API_KEYS")
    monkeypatch.delenv("CALIB_API_KEYS_FILE")
    assert Settings().all_api_keys == ()


def test_settings_repr_and_dump_hide_the_keys(service_model_dir, key_file):
    settings = _settings(service_model_dir, api_keys=f"{KEY_A},{KEY_B}", api_keys_file=key_file)
    shown = repr(settings) + str(settings) + settings.model_dump_json() + str(settings.model_dump())
    assert len(settings.all_api_keys) == 3
    for key in KEYS:
        assert key not in shown


@pytest.mark.parametrize("case", ["missing", "directory", "only-comments", "bad-characters"])
def test_unusable_key_file_is_a_clear_startup_error(tmp_path, service_model_dir, case):
    path = tmp_path / "keys"
    if case == "directory":
        path.mkdir()
    elif case == "only-comments":
        path.write_text("# nothing yet\n\n")
    elif case == "bad-characters":
        path.write_text(f"{KEY_A}\nkey with spaces\n")
    with pytest.raises(ValidationError) as err:
        _settings(service_model_dir, api_keys_file=path)
    text = str(err.value)
    assert f"CALIB_API_KEYS_FILE={path}" in text
    expected = {"missing": "cannot read", "directory": "cannot read", "only-comments": "holds no API key",
                "bad-characters": "key #2"}[case]
    assert expected in text
    assert KEY_A not in text and "with spaces" not in text


def test_bad_key_in_the_list_is_an_error_that_does_not_echo_it(service_model_dir):
    with pytest.raises(ValidationError) as err:
        _settings(service_model_dir, api_keys=["fine-key", "sécret"])
    assert "CALIB_API_KEYS: key #2" in str(err.value) and "sécret" not in str(err.value)
    assert "fine-key" not in str(err.value)


def test_server_refuses_to_start_with_an_unreadable_key_file(tmp_path):
    env = {**os.environ, "CALIB_API_KEYS_FILE": str(tmp_path / "absent"), "CALIB_API_KEYS": KEY_A,
           "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "service"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2
    assert "bad setting" in out.stderr and "cannot read the API key file" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert "Traceback" not in out.stderr and KEY_A not in out.stderr


# --- matching ---------------------------------------------------------------------------------------
def test_keyring_compares_against_every_key_in_constant_time(monkeypatch):
    import hmac

    from pydantic import SecretStr

    from service.api_keys import KeyRing

    ring = KeyRing([SecretStr(k) for k in KEYS])
    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: calls.append((len(a), len(b))) or real(a, b))
    assert ring.matches(KEY_A) and ring.matches(FILE_KEY.encode())
    assert not ring.matches("nope") and not ring.matches(None) and not ring.matches(KEY_A + " ")
    # every configured key is compared for every presented key (a match does not stop early), and
    # always as 32-byte digests: neither the position nor the length of a key shows in the timing
    assert len(calls) == 4 * len(KEYS)
    assert set(calls) == {(32, 32)}
    assert all(k not in repr(ring) for k in KEYS) and not KeyRing([])


# --- never logged, never in responses or metrics -------------------------------------------------------
def test_keys_never_appear_in_logs_responses_or_metrics(keyed, caplog):
    caplog.set_level(logging.DEBUG)
    seen = []
    for headers in ({"X-API-Key": KEY_A}, {"Authorization": f"Bearer {KEY_B}"}, {"X-API-Key": KEY_A + "-x"},
                    {"Authorization": f"Bearer {FILE_KEY}-x"}):
        for call in (lambda h: keyed.get("/v1/models", headers=h),
                     lambda h: keyed.post(PREDICT, json=GOOD, params={"mc_samples": 2}, headers=h),
                     lambda h: keyed.get("/v1/models/nope", headers=h),
                     lambda h: keyed.post(PREDICT, content=b"x", headers={**h, "content-type": "text/plain"})):
            r = call(headers)
            seen.append(r.text + str(r.headers))
    seen.append(keyed.get("/metrics").text)
    assert any(rec.name == "service.access" for rec in caplog.records)
    logged = caplog.text + "".join(str(rec.__dict__) for rec in caplog.records)
    for key in KEYS:
        assert key not in logged
        assert all(key not in text for text in seen)
    assert 'code="unauthorized"' in seen[-1]  # 401s are counted, under the error code only


# --- OpenAPI ------------------------------------------------------------------------------------------
def test_openapi_declares_the_schemes_and_the_401(keyed):
    spec = keyed.get("/openapi.json").json()
    schemes = spec["components"]["securitySchemes"]
    assert schemes["ApiKeyHeader"] == {**schemes["ApiKeyHeader"], "type": "apiKey", "in": "header",
                                       "name": "X-API-Key"}
    assert schemes["BearerAuth"]["type"] == "http" and schemes["BearerAuth"]["scheme"] == "bearer"
    v1_ops = [(path, op) for path, ops in spec["paths"].items() if path.startswith("/v1/") for op in ops.values()]
    # list, card, the card's reliability diagram, predict, evaluate, compare, calibration/evaluate, and 9
    # calibration-profile routes (model: create, list, get, delete; independent: create, list, get, delete, apply),
    # and monitoring (the verdict, the timeline, feedback)
    assert len(v1_ops) == 19
    for path, op in v1_ops:
        # a list of alternatives: either scheme is enough
        assert sorted(op["security"], key=str) == [{"ApiKeyHeader": []}, {"BearerAuth": []}], path
        unauthorized = op["responses"]["401"]
        assert unauthorized["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}
        assert "WWW-Authenticate" in unauthorized["headers"]
    for path in OPEN_PATHS:
        assert "security" not in spec["paths"][path]["get"], path
    assert "request_id" in spec["components"]["schemas"]["ErrorBody"]["properties"]


# --- clients against a keyed server over real HTTP ------------------------------------------------------
@pytest.fixture(scope="module")
def keyed_server(keyed_settings):
    """A keyed app under uvicorn on a loopback port, in a thread (its own app: the predict
    batcher belongs to the event loop that ran the lifespan)."""
    import uvicorn

    from service.app import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(keyed_settings), host="127.0.0.1", port=port,
                                           log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def small_npz(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "val.npz"
    path.write_bytes(npz_bytes(x=rng.integers(0, 256, (24, 32, 32, 3), dtype=np.uint8),
                               y=rng.integers(0, 10, 24)))
    return path


def test_python_client_sends_the_key(keyed_server, monkeypatch):
    from clients import AuthenticationError, CalibClient, ServiceError

    monkeypatch.delenv("CALIB_API_KEY", raising=False)
    with CalibClient(keyed_server, api_key=KEY_A) as client:
        result = client.predict(GOOD["instances"], mc_samples=2, seed=1)
        assert result.model == MODEL and len(result.request_id) == 32
        assert client.last_request_id == result.request_id
    monkeypatch.setenv("CALIB_API_KEY", KEY_B)
    with CalibClient(keyed_server) as client:  # from the environment
        assert [m.name for m in client.models()] == [MODEL]
    with pytest.raises(AuthenticationError) as err, CalibClient(keyed_server, api_key="") as client:
        client.models()
    assert isinstance(err.value, ServiceError) and err.value.status == 401 and err.value.code == "unauthorized"
    assert "needs an API key" in err.value.message and "CALIB_API_KEY" in err.value.message
    assert err.value.request_id and err.value.request_id in str(err.value)
    with pytest.raises(AuthenticationError) as err, CalibClient(keyed_server, api_key="wrong") as client:
        client.models()
    assert "invalid API key" in err.value.message and "check the API key" in err.value.message


def test_async_client_sends_the_key(keyed_server):
    import asyncio

    from clients import AsyncCalibClient, AuthenticationError

    async def run():
        async with AsyncCalibClient(keyed_server, api_key=FILE_KEY) as client:
            cards = await asyncio.gather(*(client.card(MODEL) for _ in range(3)))
            assert {c["name"] for c in cards} == {MODEL}
        async with AsyncCalibClient(keyed_server, api_key="nope") as client:
            with pytest.raises(AuthenticationError):
                await client.models()

    asyncio.run(run())


def _cli(url, *args, key=None):
    env = {k: v for k, v in os.environ.items() if k != "CALIB_API_KEY"}
    if key is not None:
        env["CALIB_API_KEY"] = key
    return subprocess.run([sys.executable, "-m", "clients", "--url", url, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.subprocess
def test_cli_sends_the_key_from_option_or_env(keyed_server, small_npz):
    ok = _cli(keyed_server, "--api-key", KEY_A, "models", "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["models"][0]["name"] == MODEL
    ev = _cli(keyed_server, "evaluate", str(small_npz), "--json", key=KEY_B)
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout)["n"] == 24
    denied = _cli(keyed_server, "models")
    assert denied.returncode == 1
    assert "unauthorized" in denied.stderr and "CALIB_API_KEY" in denied.stderr
    wrong = _cli(keyed_server, "--api-key", "wrong-one", "models")
    assert wrong.returncode == 1 and "invalid API key" in wrong.stderr and "wrong-one" not in wrong.stderr


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_curl_script_sends_the_key(keyed_server, small_npz, tmp_path):
    script = str(REPO / "clients" / "evaluate_with_curl.sh")
    env = {k: v for k, v in os.environ.items() if k != "CALIB_API_KEY"}
    env.update(CALIB_URL=keyed_server, CALIB_API_KEY=KEY_A)
    out = subprocess.run(["bash", script, str(small_npz), str(tmp_path / "ok")], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "ok" / "report.json").read_text())
    assert report["model"] == MODEL and report["n"] == 24
    assert (tmp_path / "ok" / "diagram.png").read_bytes().startswith(b"\x89PNG")
    del env["CALIB_API_KEY"]
    denied = subprocess.run(["bash", script, str(small_npz), str(tmp_path / "denied")], env=env,
                            capture_output=True, text=True, timeout=120)
    assert denied.returncode != 0 and '"code":"unauthorized"' in denied.stderr
    env.update(CALIB_MODEL=MODEL)  # skips the listing: the evaluate call itself is refused
    denied = subprocess.run(["bash", script, str(small_npz), str(tmp_path / "denied2")], env=env,
                            capture_output=True, text=True, timeout=120)
    assert denied.returncode != 0 and '"code":"unauthorized"' in denied.stderr


def test_server_refuses_a_bad_key_in_one_line_without_echoing_it(tmp_path):
    """The command's one-line settings error names CALIB_API_KEYS but never prints its value."""
    env = {**os.environ, "CALIB_API_KEYS": "good-key,bad key-with-space", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "service"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "bad setting" in lines[0] and "CALIB_API_KEYS" in lines[0], out.stderr
    assert "good-key" not in out.stderr and "with-space" not in out.stderr
