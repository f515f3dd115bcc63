"""The service's version, from one place: the installed distribution's metadata, or, in a source
tree that was never installed, the `version` in pyproject.toml next to the package."""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

DISTRIBUTION = "calibrated-cifar"
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
UNKNOWN = "0+unknown"


def package_version() -> str:
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return source_tree_version(PYPROJECT)


def source_tree_version(pyproject: Path) -> str:
    """`[project] version` of `pyproject`, or UNKNOWN when there is no readable one."""
    try:
        return str(tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["version"])
    except (OSError, UnicodeDecodeError, KeyError, TypeError, tomllib.TOMLDecodeError):
        return UNKNOWN
