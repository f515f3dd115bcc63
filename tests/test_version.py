"""The service reports the package's version: from the installed metadata, else pyproject.toml."""

from __future__ import annotations

import importlib.metadata
import tomllib

from service import version
from service.version import UNKNOWN, package_version, source_tree_version


def test_version_is_the_installed_distributions():
    assert package_version() == importlib.metadata.version("calibrated-cifar")


def test_source_tree_without_install_reads_pyproject(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    expected = tomllib.loads(version.PYPROJECT.read_text())["project"]["version"]
    assert package_version() == expected


def test_missing_or_broken_pyproject_gives_unknown(tmp_path):
    assert source_tree_version(tmp_path / "absent.toml") == UNKNOWN
    broken = tmp_path / "pyproject.toml"
    broken.write_text("[project\nversion = ")
    assert source_tree_version(broken) == UNKNOWN
    broken.write_text('[project]\nname = "x"\n')
    assert source_tree_version(broken) == UNKNOWN
    broken.write_text('[project]\nversion = "2.3.4"\n')
    assert source_tree_version(broken) == "2.3.4"


def test_app_and_openapi_carry_the_version(tmp_path):
    from service.app import create_app
    from service.settings import Settings

    app = create_app(Settings(model_dir=tmp_path))
    assert app.version == package_version()
    assert app.openapi()["info"]["version"] == package_version()
