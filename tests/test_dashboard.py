"""The /ui dashboard in process: the page and its two files are served with the right types and a
strict Content-Security-Policy, stay open when API keys are on (they hold no data), reference
nothing outside the service, and are package data; plus the card's reliability diagram route the
page shows. The page's behaviour in a real browser: tests/test_dashboard_browser.py."""

from __future__ import annotations

import fnmatch
import io
import re
import tomllib
from pathlib import Path

import pytest
from PIL import Image

from tests.service_helpers import MAX_BODY, MODEL, error_of

REPO = Path(__file__).resolve().parents[1]
STATIC = REPO / "service" / "ui" / "static"
KEY = "dashboard-test-key"


def _csp(response) -> dict[str, str]:
    policy = response.headers["content-security-policy"]
    return {d.split()[0]: " ".join(d.split()[1:]) for d in (p.strip() for p in policy.split(";")) if d}


def _assert_strict_headers(response) -> None:
    csp = _csp(response)
    assert csp["default-src"] == "'self'"
    assert csp["script-src"] == "'self'" and csp["style-src"] == "'self'"
    assert csp["img-src"] == "'self' blob:" and csp["connect-src"] == "'self'"
    assert csp["object-src"] == "'none'" and csp["frame-ancestors"] == "'none'" and csp["base-uri"] == "'none'"
    assert "unsafe" not in response.headers["content-security-policy"]
    assert response.headers["x-content-type-options"] == "nosniff"


def test_the_page_is_html_with_a_strict_policy(app_client):
    r = app_client.get("/ui")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    _assert_strict_headers(r)
    html = r.text
    assert "<h1>Calibration dashboard</h1>" in html
    # no inline script or style: every script has a src, there is no <style> and no style= / on*= attribute
    assert re.findall(r"<script\b[^>]*>", html) == ['<script src="/ui/static/dashboard.js" defer>']
    assert re.findall(r"<script\b[^>]*>(.*?)</script>", html, re.S) == [""]
    assert "<style" not in html and re.search(r"\sstyle=", html) is None and re.search(r"\son\w+=", html) is None
    # everything it loads is the service's own
    assert set(re.findall(r'(?:src|href)="([^"]+)"', html)) == {"/ui/static/dashboard.js", "/ui/static/dashboard.css",
                                                                "/ui/static/favicon.svg"}
    # every input has a label
    for input_id in re.findall(r'<(?:input|select)[^>]*\bid="([^"]+)"', html):
        assert f'for="{input_id}"' in html, input_id


@pytest.mark.parametrize("name, media_type", [("dashboard.js", "text/javascript; charset=utf-8"),
                                              ("dashboard.css", "text/css; charset=utf-8"),
                                              ("favicon.svg", "image/svg+xml")])
def test_the_script_and_style_sheet_are_served_with_their_types(app_client, name, media_type):
    r = app_client.get(f"/ui/static/{name}")
    assert r.status_code == 200 and r.headers["content-type"] == media_type
    assert r.content == (STATIC / name).read_bytes()
    _assert_strict_headers(r)


@pytest.mark.parametrize("path", ["/ui/static/index.html", "/ui/static/..%2F..%2Fapp.py", "/ui/static/missing.js",
                                  "/ui/static/", "/ui/"])
def test_nothing_else_is_served(app_client, path):
    error_of(app_client.get(path), 404, "not_found")


def test_the_script_inserts_text_only_and_loads_nothing_external():
    js = (STATIC / "dashboard.js").read_text()
    for forbidden in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert forbidden not in js, forbidden
    # the only absolute URL is the SVG namespace (an identifier, never fetched)
    assert set(re.findall(r"https?://[^\s\"']+", js)) == {"http://www.w3.org/2000/svg"}
    css = (STATIC / "dashboard.css").read_text()
    assert "url(" not in css and "@import" not in css
    # the key header the page sends is the one the service reads
    from service.rest.auth import API_KEY_HEADER

    assert f'const KEY_HEADER = "{API_KEY_HEADER}";' in js


def test_the_static_files_are_package_data_and_in_the_image():
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    files = sorted(p.relative_to(REPO / "service").as_posix() for p in STATIC.iterdir())
    assert files == ["ui/static/dashboard.css", "ui/static/dashboard.js", "ui/static/favicon.svg",
                     "ui/static/index.html"]
    for f in files:
        assert any(fnmatch.fnmatch(f, pattern) for pattern in package_data["service"]), f
    assert "COPY service/ service/" in (REPO / "Dockerfile").read_text()


def test_the_page_is_not_in_the_api_document(app_client):
    paths = app_client.get("/openapi.json").json()["paths"]
    assert not any(p.startswith("/ui") for p in paths)
    assert "/v1/models/{name}/reliability.png" in paths


def test_card_reliability_diagram(app_client, tiny_artifact):
    r = app_client.get(f"/v1/models/{MODEL}/reliability.png")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(r.content))
    assert image.format == "PNG" and image.width > 500 and image.height > 300
    assert app_client.get(f"/v1/models/{MODEL}/reliability.png").content == r.content  # cached, same bytes
    error_of(app_client.get("/v1/models/nope/reliability.png"), 404, "unknown_model")


def test_card_diagram_needs_the_cards_bins(tiny_artifact):
    import json

    from service import card_diagram

    card = json.loads((tiny_artifact / "model_card.json").read_text())
    before, after = card_diagram.card_metrics(card)
    assert after.ece == card["metrics"]["test_after_temperature"]["ece"] and before.temperature == 1.0
    assert len(after.bins) == after.n_bins
    for broken in ({}, {"metrics": {"test_after_temperature": card["metrics"]["test_after_temperature"]}},
                   {"metrics": {**card["metrics"], "test_before_temperature": {"n": 3}}}):
        with pytest.raises(card_diagram.DiagramUnavailable, match="reliability bins"):
            card_diagram.card_reliability_png("x", broken)


def test_card_diagram_route_says_when_the_card_has_no_bins(tiny_artifact, tmp_path):
    """An artifact whose card lacks the bins (hand-written or older) answers 404 diagram_unavailable."""
    import shutil

    from fastapi.testclient import TestClient

    from models.artifact import update_card
    from service.app import create_app
    from service.settings import Settings

    folder = shutil.copytree(tiny_artifact, tmp_path / "models" / MODEL)
    update_card(folder, {"metrics": {"test_after_temperature": {"accuracy": 0.5}}})
    with TestClient(create_app(Settings(model_dir=tmp_path / "models", warmup=False,
                                        database_url=f"sqlite:///{tmp_path / 'db.sqlite'}"))) as client:
        message = error_of(client.get(f"/v1/models/{MODEL}/reliability.png"), 404, "diagram_unavailable")
        assert "test_before_temperature" in message


def test_the_page_stays_open_with_api_keys(service_model_dir, tmp_path):
    """The page and its files hold no data: no key needed; the data it shows stays behind the key."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    settings = Settings(model_dir=service_model_dir, max_body_bytes=MAX_BODY, warmup=False, api_keys=KEY,
                        database_url=f"sqlite:///{tmp_path / 'db.sqlite'}")
    with TestClient(create_app(settings)) as client:
        for path in ("/ui", "/ui/static/dashboard.js", "/ui/static/dashboard.css"):
            assert client.get(path).status_code == 200, path
        error_of(client.get("/v1/models"), 401, "unauthorized")
        error_of(client.get(f"/v1/models/{MODEL}/reliability.png"), 401, "unauthorized")
        assert client.get(f"/v1/models/{MODEL}/reliability.png", headers={"X-API-Key": KEY}).status_code == 200
