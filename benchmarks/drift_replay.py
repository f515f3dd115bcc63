"""`python -m benchmarks.drift_replay --data $CIFAR10_DIR --output reports/drift-replay`

Does monitoring see a shift, and does feedback close the loop? A stream of predict batches goes to
a running service: the clean test split first (shuffled, 10,000 images by default), then CIFAR-10-C
at severity 3, then at severity 5 (each image under one of the corruptions, in turn; built with
`training.shift.datasets.corrupted_set`, cached like the shift benchmark's). For a share of every
batch (30% by default) the true labels go back through POST /v1/feedback; after every batch the
replay reads GET /v1/models/{name}/monitoring. When the `alert` fires (labelled ECE-15 over
CALIB_ALERT_ECE) it fits a profile from feedback (`POST .../calibrations?from=feedback&since=<the
shift's start>`) and serves the rest of the stream with it.

It writes report.json, report.md and drift_replay.png (estimated accuracy, observed accuracy and
ECE-15 of the monitoring window over the stream; the phases, the first drift verdict, the alert and
the switch to the profile marked) and prints the issue's targets:

* `drift` fires within 500 predictions after the switch from clean to severity 3;
* over the clean predictions at most 1 monitoring answer in 20 says drift (every answer once the
  window is full; the non-overlapping windows are reported too);
* the estimated accuracy (mean calibrated confidence) is within 3 points of the accuracy the images
  really had on clean data, and within 8 at severity 3 (the replay knows every label).

The server is the shipped serve command on a free port (benchmarks.server_process) with its own
SQLite file in a temporary folder, or any running service (`--url`; with API keys, CALIB_API_KEY
must be an admin key to fit the profile). `--quick` replays the repository's test fixture (300
test images per phase, three corruptions) for CI.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from commandline import ArgumentParser, UsageError, command, invoked_as

PROG = invoked_as("benchmarks.drift_replay")
PROG_COMMAND = "python -m benchmarks.drift_replay"
REPO = Path(__file__).resolve().parents[1]
QUICK_DATA = REPO / "tests" / "data" / "cifar10-fixture"
QUICK_CORRUPTIONS = ("gaussian_noise", "defocus_blur", "contrast")
DEFAULT_DATA = "/work/data/CIFAR-10-images"
#: The issue's targets, printed beside the figures (not asserted: this is a measurement).
TARGET_DRIFT_WITHIN = 500
TARGET_FALSE_ALARM_SHARE = 1 / 20
TARGET_ESTIMATE_GAP = {"clean": 0.03, "severity 3": 0.08}


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(prog=PROG, description=__doc__.split("\n")[2])
    parser.add_argument("--data", default=None, help=f"CIFAR-10 source for load_cifar10 (default {DEFAULT_DATA}; "
                                                     f"with --quick the repository's test fixture)")
    parser.add_argument("--model", default=None, help="the model to monitor (default: the server's first)")
    parser.add_argument("--model-dir", default=str(REPO / "models" / "shipped"), help="CALIB_MODEL_DIR of the server")
    parser.add_argument("--url", default=None, help="a running service instead of starting one")
    parser.add_argument("--runtime", choices=("keras", "litert"), default="litert",
                        help="CALIB_RUNTIME of the server it starts")
    parser.add_argument("--clean", type=int, default=None, help="clean predictions (default 10000; --quick 300)")
    parser.add_argument("--severity3", type=int, default=None, help="predictions at severity 3 (default 3000; "
                                                                    "--quick 300)")
    parser.add_argument("--severity5", type=int, default=None, help="predictions at severity 5 (default 3000; "
                                                                    "--quick 300; 0: none)")
    parser.add_argument("--batch", type=int, default=None, help="images per predict call (default 100; --quick 50)")
    parser.add_argument("--window", type=int, default=None, help="monitoring window in predictions (default "
                                                                 "1000; --quick 150)")
    parser.add_argument("--feedback", type=float, default=0.3, help="share of each batch whose labels are sent")
    parser.add_argument("--corruptions", default=None, help="comma-separated (default: all 15; --quick: 3)")
    parser.add_argument("--no-profile", action="store_true", help="do not fit a profile when the alert fires")
    parser.add_argument("--seed", type=int, default=0, help="order, feedback share and corruption seed")
    parser.add_argument("--cache-dir", default=None, help="cache of corrupted sets (training.shift's default; "
                                                          "'none': no cache)")
    parser.add_argument("--output", default="reports/drift-replay", help="report folder")
    parser.add_argument("--quick", action="store_true", help="the repository's test fixture, small phases")
    args = parser.parse_args(argv)
    return resolve(args)


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    from training.shift.corruptions import CORRUPTIONS

    if args.data is None:
        args.data = str(QUICK_DATA) if args.quick else DEFAULT_DATA
    default = (300, 300, 300, 50, 150) if args.quick else (10_000, 3000, 3000, 100, 1000)
    for name, value in zip(("clean", "severity3", "severity5", "batch", "window"), default):
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("clean", "severity3", "batch", "window"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.severity5 < 0:
        raise UsageError(f"--severity5 must be >= 0, got {args.severity5}")
    if not 0 < args.feedback <= 1:
        raise UsageError(f"--feedback must be in (0, 1], got {args.feedback}")
    args.corruptions = tuple(c.strip() for c in args.corruptions.split(",") if c.strip()) \
        if args.corruptions else (QUICK_CORRUPTIONS if args.quick else CORRUPTIONS)
    unknown = sorted(set(args.corruptions) - set(CORRUPTIONS))
    if unknown:
        raise UsageError(f"unknown corruption(s) {', '.join(unknown)}; expected some of {', '.join(CORRUPTIONS)}")
    return args


# --- the stream ------------------------------------------------------------------------------------
def build_stream(args, say):
    """[(phase, images, labels)]: the clean test split in a seeded order, then the corrupted phases,
    image i of a corrupted phase under corruption i mod len(corruptions)."""
    from training.data import load_cifar10
    from training.shift.benchmark import stratified_subset
    from training.shift.datasets import corrupted_set, default_cache_dir

    data = load_cifar10(args.data)
    n = len(data.y_test)
    index = stratified_subset(data.y_test, n, seed=args.seed)   # the shift benchmarks' order and cache key
    images, labels = data.x_test[index], data.y_test[index]
    checksum = f"{data.checksum}+subset(n={n},seed={args.seed})"
    cache_dir = None if args.cache_dir == "none" else Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    rng = np.random.default_rng(args.seed)
    phases = []
    order = np.resize(rng.permutation(n), args.clean)
    phases.append(("clean", images[order], labels[order]))
    for severity, count in ((3, args.severity3), (5, args.severity5)):
        if count == 0:
            continue
        order = np.resize(rng.permutation(n), count)
        which = np.arange(count) % len(args.corruptions)
        x = np.empty((count, *images.shape[1:]), images.dtype)
        for k, name in enumerate(args.corruptions):
            say(f"severity {severity}: {name}")
            corrupted = corrupted_set(images, name, severity, seed=args.seed, cache_dir=cache_dir,
                                      source_checksum=checksum)
            x[which == k] = corrupted[order[which == k]]
        phases.append((f"severity {severity}", x, labels[order]))
    return data, phases


def replay(client, args, model: str, phases, say) -> dict:
    """Send the stream; a record per batch (what monitoring said after it) and per phase."""
    from datetime import datetime, timezone

    rng = np.random.default_rng(args.seed + 1)
    records, phase_rows = [], []
    served = 0
    profile = None
    events = {"phase_starts": {}, "first_drift": {}, "alerts": {}, "alert": None, "profile": None}
    for phase, x, y in phases:
        events["phase_starts"][phase] = served
        phase_start = datetime.now(timezone.utc)
        confidences, correct = [], []
        for i in range(0, len(x), args.batch):
            xb, yb = x[i:i + args.batch], y[i:i + args.batch]
            answer = client.predict(xb, model=model, mc_samples=0, calibration=profile)
            conf = np.array([p.confidence for p in answer.predictions])
            pred = np.array([p.class_index for p in answer.predictions])
            confidences.append(conf)
            correct.append(pred == yb)
            chosen = np.flatnonzero(rng.random(len(yb)) < args.feedback)
            if len(chosen):
                client.feedback([{"prediction_id": answer.predictions[j].prediction_id, "label": int(yb[j])}
                                 for j in chosen])
            served += len(yb)
            m = client.monitoring(model=model, window=args.window, calibration=profile)
            labelled = m["labelled"]
            record = {"served": served, "phase": phase, "calibration": profile,
                      "window_predictions": m["window"]["predictions"],
                      "estimated_accuracy": (m["estimated_accuracy"] or {}).get("value"),
                      "observed_accuracy": labelled["accuracy"], "ece_15": labelled["ece_15"],
                      "labelled": labelled["n"], "drift": m["drift"]["status"], "drift_reasons": m["drift"]["reasons"],
                      "alert": m["alert"]["status"], "ece_threshold": m["alert"]["ece_threshold"],
                      "batch_accuracy": float(np.mean(pred == yb)),
                      "batch_confidence": float(conf.mean())}
            records.append(record)
            if record["drift"] and phase not in events["first_drift"]:
                events["first_drift"][phase] = served
                say(f"{phase}: drift after {served - events['phase_starts'][phase]} predictions "
                    f"({', '.join(record['drift_reasons'])})")
            if record["alert"] and phase not in events["alerts"]:
                events["alerts"][phase] = served
                say(f"{phase}: alert at {served} predictions (labelled ECE-15 {record['ece_15']:.3f})")
                if events["alert"] is None and phase != "clean":   # the first alert under shift
                    events["alert"] = {"served": served, "phase": phase, "ece_15": record["ece_15"]}
                if not args.no_profile and phase != "clean" and profile is None:
                    since = phase_start.isoformat()
                    fitted = client.create_calibration_from_feedback(model=model, since=since,
                                                                     label=f"drift replay, {phase}")
                    profile = fitted.id
                    events["profile"] = {"served": served, "id": profile, "n": fitted.n, "phase": phase,
                                         "parameters": fitted.parameters}
                    say(f"profile {profile} fitted from {fitted.n} labelled predictions; serving with it")
        conf, ok = np.concatenate(confidences), np.concatenate(correct)
        phase_rows.append({"phase": phase, "predictions": int(len(conf)), "estimated_accuracy": float(conf.mean()),
                           "accuracy": float(ok.mean()), "gap": float(conf.mean() - ok.mean())})
    return {"records": records, "phases": phase_rows, "events": events}


def summarise(result: dict, args) -> dict:
    records, events = result["records"], result["events"]
    start3 = events["phase_starts"].get("severity 3")
    first3 = events["first_drift"].get("severity 3")
    clean = [r for r in records if r["phase"] == "clean" and r["window_predictions"] >= args.window]
    alarms = sum(r["drift"] for r in clean)
    step = max(1, args.window // args.batch)     # answers whose windows do not overlap
    disjoint = clean[step - 1::step]
    phases = {p["phase"]: p for p in result["phases"]}
    # before the profile switch: what the card's calibration promised against what happened
    gaps = {name: abs(phases[name]["gap"]) for name in TARGET_ESTIMATE_GAP if name in phases}
    out = {"drift_after_switch_to_severity_3": None if first3 is None else first3 - start3,
           "clean_answers_with_full_window": len(clean), "clean_drift_answers": int(alarms),
           "clean_false_alarm_share": alarms / len(clean) if clean else None,
           "clean_disjoint_windows": len(disjoint), "clean_disjoint_windows_with_drift": int(sum(r["drift"]
                                                                                              for r in disjoint)),
           "estimate_gap": gaps,
           "targets": {"drift_within": TARGET_DRIFT_WITHIN, "false_alarm_share": TARGET_FALSE_ALARM_SHARE,
                       "estimate_gap": TARGET_ESTIMATE_GAP}}
    out["met"] = {
        "drift_within_500": first3 is not None and first3 - start3 <= TARGET_DRIFT_WITHIN,
        "clean_false_alarms": bool(clean) and alarms / len(clean) <= TARGET_FALSE_ALARM_SHARE,
        **{f"estimate_gap_{name.replace(' ', '_')}": gaps[name] <= limit
           for name, limit in TARGET_ESTIMATE_GAP.items() if name in gaps}}
    return out


# --- the report ------------------------------------------------------------------------------------
def write_plot(result: dict, args, output: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records, events = result["records"], result["events"]
    x = [r["served"] for r in records]
    series = lambda key: [np.nan if r[key] is None else r[key] for r in records]  # noqa: E731
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True, height_ratios=[3, 1.4])
    top.plot(x, series("estimated_accuracy"), label="estimated accuracy (mean confidence, window)", color="C0")
    top.plot(x, series("observed_accuracy"), label="observed accuracy (labelled part of the window)", color="C1")
    top.plot(x, series("batch_accuracy"), label="accuracy of each batch (all labels)", color="C1", alpha=0.25, lw=0.8)
    bottom.plot(x, series("ece_15"), label="ECE-15 (labelled part of the window)", color="C3")
    bottom.axhline(records[0].get("ece_threshold", 0.05) if records else 0.05, color="C3", ls=":", lw=0.8,
                   label="CALIB_ALERT_ECE")
    drifted = [r["served"] for r in records if r["drift"]]
    top.scatter(drifted, [0.02] * len(drifted), marker="|", color="C4", label="drift verdict", s=40)
    for ax in (top, bottom):
        for phase, start in events["phase_starts"].items():
            if start:
                ax.axvline(start, color="grey", ls="--", lw=0.8)
        if events["alert"]:
            ax.axvline(events["alert"]["served"], color="C3", lw=1.0)
        if events["profile"]:
            ax.axvline(events["profile"]["served"], color="C2", lw=1.5)
    for phase, start in events["phase_starts"].items():
        top.text(start, 1.0, f" {phase}", va="top", fontsize=8, color="grey")
    if events["alert"]:
        top.text(events["alert"]["served"], 0.1, " alert", color="C3", fontsize=8)
    if events["profile"]:
        top.text(events["profile"]["served"], 0.18, " profile from feedback", color="C2", fontsize=8)
    top.set_ylim(0, 1.02)
    top.set_ylabel("accuracy")
    bottom.set_ylabel("ECE-15")
    bottom.set_xlabel("predictions served")
    top.legend(loc="lower left", fontsize=8)
    bottom.legend(loc="upper left", fontsize=8)
    top.set_title(f"Drift replay: {result['model']} (window {args.window}, feedback {args.feedback:.0%})")
    fig.tight_layout()
    path = output / "drift_replay.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def write_markdown(doc: dict, output: Path) -> None:
    s = doc["summary"]
    lines = [f"# Drift replay: {doc['model']}", "", f"Command: `{doc['command']}`  ",
             f"CPU: {doc['machine']['cpu']}; wall time {doc['wall_seconds']:.0f} s; data: {doc['data']['source']}", "",
             "| phase | predictions | estimated accuracy | accuracy (all labels) | gap |", "|---|---|---|---|---|"]
    for p in doc["phases"]:
        lines.append(f"| {p['phase']} | {p['predictions']} | {p['estimated_accuracy']:.4f} | {p['accuracy']:.4f} | "
                     f"{100 * p['gap']:+.2f} pt |")
    e = doc["events"]
    lines += ["", f"- drift after the switch to severity 3: {s['drift_after_switch_to_severity_3']} predictions "
                  f"(target <= {TARGET_DRIFT_WITHIN})",
              f"- clean answers with drift: {s['clean_drift_answers']} of {s['clean_answers_with_full_window']} "
              f"(share {s['clean_false_alarm_share']}; target <= {TARGET_FALSE_ALARM_SHARE}); disjoint windows: "
              f"{s['clean_disjoint_windows_with_drift']} of {s['clean_disjoint_windows']}",
              f"- alert: {json.dumps(e['alert'])}", f"- profile from feedback: {json.dumps(e['profile'])}",
              "", "Met: " + json.dumps(s["met"]), "", f"![drift replay]({doc['plot']})", ""]
    (output / "report.md").write_text("\n".join(lines))


def run(args, argv: list[str]) -> int:
    from benchmarks.recalibration_under_shift import cpu_model
    from benchmarks.server_process import ServerProcess
    from clients.client import CalibClient
    from training.lab.report import portable_command, portable_path

    say = lambda message: print(f"[drift-replay] {message}", file=sys.stderr, flush=True)  # noqa: E731
    started = time.time()
    data, phases = build_stream(args, say)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        url = args.url
        if url is None:   # its own SQLite file; the drift test needs a full window
            url = stack.enter_context(ServerProcess(
                args.model_dir, runtime=args.runtime, data_dir=tmp, monitoring_window=args.window,
                drift_min_predictions=min(200, args.window),
                alert_min_labelled=min(100, max(10, int(args.window * args.feedback / 2))),
                evaluation_queue_timeout_s=600)).url
        client = stack.enter_context(CalibClient(url, timeout=600))
        model = args.model or client.models()[0].name
        say(f"model {model}: " + ", ".join(f"{name} {len(x)}" for name, x, _ in phases))
        result = replay(client, args, model, phases, say)
    result["model"] = model
    doc = {"model": model, "command": portable_command(argv, PROG_COMMAND), "machine": {"cpu": cpu_model()},
           "data": {"source": portable_path(args.data), "checksum": data.checksum},
           "config": {"clean": args.clean, "severity3": args.severity3, "severity5": args.severity5,
                      "batch": args.batch, "window": args.window, "feedback": args.feedback,
                      "corruptions": list(args.corruptions), "seed": args.seed, "runtime": args.runtime,
                      "profile": not args.no_profile},
           "phases": result["phases"], "events": result["events"], "summary": summarise(result, args),
           "plot": write_plot(result, args, output), "records": result["records"],
           "wall_seconds": round(time.time() - started, 1)}
    (output / "report.json").write_text(json.dumps(doc, indent=1) + "\n")
    write_markdown(doc, output)
    s = doc["summary"]
    for p in doc["phases"]:
        print(f"{p['phase']}: estimated accuracy {p['estimated_accuracy']:.4f}, accuracy {p['accuracy']:.4f} "
              f"({100 * p['gap']:+.2f} points)")
    print(f"drift after the switch to severity 3: {s['drift_after_switch_to_severity_3']} predictions (target <= "
          f"{TARGET_DRIFT_WITHIN}); clean answers with drift: {s['clean_drift_answers']} of "
          f"{s['clean_answers_with_full_window']} (target share <= {TARGET_FALSE_ALARM_SHARE:.2f})")
    print(f"targets met: {json.dumps(s['met'])}")
    print(f"report: {output / 'report.md'}")
    return 0


@command(PROG)
def main(argv=None) -> int:
    from benchmarks.recalibration_under_shift import check_data_source

    args = parse_args(argv)
    check_data_source(args.data)
    return run(args, argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
