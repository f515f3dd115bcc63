"""GET /ui: the dashboard, a static page (HTML, CSS, one script) shipped in `service/ui/static/`.

HTTP only: the files are read once and served as they are, with no data in them, so the page
loads without an API key; its script asks for a key when the API answers 401 and calls the API
like any client (docs/dashboard.md). Every answer carries a strict Content-Security-Policy: the
page's own script and style only (no inline code, no CDN), images from the service or from blob:
URLs (the diagrams the script fetches with the key), requests to the service alone.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Response

from service.inputs import InputError

STATIC_DIR = Path(__file__).resolve().parents[1] / "ui" / "static"

# the only files served, with their media types: nothing else of the folder is reachable
ASSETS = {"dashboard.js": "text/javascript; charset=utf-8", "dashboard.css": "text/css; charset=utf-8",
          "favicon.svg": "image/svg+xml"}

CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
                           "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
                           "frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "X-Content-Type-Options": "nosniff",
           "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}

router = APIRouter(tags=["dashboard"], include_in_schema=False)


def _read(name: str) -> bytes:
    return (STATIC_DIR / name).read_bytes()


_PAGE = _read("index.html")
_ASSETS = {name: _read(name) for name in ASSETS}


@router.get("/ui")
async def dashboard() -> Response:
    return Response(_PAGE, media_type="text/html; charset=utf-8", headers=HEADERS)


@router.get("/ui/static/{asset}")
async def dashboard_asset(asset: str) -> Response:
    if asset not in _ASSETS:
        raise InputError("not_found", "no such dashboard file", 404)
    return Response(_ASSETS[asset], media_type=ASSETS[asset], headers=HEADERS)
