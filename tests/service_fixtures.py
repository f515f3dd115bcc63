"""Fixtures and helpers shared by the service tests (import the fixtures into a test module).

`service_model_dir` holds a copy of the session's `tiny_artifact` plus a corrupt artifact (its
model file truncated, so the checksum fails) and an unrelated folder, so every app built on it
exercises skip-and-report at startup.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

MODEL = "tiny"
BROKEN = "broken"
MAX_BODY = 4 * 1024 * 1024
MAX_INSTANCES = 64
MAX_EVAL = 3000
MAX_MC = 500


@pytest.fixture(scope="session")
def service_model_dir(tmp_path_factory, tiny_artifact) -> Path:
    root = tmp_path_factory.mktemp("model_dir")
    shutil.copytree(tiny_artifact, root / MODEL)
    broken = root / BROKEN
    shutil.copytree(tiny_artifact, broken)
    model_file = broken / "model.keras"
    model_file.write_bytes(model_file.read_bytes()[:1000])
    (root / "notes").mkdir()
    (root / "notes" / "README.txt").write_text("not an artifact\n")
    return root


@pytest.fixture(scope="session")
def service_settings(service_model_dir):
    from service.settings import Settings

    return Settings(model_dir=service_model_dir, max_body_bytes=MAX_BODY, max_instances=MAX_INSTANCES,
                    max_eval_images=MAX_EVAL, max_mc_samples=MAX_MC, eval_chunk=128, mc_chunk_rows=1000)


@pytest.fixture(scope="session")
def app_client(service_settings):
    """One in-process app for the session (lifespan run: models loaded once)."""
    from fastapi.testclient import TestClient

    from service.app import create_app

    with TestClient(create_app(service_settings), raise_server_exceptions=False) as client:
        yield client


@pytest.fixture(scope="session")
def split_classifier(tiny_artifact):
    """An independent in-process copy of the tiny model, for reference numbers."""
    from models.artifact import load_artifact
    from models.inference import SplitClassifier

    artifact = load_artifact(tiny_artifact)
    return SplitClassifier(artifact.model), artifact.card


def forward_to(test_client):
    """An httpx MockTransport that hands every request to an in-process app's TestClient (how the
    client and CLI tests reach the app without a server)."""
    import httpx

    def handler(request: httpx.Request) -> httpx.Response:
        r = test_client.request(request.method, request.url.raw_path.decode(), content=request.content,
                                headers={k: v for k, v in request.headers.items() if k.lower() != "host"})
        return httpx.Response(r.status_code, headers=r.headers, content=r.content)

    return httpx.MockTransport(handler)


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
