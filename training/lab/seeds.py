"""`python -m training.lab.seeds REPORT_DIR [REPORT_DIR ...] --out FILE`: one table over seeds.

Section 4 at full scale runs once per seed into its own folder (`--seed 0 --out .../seed0`, ...).
This reads their `mixing/report.json`, checks that they ran the same settings (but the seed) on the
same data, and writes a markdown table of each condition's mean and spread (half the range: with
two seeds, each seed lies at mean ± spread) for test accuracy, ECE-15 and NLL before and after the
temperature, plus a plot of the mean test-accuracy curves with the seeds' range shaded.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from commandline import ArgumentParser, UsageError, command, invoked_as

PROG = invoked_as("training.lab.seeds")
COLUMNS = (("final_test_accuracy", "test accuracy", 100, "{:.2f}%"),
           ("test_ece15_before_temperature", "ECE-15", 100, "{:.2f}%"),
           ("test_nll_before_temperature", "NLL", 1, "{:.3f}"),
           ("temperature", "T (fitted on validation)", 1, "{:.3f}"),
           ("test_ece15_after_temperature", "ECE-15 after T", 100, "{:.2f}%"),
           ("test_nll_after_temperature", "NLL after T", 1, "{:.3f}"))


def load(folders: list[Path]) -> list[dict]:
    reports = []
    for folder in folders:
        path = folder / "mixing" / "report.json" if (folder / "mixing").is_dir() else folder / "report.json"
        if not path.is_file():
            raise UsageError(f"no mixing report in {folder} (expected {path})")
        reports.append(json.loads(path.read_text()))
    base = reports[0]
    for other in reports[1:]:
        if other["data"]["checksum"] != base["data"]["checksum"] or other["data"]["used"] != base["data"]["used"]:
            raise UsageError("the reports used different data")
        if other["figures"]["settings"] != base["figures"]["settings"]:
            raise UsageError("the reports ran different settings")
    if len({r["seed"] for r in reports}) != len(reports):
        raise UsageError("two reports have the same seed")
    return reports


def _value(result: dict, key: str) -> float | None:
    return result[key] if key in result else result.get("calibration", {}).get(key)


def table(reports: list[dict]) -> list[str]:
    """The columns every report has (a run without a validation split has no temperature)."""
    results = [res for r in reports for res in r["figures"]["accuracy"].values()]
    columns = [c for c in COLUMNS if all(_value(res, c[0]) is not None for res in results)]
    seeds = ", ".join(str(r["seed"]) for r in reports)
    head = "| condition | " + " | ".join(title for _, title, _, _ in columns) + " |"
    rows = [f"Mean ± spread over seeds {seeds} (spread: half the range across seeds).", "", head,
            "|" + " --- |" * (len(columns) + 1)]
    for name in reports[0]["figures"]["accuracy"]:
        cells = []
        for key, _, scale, fmt in columns:
            values = np.array([_value(r["figures"]["accuracy"][name], key) for r in reports]) * scale
            spread = (values.max() - values.min()) / 2
            cells.append(f"{fmt.format(values.mean())} ± {fmt.format(spread).rstrip('%')}")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return rows


def plot(reports: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.add_subplot()
    for name in reports[0]["figures"]["accuracy"]:
        curves = np.array([r["figures"]["accuracy"][name]["test_accuracy"] for r in reports]) * 100
        epochs = np.arange(1, curves.shape[1] + 1)
        ax.plot(epochs, curves.mean(axis=0), label=name)
        ax.fill_between(epochs, curves.min(axis=0), curves.max(axis=0), alpha=0.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"test accuracy, mean over {len(reports)} seed(s), range shaded")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


@command(PROG)
def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("reports", nargs="+", type=Path, help="--out folders of section-4 runs (one per seed)")
    p.add_argument("--out", type=Path, required=True, help="markdown file; the plot goes beside it (.png)")
    args = p.parse_args(argv)
    reports = load(args.reports)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(table(reports)) + "\n")
    plot(reports, args.out.with_suffix(".png"))
    print("\n".join(table(reports)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
