"""`python -m training.lab SECTION|all [--quick] [--out DIR] [--data SRC] [--epochs N] ...`

One command runs one section (or all, one after another) and writes its report to
`<out>/<section>/`. `--quick` runs a small version on the repository's test fixture (for CI and tests).
"""

from __future__ import annotations

from commandline import ArgumentParser, command, setup_tensorflow

setup_tensorflow()   # also oneDNN on: 1.5x faster on this CPU; never bf16 here

import argparse
import importlib
import shutil
import sys
import time
from pathlib import Path

from training.lab import SECTIONS
from training.lab.report import portable_command

PROG = "python -m training.lab"


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(prog=PROG, description=__doc__.split("\n")[2])
    parser.add_argument("section", choices=[*SECTIONS, "all"])
    parser.add_argument("--quick", action="store_true",
                        help="small settings on the repository's test fixture; a minute or two for all sections")
    parser.add_argument("--out", default="reports/lab", help="reports go to OUT/<section>/")
    parser.add_argument("--data", default=None,
                        help="CIFAR-10 source for load_cifar10 (default: the repository's test fixture with "
                             "--quick, else 'keras')")
    parser.add_argument("--epochs", type=int, default=None, help="override the section's default")
    parser.add_argument("--width", type=int, default=None, help="network width (override)")
    parser.add_argument("--train-size", type=int, default=None,
                        help="seeded subset of the training split (override)")
    parser.add_argument("--test-size", type=int, default=None,
                        help="seeded subset of the test split (override)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arch", choices=("resnet9", "airbench"), default=None,
                        help="mixing section: the lab's residual CNN (default) or the shipped airbench backbone")
    parser.add_argument("--group-widths", default=None,
                        help="mixing section, airbench: channels of its three groups, e.g. 24,192,192 (shipped)")
    parser.add_argument("--validation-size", type=int, default=None,
                        help="mixing section: hold this many training images out to fit a temperature "
                             "(5000: the 45,000/5,000 split)")
    parser.add_argument("--batch-size", type=int, default=None, help="mixing section: batch size (override)")
    parser.add_argument("--artifact", default=None,
                        help="dropout section: also measure MC uncertainty of this trained artifact "
                             "(e.g. models/shipped/cifar10-airbench)")
    args = parser.parse_args(argv)
    if args.group_widths is not None:
        try:
            args.group_widths = tuple(int(w) for w in args.group_widths.split(","))
        except ValueError:
            parser.error("--group-widths must be three integers, e.g. 24,192,192")
        if len(args.group_widths) != 3 or min(args.group_widths) < 1:
            parser.error("--group-widths must be three positive integers, e.g. 24,192,192")
    for name in ("epochs", "width", "train_size", "test_size", "validation_size", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    return args


def run_section(section: str, args: argparse.Namespace, command: str) -> Path:
    from training.lab.context import LabContext, seed_everything
    from training.lab.report import Report

    ctx = LabContext(quick=args.quick, data=args.data, epochs=args.epochs, width=args.width,
                     train_size=args.train_size, test_size=args.test_size, seed=args.seed,
                     artifact=args.artifact, arch=args.arch, group_widths=args.group_widths,
                     validation_size=args.validation_size, batch_size=args.batch_size)
    report = Report(section, Path(args.out) / section, command=command, seed=args.seed,
                    quick=args.quick, arguments=ctx.picked)
    seed_everything(args.seed)
    module = importlib.import_module(SECTIONS[section])
    started = time.time()
    module.run(ctx, report)
    path = report.write()
    # a section that resumes (mixing) keeps its checkpoints here until its report is written
    shutil.rmtree(report.out_dir / ".checkpoint", ignore_errors=True)
    print(f"[{section}] report written to {path} ({time.time() - started:.0f} s)", flush=True)
    return path


def check_inputs(args: argparse.Namespace) -> None:
    """Fail in a second, before any training, on a missing data path or a bad artifact."""
    from models.artifact import read_card
    from training.data import DataSourceError

    if args.data not in (None, "keras") and not Path(args.data).exists():
        raise DataSourceError(f"CIFAR-10 source does not exist: {args.data}")
    if args.artifact is not None:
        read_card(args.artifact)


@command(PROG)
def main(argv=None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw)
    check_inputs(args)
    command = portable_command(raw)  # as typed; no absolute path of this machine in a report
    sections = list(SECTIONS) if args.section == "all" else [args.section]
    for section in sections:
        run_section(section, args, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
