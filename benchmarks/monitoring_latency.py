"""`python -m benchmarks.monitoring_latency --output reports/monitoring-latency`

What does recording every prediction cost predict? Two servers run the same model side by side,
one with CALIB_MONITORING=true (the default: ids, the queue, the background writer inserting into
SQLite) and one with CALIB_MONITORING=false. The requests alternate between them (A B, B A, ...),
one at a time, so a busy machine slows both alike; the report gives the median and p90 latency of
each and their ratio per batch size (target: on / off <= 1.05). MC dropout is off by default
(`--mc-samples 0`): the cheapest predict, where a fixed overhead weighs the most.

`--quick` sends a few requests only (checks that it runs).
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

PROG = invoked_as("benchmarks.monitoring_latency")
PROG_COMMAND = "python -m benchmarks.monitoring_latency"
REPO = Path(__file__).resolve().parents[1]
TARGET_RATIO = 1.05


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(prog=PROG, description=__doc__.split("\n")[2])
    parser.add_argument("--model", default=None, help="the model (default: the server's first)")
    parser.add_argument("--model-dir", default=str(REPO / "models" / "shipped"), help="CALIB_MODEL_DIR")
    parser.add_argument("--runtime", choices=("keras", "litert"), default="litert", help="CALIB_RUNTIME")
    parser.add_argument("--batches", default="1,32", help="images per request, comma-separated")
    parser.add_argument("--requests", type=int, default=None, help="requests per server and batch size "
                                                                   "(default 400; --quick 10)")
    parser.add_argument("--warmup", type=int, default=None, help="unmeasured requests first (default 20; --quick 2)")
    parser.add_argument("--mc-samples", type=int, default=0, help="MC dropout samples per request")
    parser.add_argument("--output", default=None, help="folder for report.json (default: print only)")
    parser.add_argument("--quick", action="store_true", help="a few requests: checks that it runs")
    args = parser.parse_args(argv)
    try:
        args.batches = tuple(int(b) for b in args.batches.split(","))
    except ValueError:
        raise UsageError(f"--batches takes comma-separated integers, got {args.batches!r}") from None
    if args.requests is None:
        args.requests = 10 if args.quick else 400
    if args.warmup is None:
        args.warmup = 2 if args.quick else 20
    if args.requests < 1 or min(args.batches) < 1:
        raise UsageError("--requests and --batches must be at least 1")
    return args


def measure(clients: dict, model: str, images: np.ndarray, args) -> dict:
    """Latency per server of `args.requests` alternating requests of len(images) images."""
    import httpx  # noqa: F401  (the clients' transport)

    times = {name: [] for name in clients}
    names = list(clients)
    for i in range(args.warmup + args.requests):
        order = names if i % 2 == 0 else names[::-1]
        for name in order:
            started = time.perf_counter()
            clients[name].predict(images, model=model, mc_samples=args.mc_samples)
            elapsed = time.perf_counter() - started
            if i >= args.warmup:
                times[name].append(elapsed)
    out = {}
    for name, values in times.items():
        v = np.asarray(values) * 1000
        out[name] = {"median_ms": float(np.median(v)), "p90_ms": float(np.quantile(v, 0.9)),
                     "mean_ms": float(v.mean())}
    out["ratio_median"] = out["on"]["median_ms"] / out["off"]["median_ms"]
    out["ratio_p90"] = out["on"]["p90_ms"] / out["off"]["p90_ms"]
    return out


def run(args, argv) -> int:
    from benchmarks.recalibration_under_shift import cpu_model
    from benchmarks.server_process import ServerProcess
    from clients.client import CalibClient

    rng = np.random.default_rng(0)
    results = {}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        servers = {"on": stack.enter_context(ServerProcess(args.model_dir, runtime=args.runtime,
                                                           data_dir=Path(tmp) / "on", monitoring=True)),
                   "off": stack.enter_context(ServerProcess(args.model_dir, runtime=args.runtime,
                                                            data_dir=Path(tmp) / "off", monitoring=False))}
        clients = {name: stack.enter_context(CalibClient(s.url, timeout=120)) for name, s in servers.items()}
        model = args.model or clients["on"].models()[0].name
        for batch in args.batches:
            images = rng.integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
            results[str(batch)] = r = measure(clients, model, images, args)
            print(f"batch {batch}: monitoring on {r['on']['median_ms']:.2f} ms median ({r['on']['p90_ms']:.2f} p90), "
                  f"off {r['off']['median_ms']:.2f} ms ({r['off']['p90_ms']:.2f}); on/off {r['ratio_median']:.3f} "
                  f"median, {r['ratio_p90']:.3f} p90 (target <= {TARGET_RATIO})")
        recorded = clients["on"].monitoring(model=model, window=100_000)["window"]["predictions"]
    print(f"rows recorded by the monitored server: {recorded}")
    from training.lab.report import portable_command

    doc = {"model": model, "runtime": args.runtime, "mc_samples": args.mc_samples, "requests": args.requests,
           "cpu": cpu_model(), "results": results, "recorded": recorded, "target_ratio": TARGET_RATIO,
           "met": all(r["ratio_median"] <= TARGET_RATIO for r in results.values()),
           "command": portable_command(argv, PROG_COMMAND)}
    print(f"target met: {doc['met']}")
    if args.output:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(doc, indent=1) + "\n")
    return 0


@command(PROG)
def main(argv=None) -> int:
    args = parse_args(argv)
    return run(args, argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
