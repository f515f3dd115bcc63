"""One section's report: report.json (figures + provenance), PNG plots and report.md.

The JSON holds only finite numbers: a NaN or infinity in a figure is an error in the experiment,
so `write` refuses it instead of writing `NaN` (which is not JSON anyway).
"""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


# Reports are committed and read on other machines: a path in them is written relative to the
# working directory, or as `$CIFAR10_DIR/...` when it lies under that variable's value, never
# as the absolute layout of the machine that ran the lab.
#: Data folders a report writes as shell variables, so no machine's path is committed
#: ($CIFAR100_DIR: the shift benchmark's real OOD set).
DATA_DIR_VARIABLES = ("CIFAR10_DIR", "CIFAR100_DIR")


def _under_variable(path: str) -> tuple[str, str] | None:
    """(variable, the rest of `path` after it: '' for the folder itself) for the first of
    DATA_DIR_VARIABLES that `path` is under, or None."""
    path = os.path.normpath(path)
    for variable in DATA_DIR_VARIABLES:
        root = os.environ.get(variable, "")
        if not root or not os.path.isabs(root):
            continue
        root = os.path.normpath(root)
        if path == root:
            return variable, ""
        if path.startswith(root.rstrip(os.sep) + os.sep):
            return variable, path[len(root):]
    return None


def _relative(path: str) -> str:
    try:
        return os.path.relpath(path)
    except ValueError:   # another drive (Windows): no relative form; the name still says what it was
        return os.path.basename(path)


def portable_path(value: str) -> str:
    """A path as a report shows it: as typed if relative, else `$CIFAR10_DIR...` (or another of
    DATA_DIR_VARIABLES) or cwd-relative."""
    if not os.path.isabs(value):
        return value
    under = _under_variable(value)
    return f"${under[0]}{under[1]}" if under is not None else _relative(value)


def portable_command(argv: list[str], program: str = "python -m training.lab") -> str:
    """The command line a report records: the arguments as typed, absolute paths made portable.

    The shell has expanded `$CIFAR10_DIR` before Python sees it, so a value under it is written
    back as the variable (unquoted, so the line can be pasted into a shell).
    """
    def shown(arg: str) -> str:
        if arg.startswith("--") and "=" in arg:
            flag, value = arg.split("=", 1)
            return f"{flag}={shown(value)}"
        if not os.path.isabs(arg):
            return shlex.quote(arg)
        under = _under_variable(arg)
        if under is None:
            return shlex.quote(_relative(arg))
        variable, rest = under
        return f"${variable}" + (shlex.quote(rest) if rest else "")

    return " ".join([program, *map(shown, argv)])


def _plain(value: Any, where: str = "figures") -> Any:
    """NumPy scalars/arrays -> JSON types; refuses non-finite floats."""
    if isinstance(value, dict):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist(), where)
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        f = float(value)
        if not math.isfinite(f):
            raise ValueError(f"non-finite number {f} in {where}")
        return f
    if value is None or isinstance(value, str):
        return value
    raise TypeError(f"cannot write {type(value).__name__} at {where} to JSON")


def versions() -> dict[str, str]:
    import keras
    import tensorflow as tf

    found = {"python": platform.python_version(), "tensorflow": tf.__version__,
             "keras": keras.__version__, "numpy": np.__version__}
    if "torch" in sys.modules:
        found["torch"] = sys.modules["torch"].__version__
    return found


class Report:
    """Collects one section's figures and plots; `write` puts them under `out_dir`."""

    def __init__(self, section: str, out_dir: Path, *, command: str, seed: int, quick: bool,
                 arguments: dict[str, Any]):
        self.section = section
        self.out_dir = Path(out_dir)
        self.command = command
        self.seed = seed
        self.quick = quick
        self.arguments = arguments
        self.data: dict[str, Any] = {}
        self.figures: dict[str, Any] = {}
        self.summary: list[str] = []   # Markdown lines, written under the provenance header
        self.pngs: list[str] = []
        self._started = time.time()
        self.out_dir.mkdir(parents=True, exist_ok=True)

    # --- plots -----------------------------------------------------------------------------
    def figure(self, ncols: int = 1, nrows: int = 1, size=(5.0, 4.0)):
        """A bare matplotlib Figure (no pyplot global state) with a grid of axes."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False)
        return fig, axes

    def png(self, name: str, fig_or_bytes) -> str:
        """Save a Figure (or ready PNG bytes) as `<name>.png`; returns the file name."""
        filename = f"{name}.png"
        path = self.out_dir / filename
        if isinstance(fig_or_bytes, (bytes, bytearray)):
            path.write_bytes(fig_or_bytes)
        else:
            from matplotlib.backends.backend_agg import FigureCanvasAgg

            FigureCanvasAgg(fig_or_bytes).print_png(str(path))
        self.pngs.append(filename)
        return filename

    # --- output ----------------------------------------------------------------------------
    def to_dict(self, wall_seconds: float) -> dict[str, Any]:
        return {
            "section": self.section,
            "command": self.command,
            "quick": self.quick,
            "seed": self.seed,
            "arguments": self.arguments,
            "data": self.data,
            "wall_seconds": round(wall_seconds, 2),
            "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "versions": versions(),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                        "TF_ENABLE_ONEDNN_OPTS": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "")},
            "figures": self.figures,
            "pngs": self.pngs,
        }

    def write(self) -> Path:
        wall = time.time() - self._started
        doc = _plain(self.to_dict(wall), "report")
        (self.out_dir / "report.json").write_text(json.dumps(doc, indent=2) + "\n")
        lines = [
            f"# Lab section `{self.section}`" + (" (quick run)" if self.quick else ""),
            "",
            f"- command: `{self.command}`",
            f"- data: {self.data.get('source', 'synthetic (generated in the run)')}"
            + (f" ({self.data['checksum']})" if self.data.get("checksum") else ""),
            f"- images used: {self.data.get('used', 'n/a')}",
            f"- seed: {self.seed}",
            f"- wall time: {wall:.1f} s on {os.cpu_count()} CPU cores",
            f"- versions: " + ", ".join(f"{k} {v}" for k, v in doc["versions"].items()),
            "",
            *self.summary,
            "",
            "## Plots",
            "",
            *[f"![{name}]({name})" for name in self.pngs],
            "",
            "All numbers are in `report.json` (`figures`).",
            "",
        ]
        (self.out_dir / "report.md").write_text("\n".join(lines))
        return self.out_dir
