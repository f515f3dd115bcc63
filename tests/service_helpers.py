"""Constants and payload helpers of the service tests. The fixtures they go with
(`service_model_dir`, `service_settings`, `app_client`, `split_classifier`) are in conftest.py."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

MODEL = "tiny"
BROKEN = "broken"
MAX_BODY = 4 * 1024 * 1024
MAX_INSTANCES = 64
MAX_EVAL = 3000
MAX_MC = 500


# --- payload helpers ---------------------------------------------------------------------------
def png_bytes(image: np.ndarray, mode: str | None = None, fmt: str = "PNG") -> bytes:
    img = Image.fromarray(np.asarray(image, np.uint8))
    if mode is not None:
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def npy_bytes(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=allow_pickle)
    return buf.getvalue()


def npz_bytes(compressed: bool = False, **arrays) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return buf.getvalue()


def error_of(response, status: int, code: str) -> str:
    """Assert the JSON error envelope; return the message."""
    assert response.status_code == status, (response.status_code, response.text[:500])
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert err["code"] == code, err
    assert err["status"] == status
    assert isinstance(err["message"], str) and err["message"], err
    return err["message"]


def forward_to(test_client):
    """An httpx MockTransport that hands every request to an in-process app's TestClient (how the
    client and CLI tests reach the app without a server)."""
    import httpx

    def handler(request: httpx.Request) -> httpx.Response:
        r = test_client.request(request.method, request.url.raw_path.decode(), content=request.content,
                                headers={k: v for k, v in request.headers.items() if k.lower() != "host"})
        return httpx.Response(r.status_code, headers=r.headers, content=r.content)

    return httpx.MockTransport(handler)
