"""`python -m benchmarks.worker_scaling`: one-image predict throughput with 1 and with N server
processes (CALIB_WORKERS), at several numbers of concurrent clients, plus each worker's memory.

The load generator is one asyncio process on the same machine; its CPU use is printed beside
the throughput, since on a small machine it competes with the workers it measures. Each client
keeps one connection open (as a real client pool does), so which worker serves it is the
kernel's choice at connect time: the per-worker split is printed too. Linux (/proc) for the
memory and CPU figures. Prints, never asserts.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

from benchmarks.server_process import ServerError, ServerProcess
from commandline import ArgumentParser, CommandError, command, invoked_as

PROG = invoked_as("benchmarks.worker_scaling")
REPO = Path(__file__).resolve().parents[1]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def rss_mib(pid: int) -> float:
    """Resident memory of one process (VmRSS), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def load(url: str, path: str, body: bytes, clients: int, per_client: int) -> tuple[float, list, Counter]:
    import httpx

    latencies: list[float] = []
    served: Counter = Counter()

    async def client() -> None:  # one connection per client
        async with httpx.AsyncClient(base_url=url, timeout=300, limits=httpx.Limits(max_connections=1)) as ac:
            headers = {"content-type": "application/json"}
            for i in range(per_client + 1):
                start = time.perf_counter()
                r = await ac.post(path, content=body, headers=headers)
                r.raise_for_status()
                if i:  # the first request of each client opens its connection: not timed
                    latencies.append(time.perf_counter() - start)
                    served[r.headers.get("x-served-by", "-")] += 1

    start = time.perf_counter()
    await asyncio.gather(*[client() for _ in range(clients)])
    return time.perf_counter() - start, latencies, served


def run_one(model_dir: Path, workers: int, concurrencies: list[int], requests: int, mc_samples: int) -> None:
    with ServerProcess(model_dir, ready_timeout=900, workers=workers) as server:
        pids = sorted(server.wait_workers(workers, timeout=900)) if workers > 1 else [server.pid]
        import httpx

        model = httpx.get(f"{server.url}/health/ready", timeout=30).json()["models"][0]
        path = f"/v1/models/{model}/predict?mc_samples={mc_samples}"
        image = [[[(x * 7 + y * 3 + c) % 256 for c in range(3)] for y in range(32)] for x in range(32)]
        body = json.dumps({"instances": [image]}).encode()
        memory = ", ".join(f"{rss_mib(p):.0f}" for p in pids)
        print(f"\nCALIB_WORKERS={workers}: model {model}, RSS per worker after start-up (MiB): {memory}")
        for clients in concurrencies:
            asyncio.run(load(server.url, path, body, clients, 2))  # warm-up: every worker, every batch size
            server_cpu0 = sum(cpu_seconds(p) for p in pids)
            own0 = own_cpu_seconds()
            wall, lat, served = asyncio.run(load(server.url, path, body, clients, max(1, requests // clients)))
            own = (own_cpu_seconds() - own0) / wall
            srv = (sum(cpu_seconds(p) for p in pids) - server_cpu0) / wall
            split = "/".join(str(served[str(p)]) for p in pids) if workers > 1 else str(len(lat))
            print(f"  {clients:>3} clients, {len(lat)} requests: {len(lat) / wall:6.1f} req/s   "
                  f"p50 {statistics.median(lat) * 1e3:6.0f} ms   p95 {sorted(lat)[int(0.95 * len(lat))] * 1e3:6.0f} ms"
                  f"   CPU: workers {srv:.2f} cores, load generator {own:.2f}   split {split}")
        memory = ", ".join(f"{rss_mib(p):.0f}" for p in pids)
        print(f"  RSS per worker after the load (MiB): {memory}")


@command(PROG)
def main(argv: list[str] | None = None) -> int:
    from service.settings import DEFAULT_MODEL_DIR

    p = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="server processes, one run each")
    p.add_argument("--concurrency", type=int, nargs="+", default=[16, 64], help="concurrent one-image clients")
    p.add_argument("--requests", type=int, default=320, help="timed requests per measurement")
    p.add_argument("--mc-samples", type=int, default=100, help="MC dropout samples per request (server default)")
    args = p.parse_args(argv)
    if not args.model_dir.exists():
        raise CommandError(f"model directory {args.model_dir} does not exist (--model-dir)")
    print(f"{os.cpu_count()} CPUs; one-image predict, MC T={args.mc_samples}; load generator: one asyncio "
          f"process, one keep-alive connection per client")
    for workers in args.workers:
        try:
            run_one(args.model_dir, workers, args.concurrency, args.requests, args.mc_samples)
        except ServerError as exc:
            raise CommandError(exc) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
