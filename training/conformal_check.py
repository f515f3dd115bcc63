"""Measure an artifact's conformal prediction sets on the test split (images it never saw).

    python -m training.conformal_check models/shipped/cifar10-augmix --data $CIFAR10_DIR \
        --output reports/conformal-clean

The thresholds come from the card's calibration set (`calibration_set.npz`, the validation
split, written by `training.fit_conformal`); the sets are measured on the 10,000 test images:
empirical coverage, mean set size, singletons, empty sets, coverage by set size and the worst
class, for each coverage level, score and the class-conditional option. Prints a table and, with
--output, writes `<model>.json` and `<model>.md` there.
"""

from __future__ import annotations

from commandline import ArgumentParser, CommandError, command, invoked_as, setup_tensorflow

setup_tensorflow()

import json
import platform
import sys
import time
from pathlib import Path

PROG = invoked_as("training.conformal_check")
COVERAGES = (0.8, 0.9, 0.95)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def check_artifact(artifact_dir: str, data_source: str, coverages=COVERAGES) -> dict:
    from training.data import load_cifar10

    data = load_cifar10(data_source)

    from models.artifact import load_artifact
    from models.calibration import softmax
    from models.calibration.conformal import METHODS, ConformalCalibration, evaluate_sets
    from models.conformal_set import load_calibration_set, stale_reason
    from models.inference import SplitClassifier

    artifact = load_artifact(artifact_dir)
    card = artifact.card
    stored = load_calibration_set(artifact.path, card)
    if stored is None or stale_reason(card):
        raise CommandError(f"{artifact_dir}: no usable conformal calibration set "
                           f"({stale_reason(card) or 'run python -m training.fit_conformal first'})")
    t = float(card["temperature"])
    calibration = ConformalCalibration(softmax(stored[0].astype("float64"), t), stored[1])
    started = time.time()
    probabilities = softmax(SplitClassifier(artifact.model).logits(data.x_test), t)
    results = []
    for mondrian in (False, True):
        results += evaluate_sets(calibration, probabilities, data.y_test, coverages, METHODS, mondrian)
    return {"model": artifact.name, "temperature": t, "calibration_n": calibration.n,
            "test_n": int(len(data.y_test)), "seconds": round(time.time() - started, 1), "cpu": cpu_name(),
            "command": "python -m training.conformal_check ARTIFACT --data $CIFAR10_DIR", "results": results}


def markdown(report: dict) -> str:
    lines = [f"# Conformal prediction sets of {report['model']} on the clean test split",
             "",
             f"Thresholds from the card's {report['calibration_n']} validation images (T = "
             f"{report['temperature']:.4f}); measured on {report['test_n']} test images. "
             f"Command: `{report['command']}` ({report['cpu']}).",
             "",
             "| target | score | class-cond. | coverage | mean size | singletons | empty | worst class (coverage) |",
             "|---:|:--|:--:|---:|---:|---:|---:|:--|"]
    for r in report["results"]:
        w = r["worst_class"]
        lines.append(f"| {r['coverage_target']:.2f} | {r['method']} | {'yes' if r['mondrian'] else 'no'} | "
                     f"{r['coverage']:.4f} | {r['mean_set_size']:.3f} | {r['singletons']:.1%} | {r['empty']:.2%} | "
                     f"{w['class']} ({w['coverage']:.4f}) |")
    return "\n".join(lines) + "\n"


@command(PROG)
def main(argv=None) -> int:
    p = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("artifact", help="artifact folder with calibration_set.npz")
    p.add_argument("--data", required=True, help="the CIFAR-10 source (its test split is measured)")
    p.add_argument("--coverage", type=float, action="append", help=f"coverage levels (default {COVERAGES})")
    p.add_argument("--output", type=Path, help="folder for <model>.json and <model>.md")
    args = p.parse_args(argv)
    if args.coverage and not all(0 < c < 1 for c in args.coverage):
        p.error("--coverage must lie strictly between 0 and 1")
    report = check_artifact(args.artifact, args.data, tuple(args.coverage or COVERAGES))
    table = markdown(report)
    print(table)
    if args.output is not None:
        args.output.mkdir(parents=True, exist_ok=True)
        (args.output / f"{report['model']}.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.output / f"{report['model']}.md").write_text(table)
        print(f"written to {args.output}/{report['model']}.json and .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
