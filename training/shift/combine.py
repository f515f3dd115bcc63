"""`python -m training.shift.combine REPORT_DIR REPORT_DIR [...] --output DIR`

One shift report from several runs of the same benchmark, so that models run one at a time (a full
10,000-image run takes over an hour per model on 2 cores) still get the plots with one line per
model and one table. Only runs of the identical benchmark combine: the same test images, corruption
types, severities, seed, MC samples and OOD sets. Anything else would draw incomparable lines on one
plot, so it is refused. No model is run; the per-model reliability diagrams are linked, not redrawn.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from commandline import ArgumentParser, CommandError, UsageError, command, invoked_as

PROG = invoked_as("training.shift.combine")

# What must be equal for two runs to be the same benchmark (report.json keys).
SAME_BENCHMARK = ("benchmark", "quick", "n_images", "subset_index_sha256", "corruptions", "severities", "seed",
                  "mc_samples")
# Kept from each run as its provenance in the combined report.
PROVENANCE = ("command", "machine", "versions", "wall_seconds", "finished_utc")


def _ood_identity(doc: dict) -> list[tuple]:
    return [(s["name"], s["n"], s.get("checksum")) for s in doc["ood_sets"]]


def read_report(folder: Path) -> dict:
    from training.shift.report import upgrade_report

    path = folder / "report.json"
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise CommandError(f"{folder}: no report.json (not a training.shift report folder)") from None
    except json.JSONDecodeError as exc:
        raise CommandError(f"{path}: not JSON ({exc})") from None
    if not isinstance(doc, dict) or "sources" in doc or not isinstance(doc.get("models"), list):
        raise CommandError(f"{path}: not the report of one training.shift run")
    missing = [k for k in (*SAME_BENCHMARK, *PROVENANCE, "data", "ood_sets", "artifacts", "pngs") if k not in doc]
    if missing:
        raise CommandError(f"{path}: not a training.shift report (no {', '.join(missing)})")
    return upgrade_report(doc)


def combine(docs: list[dict], typed: list[str], links: list[str], command_line: str) -> dict:
    """The combined report document: the first run's benchmark description, every run's models.

    `typed`: the report folders as the user gave them (for errors); `links`: as seen from the output.
    """
    first = docs[0]
    for doc, where in zip(docs[1:], typed[1:]):
        differ = [k for k in SAME_BENCHMARK if doc[k] != first[k]]
        if doc["data"]["checksum"] != first["data"]["checksum"]:
            differ.append("data checksum")
        if doc.get("feature_density") != first.get("feature_density"):
            differ.append("feature density")
        if _ood_identity(doc) != _ood_identity(first):
            differ.append("OOD sets")
        if differ:
            raise UsageError(f"{where} is not the same benchmark as {typed[0]}: {', '.join(differ)} differ")
    names = [m["name"] for doc in docs for m in doc["models"]]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UsageError(f"model(s) {', '.join(twice)} appear in more than one report")
    combined = {k: v for k, v in first.items() if k not in (*PROVENANCE, "throughput", "pngs", "models")}
    return {**combined,
            "command": command_line,
            "artifacts": [a for doc in docs for a in doc["artifacts"]],
            "sources": [{"report": where, "name": ", ".join(m["name"] for m in doc["models"]),
                         **{k: doc[k] for k in PROVENANCE}} for doc, where in zip(docs, links)],
            "combined_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "models": [m for doc in docs for m in doc["models"]]}


def parse_args(argv=None):
    parser = ArgumentParser(prog=PROG, description=__doc__.splitlines()[2])
    parser.add_argument("reports", nargs="+", metavar="REPORT_DIR", type=Path,
                        help="folders written by python -m training.shift --output (at least two)")
    parser.add_argument("--output", required=True, type=Path,
                        help="folder for the combined report.json, report.md and plots (files in it are replaced)")
    args = parser.parse_args(argv)
    if len(args.reports) < 2:
        parser.error("give at least two REPORT_DIRs")
    return args


@command(PROG)
def main(argv=None) -> int:
    from training.lab.report import portable_command, portable_path
    from training.shift import report

    args = parse_args(argv)
    docs = [read_report(folder) for folder in args.reports]
    out = args.output
    # Paths as seen from the combined report, so its links work wherever the repository is.
    links = [Path(os.path.relpath(folder.resolve(), out.resolve())).as_posix() for folder in args.reports]
    doc = combine(docs, [str(f) for f in args.reports], links,
                  portable_command(argv if argv is not None else sys.argv[1:], PROG))
    pngs = report.write_summary_plots(out, doc)
    for src, where in zip(docs, links):
        pngs += [f"{where}/{p}" for p in src["pngs"] if p.startswith("reliability_")]
    report.write_documents(out, doc, pngs)
    for m in doc["models"]:
        agg, t = m["aggregates"], report.threshold_check(m)
        print(f"{m['name']}: cA {agg['cA']:.4f} cCE {agg['cCE']:.4f}; "
              f"entropy AUROC clean vs severity {t['severity']} {t['auroc']:.3f}")
    print(f"combined report written to {portable_path(str(out.resolve()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
