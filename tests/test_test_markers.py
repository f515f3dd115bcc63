"""`make test` leaves out every registered marker: a marker added to pyproject.toml without the
Makefile's expression would silently put its (slow) tests into the fast run."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_make_test_deselects_every_registered_marker():
    ini = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    registered = {m.split(":")[0].strip() for m in ini["markers"]}
    assert "--strict-markers" in ini["addopts"].split()
    expression = re.search(r"^FAST_TESTS := not \((.*)\)$", (REPO / "Makefile").read_text(), re.M).group(1)
    assert set(expression.split(" or ")) == registered
    assert "slow" in registered
