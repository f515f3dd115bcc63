"""The server does not depend on the training package: no service module imports it, and the
service imports and builds its app with `training` made unimportable."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # starts a Python subprocess that imports the service

REPO = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append(node.module)
    return out


def test_no_service_module_imports_training():
    offenders = []
    for path in sorted((REPO / "service").rglob("*.py")):
        offenders += [f"{path.relative_to(REPO)}: {name}" for name in _imports(path)
                      if name == "training" or name.startswith("training.")]
    assert offenders == []


def test_shared_packages_import_neither_service_nor_training():
    for path in [REPO / "commandline.py", *sorted((REPO / "imagedata").rglob("*.py"))]:
        bad = [n for n in _imports(path) if n.split(".")[0] in ("service", "training")]
        assert bad == [], path


BLOCKER = """
import importlib.abc, sys

class NoTraining(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "training" or name.startswith("training."):
            raise ImportError(f"blocked: {name}")
        return None

sys.meta_path.insert(0, NoTraining())
import service.__main__, service.app, service.workers, service.rest.models, service.rest.v2
from service.app import create_app
from service.settings import Settings, load_settings

app = create_app(Settings(warmup=False))
assert app.openapi()["paths"]
assert service.__main__.main(["--help"]) == 0
assert not any(m == "training" or m.startswith("training.") for m in sys.modules), "training was imported"
print("OK")
"""


def test_service_imports_and_builds_its_app_without_training():
    out = subprocess.run([sys.executable, "-c", BLOCKER], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env={**__import__("os").environ, "PYTHONPATH": str(REPO),
                                           "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("OK")
