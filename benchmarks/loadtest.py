"""`python -m benchmarks.loadtest`: a soak test and an overload phase against a real uvicorn process.

Soak: `--clients` concurrent clients for `--duration` seconds mix predict (JSON and multipart
PNG), evaluate (`.npz` with labels) and bad inputs that must get a 4xx. Reported: requests and
p50/p95/p99 latency per kind, 5xx, unexpected statuses, connection errors, the server's RSS after
warm-up and at the end (growth must stay under 50 MB) and this process's own CPU time.

Overload (`--overload N`): N concurrent evaluations of a 10,000-image `.npz` (~29 MB, generated
once) while `/health/live` is polled (each answer within 1 s) and the server's RSS is sampled
every 0.2 s. Every request must end in its result or a 503 `overloaded`, never a dropped
connection.

Images are seeded uint8 noise: no network, no dataset; predictions need not mean anything.
Loopback only; bounded in time; a server it started is killed at the end. A benchmark: it prints
(and optionally writes JSON) and exits non-zero when a check fails, nothing more.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from commandline import CommandError, command


RSS_GROWTH_LIMIT_MB = 50
LIVE_LIMIT_S = 1.0

# kind -> weight in the soak mix
MIX = {"predict_json": 40, "predict_png": 25, "evaluate": 10, "bad_input": 25}
BAD_KINDS = ("malformed_json", "wrong_shape", "wrong_content_type", "too_many_instances", "unknown_model",
             "bad_parameter", "not_an_image", "missing_labels")


def rss_mb(pid: int) -> float | None:
    """VmRSS of a process, from /proc (None when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


class Payloads:
    """Every request body of the soak, built once from seeded noise."""

    def __init__(self, seed: int, max_instances: int, eval_images: int, num_classes: int = 10):
        rng = np.random.default_rng(seed)
        self.images = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
        self.json_bodies = [json.dumps({"instances": self.images[i:i + n].tolist()}).encode()
                            for i, n in ((0, 1), (1, 4), (5, 16))]
        self.pngs = [_png(img) for img in self.images[:8]]
        x = rng.integers(0, 256, (eval_images, 32, 32, 3), dtype=np.uint8)
        self.eval_npz = _npz(x=x, y=rng.integers(0, num_classes, eval_images))
        self.too_many = json.dumps({"instances": np.zeros((max_instances + 1, 32, 32, 3), np.uint8).tolist()
                                    }).encode()
        self.wrong_shape = json.dumps({"instances": self.images[:2, :16].tolist()}).encode()
        self.unlabelled_npz = _npz(x=self.images[:8])


async def _request(client, kind: str, model: str, p: Payloads, rng: random.Random):
    """One request of `kind`: returns (label, response)."""
    base = f"/v1/models/{model}"
    if kind == "predict_json":
        return kind, await client.post(f"{base}/predict", params={"mc_samples": rng.choice((0, 20, 100))},
                                       content=rng.choice(p.json_bodies),
                                       headers={"content-type": "application/json"})
    if kind == "predict_png":
        files = [("file", (f"img{i}.png", p.pngs[i], "image/png")) for i in rng.sample(range(8), rng.randint(1, 4))]
        return kind, await client.post(f"{base}/predict", params={"mc_samples": 20}, files=files)
    if kind == "evaluate":
        return kind, await client.post(f"{base}/evaluate", files={"file": ("val.npz", p.eval_npz)})
    bad = rng.choice(BAD_KINDS)
    label = f"bad:{bad}"
    if bad == "malformed_json":
        r = await client.post(f"{base}/predict", content=b'{"instances": [[[1, 2',
                              headers={"content-type": "application/json"})
    elif bad == "wrong_shape":
        r = await client.post(f"{base}/predict", content=p.wrong_shape, headers={"content-type": "application/json"})
    elif bad == "wrong_content_type":
        r = await client.post(f"{base}/predict", content=b"hello", headers={"content-type": "text/plain"})
    elif bad == "too_many_instances":
        r = await client.post(f"{base}/predict", content=p.too_many, headers={"content-type": "application/json"})
    elif bad == "unknown_model":
        r = await client.post("/v1/models/no-such-model/predict", content=p.json_bodies[0],
                              headers={"content-type": "application/json"})
    elif bad == "bad_parameter":
        r = await client.post(f"{base}/predict", params={"mc_samples": -3}, content=p.json_bodies[0],
                              headers={"content-type": "application/json"})
    elif bad == "not_an_image":
        r = await client.post(f"{base}/predict", files={"file": ("x.png", b"not a png at all")})
    else:  # missing_labels
        r = await client.post(f"{base}/evaluate", files={"file": ("x.npz", p.unlabelled_npz)})
    return label, r


class Tally:
    """Outcomes and latencies, by request kind."""

    def __init__(self):
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.statuses: dict[str, Counter] = defaultdict(Counter)
        self.connection_errors: Counter = Counter()
        self.unexpected: Counter = Counter()

    def add(self, label: str, status: int, seconds: float, expect_4xx: bool) -> None:
        group = "bad_input" if label.startswith("bad:") else label
        self.latency[group].append(seconds)
        self.statuses[group][status] += 1
        ok = 400 <= status < 500 if expect_4xx else status == 200
        if not ok:
            self.unexpected[f"{label} -> {status}"] += 1

    def report(self) -> dict:
        out = {}
        for kind in sorted(self.latency):
            lat = np.asarray(self.latency[kind]) * 1e3
            statuses = {str(k): v for k, v in sorted(self.statuses[kind].items())}
            out[kind] = {"requests": int(len(lat)), "statuses": statuses,
                         "p50_ms": float(np.percentile(lat, 50)), "p95_ms": float(np.percentile(lat, 95)),
                         "p99_ms": float(np.percentile(lat, 99)), "max_ms": float(lat.max())}
        five = sum(n for c in self.statuses.values() for s, n in c.items() if s >= 500)
        return {"endpoints": out, "requests": sum(len(v) for v in self.latency.values()), "5xx": five,
                "unexpected": dict(self.unexpected), "connection_errors": dict(self.connection_errors)}


async def soak(url: str, model: str, payloads: Payloads, clients: int, duration: float, warmup: float,
               pid: int | None, seed: int, segments: int = 4) -> dict:
    """`warmup` s of load, then the rest of `duration` in `segments` equal parts. Between parts the
    clients finish their requests and the server idles 1 s: its RSS then is what it retains, not
    what requests in flight hold, so the series shows whether memory keeps growing."""
    import httpx

    tally = Tally()
    start = time.monotonic()
    rss = {"start": rss_mb(pid) if pid else None, "idle_series": [], "max": 0.0}
    kinds, weights = zip(*MIX.items())
    rngs = [random.Random(seed * 1000 + i) for i in range(clients)]

    async def client_loop(i: int, until: float):
        rng = rngs[i]
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            while time.monotonic() < until:
                kind = rng.choices(kinds, weights)[0]
                t0 = time.perf_counter()
                try:
                    label, r = await _request(client, kind, model, payloads, rng)
                except httpx.HTTPError as exc:
                    tally.connection_errors[f"{kind}: {type(exc).__name__}"] += 1
                    continue
                tally.add(label, r.status_code, time.perf_counter() - t0, expect_4xx=label.startswith("bad:"))

    async def watch_rss(until: float):
        while time.monotonic() < until:
            await asyncio.sleep(0.2)
            now = rss_mb(pid)
            if now is not None:
                rss["max"] = max(rss["max"], now)

    async def run_until(until: float):
        await asyncio.gather(*[client_loop(i, until) for i in range(clients)], *([watch_rss(until)] if pid else []))
        if pid:
            await asyncio.sleep(1.0)  # in-flight buffers released: what the server keeps
            rss["idle_series"].append(rss_mb(pid))

    cpu0 = time.process_time()
    ends = [start + warmup] + [start + warmup + (duration - warmup) * (k + 1) / segments for k in range(segments)]
    for until in ends:
        await run_until(until)
    wall = time.monotonic() - start
    out = tally.report()
    series = [v for v in rss["idle_series"] if v is not None]
    if len(series) >= 2:
        rss.update(after_warmup=series[0], end=series[-1], growth_mb=series[-1] - series[0])
    out.update(wall_s=wall, clients=clients, warmup_s=warmup, rss_mb=rss,
               loadgen_cpu_s=time.process_time() - cpu0, requests_per_s=out["requests"] / wall)
    return out


def _poll_live(url: str, interval: float, stop, results, started) -> None:
    """Child process: GET /health/live every `interval` s until `stop` is set; (seconds, status or
    error name) per poll into `results`. A process of its own, so the time measured is the server's
    and not that of the load generator's event loop, which is busy uploading the large bodies."""
    import httpx

    with httpx.Client(base_url=url, timeout=10) as client:
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                outcome = str(client.get("/health/live").status_code)
            except httpx.HTTPError as exc:
                outcome = type(exc).__name__
            results.put((time.perf_counter() - t0, outcome))
            started.set()
            stop.wait(interval)


class LivenessPoller:
    """Polls /health/live from a separate process during the overload phase."""

    def __init__(self, url: str, interval: float = 0.25) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self._stop, self._results, self._started = ctx.Event(), ctx.Queue(), ctx.Event()
        self._process = ctx.Process(target=_poll_live, daemon=True,
                                    args=(url, interval, self._stop, self._results, self._started))

    def start(self, timeout: float = 60) -> None:
        """Returns once the first poll is answered, so the phase it watches is covered from its start."""
        self._process.start()
        self._started.wait(timeout)

    def stop(self) -> tuple[list[float], Counter]:
        """Seconds of every answered poll, and the count of failed ones by status or error."""
        import queue

        self._stop.set()
        polls = []
        while self._process.is_alive() or not self._results.empty():
            try:
                polls.append(self._results.get(timeout=0.5))
            except queue.Empty:
                if not self._process.is_alive():
                    break
        self._process.join(timeout=15)
        seconds = [t for t, outcome in polls if outcome == "200"]
        failures = Counter(outcome for _, outcome in polls if outcome != "200")
        return seconds, failures


async def overload(url: str, model: str, n: int, images: int, pid: int | None, seed: int,
                   timeout: float = 600) -> dict:
    import httpx

    rng = np.random.default_rng(seed + 1)
    body = _npz(x=rng.integers(0, 256, (images, 32, 32, 3), dtype=np.uint8), y=rng.integers(0, 10, images))
    outcomes: Counter = Counter()
    latencies: dict[str, list[float]] = defaultdict(list)
    retry_after: list[int] = []
    rss_samples: list[float] = []
    done = asyncio.Event()

    async def one(client):
        t0 = time.perf_counter()
        try:
            r = await client.post(f"/v1/models/{model}/evaluate", files={"file": ("big.npz", body)})
        except httpx.HTTPError as exc:
            outcomes[f"connection error: {type(exc).__name__}"] += 1
            return
        seconds = time.perf_counter() - t0
        if r.status_code == 200:
            outcomes["200 result"] += 1
            latencies["200"].append(seconds)
        elif r.status_code == 503 and r.headers.get("content-type", "").startswith("application/json") \
                and r.json().get("error", {}).get("code") == "overloaded" and "retry-after" in r.headers:
            outcomes[f"503 overloaded ({r.json()['error'].get('details', {}).get('reason')})"] += 1
            latencies["503"].append(seconds)
            retry_after.append(int(r.headers["retry-after"]))
        else:
            outcomes[f"{r.status_code} other: {r.text[:80]}"] += 1

    live_poller = LivenessPoller(url)

    async def poll_rss():
        while not done.is_set():
            value = rss_mb(pid)
            if value is not None:
                rss_samples.append(value)
            await asyncio.sleep(0.2)

    rss_before = rss_mb(pid) if pid else None
    limits = httpx.Limits(max_connections=n + 10, max_keepalive_connections=n + 10)
    start = time.monotonic()
    cpu0 = time.process_time()
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        watchers = [asyncio.ensure_future(poll_rss())] if pid else []
        live_poller.start()
        try:
            await asyncio.gather(*(one(client) for _ in range(n)))
        finally:
            done.set()
            live, live_failures = live_poller.stop()
        await asyncio.gather(*watchers)
    wall = time.monotonic() - start
    await asyncio.sleep(1.0)
    pct = lambda v, q: float(np.percentile(v, q)) if v else None  # noqa: E731
    return {"clients": n, "images": images, "body_mb": len(body) / 2**20, "wall_s": wall,
            "outcomes": dict(outcomes),
            "latency_s": {k: {"p50": pct(v, 50), "p95": pct(v, 95), "max": max(v)} for k, v in latencies.items()},
            "retry_after_s": {"min": min(retry_after), "max": max(retry_after)} if retry_after else None,
            "live": {"polls": len(live), "max_s": max(live) if live else None, "failures": dict(live_failures)},
            "rss_mb": {"before": rss_before, "peak": max(rss_samples) if rss_samples else None,
                       "after": rss_mb(pid) if pid else None, "samples": len(rss_samples)},
            "loadgen_cpu_s": time.process_time() - cpu0}


def checks(report: dict) -> list[str]:
    """The soak's pass/fail criteria; the failures, as sentences."""
    failed = []
    s = report.get("soak")
    if s:
        if s["5xx"]:
            failed.append(f"soak: {s['5xx']} 5xx responses")
        if s["unexpected"]:
            failed.append(f"soak: unexpected statuses {s['unexpected']}")
        if s["connection_errors"]:
            failed.append(f"soak: connection errors {s['connection_errors']}")
        growth = s["rss_mb"].get("growth_mb")
        if growth is not None and growth >= RSS_GROWTH_LIMIT_MB:
            failed.append(f"soak: server RSS grew {growth:.1f} MB (limit {RSS_GROWTH_LIMIT_MB})")
    o = report.get("overload")
    if o:
        bad = {k: v for k, v in o["outcomes"].items() if not k.startswith(("200", "503 overloaded"))}
        if bad:
            failed.append(f"overload: outcomes other than a result or 503 overloaded: {bad}")
        if o["live"]["failures"] or (o["live"]["max_s"] or 0) > LIVE_LIMIT_S:
            failed.append(f"overload: /health/live max {o['live']['max_s']} s, failures {o['live']['failures']}")
    if report.get("server_exit") is not None:
        failed.append(f"the server exited with {report['server_exit']}")
    return failed


def print_report(report: dict) -> None:
    s = report.get("soak")
    if s:
        print(f"\nSoak: {s['clients']} clients for {s['wall_s']:.0f} s: {s['requests']} requests "
              f"({s['requests_per_s']:.1f}/s)")
        print(f"  {'kind':<14}{'requests':>9}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}{'max ms':>10}  statuses")
        for kind, e in s["endpoints"].items():
            print(f"  {kind:<14}{e['requests']:>9}{e['p50_ms']:>10.1f}{e['p95_ms']:>10.1f}{e['p99_ms']:>10.1f}"
                  f"{e['max_ms']:>10.1f}  {e['statuses']}")
        print(f"  5xx: {s['5xx']}   unexpected statuses: {s['unexpected'] or 0}   "
              f"connection errors: {s['connection_errors'] or 0}")
        r = s["rss_mb"]
        if r.get("end") is not None:
            growth = r.get("growth_mb")
            print(f"  server RSS: start {r['start']:.0f} MB, after {s['warmup_s']:.0f} s warm-up "
                  f"{r['after_warmup'] or float('nan'):.0f} MB, end {r['end']:.0f} MB, max {r['max']:.0f} MB"
                  + (f", growth {growth:+.1f} MB (limit {RSS_GROWTH_LIMIT_MB})" if growth is not None else ""))
            print("  server RSS when idle after warm-up and after each part: "
                  + " -> ".join(f"{v:.0f}" for v in r["idle_series"] if v is not None) + " MB")
        print(f"  load generator CPU: {s['loadgen_cpu_s']:.1f} s")
    o = report.get("overload")
    if o:
        print(f"\nOverload: {o['clients']} concurrent evaluations of {o['images']:,} images "
              f"({o['body_mb']:.1f} MiB .npz) in {o['wall_s']:.1f} s")
        for outcome, n in sorted(o["outcomes"].items()):
            print(f"  {n:>5}  {outcome}")
        for k, v in o["latency_s"].items():
            print(f"  latency of {k}: p50 {v['p50']:.2f} s, p95 {v['p95']:.2f} s, max {v['max']:.2f} s")
        if o["retry_after_s"]:
            print(f"  Retry-After: {o['retry_after_s']['min']}..{o['retry_after_s']['max']} s")
        lv = o["live"]
        print(f"  /health/live: {lv['polls']} polls, max {lv['max_s'] or float('nan'):.3f} s, "
              f"failures {lv['failures'] or 0}")
        r = o["rss_mb"]
        if r["peak"] is not None:
            print(f"  server RSS: before {r['before']:.0f} MB, peak {r['peak']:.0f} MB "
                  f"({r['samples']} samples, every 0.2 s), after {r['after'] or float('nan'):.0f} MB")
        print(f"  load generator CPU: {o['loadgen_cpu_s']:.1f} s")


def _model_name(url: str, wanted: str | None) -> str:
    import httpx

    models = [m["name"] for m in httpx.get(f"{url}/v1/models", timeout=10).json()["models"]]
    if wanted and wanted not in models:
        raise SystemExit(f"model {wanted!r} not served; loaded: {models}")
    if not models:
        raise SystemExit("the server has no model loaded")
    return wanted or models[0]


@command("python -m benchmarks.loadtest")
def main(argv: list[str] | None = None) -> int:
    from benchmarks.server_process import ServerError, ServerProcess
    from service.settings import Settings

    p = argparse.ArgumentParser(prog="python -m benchmarks.loadtest", description=__doc__.splitlines()[0])
    p.add_argument("--url", help="target a running server instead of starting one (loopback)")
    p.add_argument("--pid", type=int, help="with --url: the server's pid, to read its RSS")
    p.add_argument("--model-dir", type=Path, help="model folder of the server started here (default: shipped)")
    p.add_argument("--model", help="model name (default: the first loaded)")
    p.add_argument("--duration", type=float, default=300, help="soak seconds (0: no soak)")
    p.add_argument("--warmup", type=float, default=30, help="seconds of soak before the reference RSS")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--eval-images", type=int, default=1000, help="images per soak evaluation")
    p.add_argument("--overload", type=int, default=0, metavar="N", help="then N concurrent large evaluations")
    p.add_argument("--overload-images", type=int, default=10_000)
    p.add_argument("--overload-timeout", type=float, default=600,
                   help="client timeout of each overload request (s); bounds the phase")
    p.add_argument("--max-instances", type=int, help="the server's CALIB_MAX_INSTANCES (default: from env)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the report here")
    args = p.parse_args(argv)

    settings = Settings()  # the environment a server started here sees too
    server = None
    if args.url:
        url, pid = args.url.rstrip("/"), args.pid
    else:
        server = ServerProcess(args.model_dir or settings.model_dir).start()
        url, pid = server.url, server.pid
    report: dict = {"command": " ".join(["python -m benchmarks.loadtest", *(argv if argv is not None else sys.argv[1:])]),
                    "url": url, "server_pid": pid}
    try:
        if server is not None:
            try:
                server.wait_ready()
            except ServerError as exc:
                raise CommandError(exc) from None
        model = _model_name(url, args.model)
        report["model"] = model
        max_instances = args.max_instances or settings.max_instances
        payloads = Payloads(args.seed, max_instances, args.eval_images)
        print(f"server {url} (pid {pid}), model {model}; soak {args.duration:g} s x {args.clients} clients"
              + (f", then overload x {args.overload}" if args.overload else ""), flush=True)
        if args.duration > 0:
            report["soak"] = asyncio.run(soak(url, model, payloads, args.clients, args.duration,
                                              min(args.warmup, args.duration / 2), pid, args.seed))
        if args.overload:
            report["overload"] = asyncio.run(overload(url, model, args.overload, args.overload_images, pid,
                                                      args.seed, args.overload_timeout))
        if server is not None and server.proc.poll() is not None:
            report["server_exit"] = server.proc.returncode
    finally:
        if server is not None:
            server.stop()
    report["failed_checks"] = checks(report)
    print_report(report)
    print("\nchecks: " + ("all passed" if not report["failed_checks"] else "FAILED\n  "
                          + "\n  ".join(report["failed_checks"])))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 1 if report["failed_checks"] else 0


if __name__ == "__main__":
    sys.exit(main())
