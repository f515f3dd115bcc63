"""`python -m benchmarks.concurrent_throughput`: many concurrent one-image clients against the
in-process batch capacity (goal: >= 0.8x), and where a request's time goes.

First the in-process capacity: MC predict (T=100, the server's default) on one batch of
`--batch` images, images/s. Then, for each `--config` (a name and `CALIB_*` settings), a real
`python -m service` on loopback, driven by `wrk` (`--generator wrk`, the default when wrk is
installed: C, one keep-alive connection per client, the one-image JSON body from a Lua script;
benchmarks.wrk) or by an asyncio/httpx generator in this process (`--generator httpx`): one
client's latency (p50) and throughput, then `--clients` concurrent clients with throughput, its
ratio to the in-process capacity, p50/p99, the CPU the server and the load generator each took,
images per backbone pass, and the server's per-stage profile (`calib_predict_stage_seconds`,
service.http_metrics.PREDICT_STAGES) as mean ms and share of the request's time. All servers start
first (in parallel), then are measured one after the other, `--rounds` times in alternation, so a
drift in machine load hits every config alike. Linux (/proc) for the server's CPU. Prints, never
asserts.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from benchmarks import wrk
from benchmarks.server_process import ServerError, ServerProcess
from benchmarks.worker_scaling import cpu_seconds, load, own_cpu_seconds
from commandline import ArgumentParser, CommandError, UsageError, command, invoked_as, setup_tensorflow

PROG = invoked_as("benchmarks.concurrent_throughput")
REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "tests" / "data" / "cifar10-fixture"
PREDICT_ENDPOINT = "/v1/models/{name}/predict"


def in_process_capacity(model_dir: Path, name: str | None, batch: int, mc_samples: int, repeats: int,
                        runtime: str = "auto"):
    """(model name, images/s of MC predict on one batch, one real image as a nested list)."""
    setup_tensorflow()
    from service import dataplane
    from benchmarks.mc_and_http_cost import load_images
    from service.registry import load_registry

    registry = load_registry(model_dir, runtime=runtime)
    if not registry.models:
        raise CommandError(f"no model loaded from {model_dir}")
    model = registry.get(name or registry.names()[0])
    x, _, _ = load_images(SAMPLE, batch, model.num_classes, seed=0)
    dataplane.predict(model, x, mc_samples=mc_samples, seed=0)  # warm-up (tracing)
    dataplane.predict(model, x, mc_samples=0, seed=0)
    times, plain = [], []
    for i in range(repeats):
        start = time.perf_counter()
        dataplane.predict(model, x, mc_samples=mc_samples, seed=i)
        times.append(time.perf_counter() - start)
        start = time.perf_counter()
        dataplane.predict(model, x, mc_samples=0, seed=i)
        plain.append(time.perf_counter() - start)
    mc_ms, plain_ms = 1000 * statistics.median(times), 1000 * statistics.median(plain)
    print(f"in-process, batch of {batch}, runtime {model.runtime}: deterministic {plain_ms:.1f} ms, "
          f"MC T={mc_samples} {mc_ms:.1f} ms ({mc_ms / plain_ms:.2f}x)")
    return model.name, batch / statistics.median(times), x[0].tolist()


def scrape(url: str, model: str) -> dict[str, float]:
    """The predict-related sums and counts of /metrics, keyed by sample name and labels."""
    import httpx

    out: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith("#") or f'model="{model}"' not in line:
            continue
        if not (line.startswith("calib_predict_") or line.startswith("calib_http_request_duration_seconds")):
            continue
        key, _, value = line.rpartition(" ")
        if key.endswith(("_sum", "_count")) or "_sum{" in key or "_count{" in key:
            out[key] = float(value)
    return out


def _diff(after: dict, before: dict) -> dict:
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def profile(delta: dict, model: str) -> tuple[list[tuple[str, float]], float]:
    """[(stage, mean seconds per request)] in PREDICT_STAGES order, and the mean request time."""
    from service.http_metrics import PREDICT_STAGES

    stages = []
    for stage in PREDICT_STAGES:
        labels = f'{{model="{model}",stage="{stage}"}}'
        n = delta.get(f"calib_predict_stage_seconds_count{labels}", 0.0)
        if n:
            stages.append((stage, delta[f"calib_predict_stage_seconds_sum{labels}"] / n))
    labels = f'{{endpoint="{PREDICT_ENDPOINT}",model="{model}"}}'
    n = delta.get(f"calib_http_request_duration_seconds_count{labels}", 0.0)
    total = delta.get(f"calib_http_request_duration_seconds_sum{labels}", 0.0) / n if n else float("nan")
    return stages, total


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of a process and all its descendants alive now (with CALIB_WORKERS > 1 the
    workers are the server's children)."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            total += cpu_seconds(p)
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def _pct(values, q) -> float:
    return float(np.percentile(values, q)) * 1e3


def measure_wrk(server: ServerProcess, model: str, body: bytes, clients: int, duration: float,
                sequential_duration: float, capacity: float) -> dict:
    """One client for `sequential_duration` s (wrk -c1), then `clients` for `duration` s."""
    url = f"{server.url}{PREDICT_ENDPOINT.format(name=model)}"
    wrk.run(url, body, connections=clients, duration_s=2)  # warm-up: connections, every batch size
    one = wrk.run(url, body, connections=1, duration_s=sequential_duration)
    before = scrape(server.url, model)
    server0 = tree_cpu_seconds(server.pid)
    many = wrk.run(url, body, connections=clients, duration_s=duration)
    srv = (tree_cpu_seconds(server.pid) - server0) / many["seconds"]
    return _result(many["req_s"], capacity, many["p50_ms"], many["p99_ms"], one["p50_ms"], one["req_s"], srv,
                   many["wrk_cpu"], _diff(scrape(server.url, model), before), model, many["requests"])


def _result(req_s, capacity, p50, p99, seq_p50, seq_req_s, server_cpu, client_cpu, delta, model, n) -> dict:
    labels = f'{{model="{model}"}}'
    passes = delta.get(f"calib_predict_batch_images_count{labels}", 0.0)
    images = delta.get(f"calib_predict_batch_images_sum{labels}", 0.0)
    stages, total = profile(delta, model)
    return {"req_s": req_s, "ratio": req_s / capacity, "p50": p50, "p99": p99, "seq_p50": seq_p50,
            "seq_req_s": seq_req_s, "server_cpu": server_cpu, "client_cpu": client_cpu,
            "per_pass": images / passes if passes else float("nan"), "stages": stages, "total": total, "n": n}


def measure(server: ServerProcess, model: str, body: bytes, clients: int, requests: int, sequential: int,
            capacity: float) -> dict:
    """The asyncio/httpx generator: `sequential` one-client requests, then `requests` over `clients`."""
    import httpx

    path = f"/v1/models/{model}/predict"
    headers = {"content-type": "application/json"}
    asyncio.run(load(server.url, path, body, clients, 1))  # warm-up: connections, every batch size
    with httpx.Client(base_url=server.url, timeout=120) as client:
        lat = []
        seq_start = time.perf_counter()
        for _ in range(sequential):
            start = time.perf_counter()
            client.post(path, content=body, headers=headers).raise_for_status()
            lat.append(time.perf_counter() - start)
        seq_req_s = sequential / (time.perf_counter() - seq_start)
    seq_p50 = _pct(lat, 50)
    before = scrape(server.url, model)
    server0, own0 = tree_cpu_seconds(server.pid), own_cpu_seconds()
    wall, lat, _ = asyncio.run(load(server.url, path, body, clients, max(1, requests // clients)))
    own = (own_cpu_seconds() - own0) / wall
    srv = (tree_cpu_seconds(server.pid) - server0) / wall
    return _result(len(lat) / wall, capacity, _pct(lat, 50), _pct(lat, 99), seq_p50, seq_req_s, srv, own,
                   _diff(scrape(server.url, model), before), model, len(lat))


PATH_KEY = "PYTHONPATH"   # a config's extra import path, e.g. a folder with optional packages to try


def parse_config(text: str) -> tuple[str, dict[str, str]]:
    """`name:CALIB_X=1,CALIB_Y=2` (or just `name`) -> (name, {x: 1, y: 2}); `PYTHONPATH=dir` is
    kept as the key PYTHONPATH (put in front of the server's import path)."""
    name, _, rest = text.partition(":")
    settings = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if eq and key == PATH_KEY:
            settings[PATH_KEY] = value
            continue
        if not eq or not key.startswith("CALIB_"):
            raise UsageError(f"--config {text!r}: expected name:CALIB_SETTING=value,... (or PYTHONPATH=dir)")
        settings[key[len("CALIB_"):].lower()] = value
    return name, settings


def start_server(model_dir: Path, settings: dict[str, str]) -> ServerProcess:
    settings = dict(settings)
    path = settings.pop(PATH_KEY, None)
    server = ServerProcess(model_dir, ready_timeout=900, **settings)
    if path:
        server.env[PATH_KEY] = os.pathsep.join([path, server.env[PATH_KEY]])
    return server.start()


def print_result(name: str, r: dict) -> None:
    print(f"  {name:<14}{r['req_s']:7.1f} req/s  {r['ratio']:5.2f}x   p50 {r['p50']:6.0f} ms  p99 {r['p99']:6.0f} ms"
          f"   one client: p50 {r['seq_p50']:5.1f} ms, {r['seq_req_s']:.1f} req/s   CPU server "
          f"{r['server_cpu']:.2f} cores, load generator {r['client_cpu']:.2f} cores   {r['per_pass']:.1f} images/pass")
    if r["stages"]:
        parts = "  ".join(f"{s} {sec * 1e3:.1f} ({sec / r['total']:.0%})" for s, sec in r["stages"])
        other = r["total"] - sum(sec for _, sec in r["stages"])
        print(f"      mean {r['total'] * 1e3:.0f} ms per request (server side): {parts}  "
              f"framework {other * 1e3:.1f} ({other / r['total']:.0%})")


@command(PROG)
def main(argv: list[str] | None = None) -> int:
    from service.settings import DEFAULT_MODEL_DIR

    p = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    p.add_argument("--model", help="model name (default: the first loaded)")
    p.add_argument("--batch", type=int, default=64, help="in-process batch for the capacity figure")
    p.add_argument("--mc-samples", type=int, default=100, help="MC dropout T (the server's default)")
    p.add_argument("--repeats", type=int, default=5, help="in-process runs (median)")
    p.add_argument("--clients", type=int, default=64, help="concurrent one-image clients")
    p.add_argument("--generator", choices=("wrk", "httpx"), default="wrk" if wrk.available() else "httpx",
                   help="load generator (default: wrk if installed, else httpx in this process)")
    p.add_argument("--duration", type=float, default=20, help="wrk: seconds at --clients")
    p.add_argument("--sequential-duration", type=float, default=10, help="wrk: seconds with one client")
    p.add_argument("--requests", type=int, default=640, help="httpx: timed requests per measurement")
    p.add_argument("--sequential", type=int, default=40, help="httpx: sequential one-image requests (latency)")
    p.add_argument("--runtime", choices=("auto", "keras", "litert"), default="auto",
                   help="CALIB_RUNTIME of the in-process capacity and of every server (a config may override it)")
    p.add_argument("--rounds", type=int, default=1, help="measurements of each config, in alternation")
    p.add_argument("--config", action="append", default=[], metavar="NAME[:CALIB_X=V,...]",
                   help="a server configuration to measure (repeatable; default: the defaults)")
    args = p.parse_args(argv)
    configs = [parse_config(c) for c in args.config] or [("default", {})]
    if not args.model_dir.exists():
        raise CommandError(f"model directory {args.model_dir} does not exist (--model-dir)")
    if args.mc_samples != 100:
        configs = [(n, {"default_mc_samples": str(args.mc_samples), **s}) for n, s in configs]

    name, capacity, image = in_process_capacity(args.model_dir, args.model, args.batch, args.mc_samples,
                                                args.repeats, args.runtime)
    configs = [(n, {"runtime": args.runtime, **s}) for n, s in configs]
    body = json.dumps({"instances": [image]}).encode()
    print(f"model {name}, MC T={args.mc_samples}, {os.cpu_count()} CPUs; in-process capacity, batch of "
          f"{args.batch}, runtime {args.runtime}: {capacity:.1f} images/s (0.8x = {0.8 * capacity:.1f})")
    servers = []
    results = defaultdict(list)
    try:
        for _, settings in configs:
            servers.append(start_server(args.model_dir, settings))
        for server, (_, settings) in zip(servers, configs):
            server.wait_ready()
            if int(settings.get("workers", 1)) > 1:
                server.wait_workers(int(settings["workers"]), timeout=900)
        if args.generator == "wrk":
            print(f"{args.clients} concurrent one-image clients for {args.duration:g} s, one client for "
                  f"{args.sequential_duration:g} s; one keep-alive connection each; load generator: wrk")
        else:
            print(f"{args.clients} concurrent one-image clients, {args.requests} requests; one keep-alive "
                  f"connection each; load generator: this process (httpx)")
        for round_ in range(args.rounds):
            for (cname, _), server in zip(configs, servers):
                if args.generator == "wrk":
                    r = measure_wrk(server, name, body, args.clients, args.duration, args.sequential_duration,
                                    capacity)
                else:
                    r = measure(server, name, body, args.clients, args.requests, args.sequential, capacity)
                results[cname].append(r)
                print_result(cname, r)
    except (ServerError, wrk.WrkError) as exc:
        raise CommandError(exc) from None
    finally:
        for server in servers:
            server.stop()
    if args.rounds > 1:
        print("median over rounds:")
        for cname, rs in results.items():
            print(f"  {cname:<14}{statistics.median(r['req_s'] for r in rs):7.1f} req/s  "
                  f"{statistics.median(r['ratio'] for r in rs):5.2f}x   "
                  f"p99 {statistics.median(r['p99'] for r in rs):6.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
