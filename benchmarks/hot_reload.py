"""Hot reload under load: N clients predict without pause while a model is re-loaded R times.

    python -m benchmarks.hot_reload [--artifact models/shipped/cifar10-augmix] [--clients 16]
                                    [--reloads 5] [--runtime litert]

Starts `python -m service` (benchmarks/server_process.py) on a temporary model directory holding
the artifact as `<name>/1/`; each reload copies it to the next `<name>/<k>/` (a hidden folder,
then a rename) and calls `POST /v2/repository/models/<name>/load`. Prints the requests sent, the
failed ones (any answer but 200, or a transport error) and the versions the answers named. The
target (issue 25): 0 failed.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Report:
    sent: int = 0
    failed: int = 0
    versions: Counter = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    reload_s: list[float] = field(default_factory=list)

    def line(self) -> str:
        seen = ", ".join(f"v{v}: {n}" for v, n in sorted(self.versions.items(), key=lambda kv: int(kv[0])))
        took = ", ".join(f"{s:.2f}" for s in self.reload_s)
        return (f"requests sent {self.sent}, failed {self.failed}; versions seen {len(self.versions)} ({seen}); "
                f"reloads took {took} s")


SETTLE_TIMEOUT_S = 60.0


def hammer(send: Callable[[], tuple[int, str | None]], reload: Callable[[int], None], *, clients: int,
           reloads: int, settle_s: float = 1.0) -> Report:
    """`clients` threads call `send()` (-> (status, version or error text)) back to back while the
    calling thread runs `reload(0..reloads-1)`, `settle_s` apart and each followed by at least
    `clients` answers (so every version serves however slow the machine is); then the clients stop."""
    report = Report()
    lock = threading.Lock()
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                status, what = send()
            except Exception as exc:  # a transport error is a lost request too
                status, what = 0, f"{type(exc).__name__}: {exc}"
            with lock:
                report.sent += 1
                if status == 200:
                    report.versions[what] += 1
                else:
                    report.failed += 1
                    report.errors.append(f"{status}: {what}")

    threads = [threading.Thread(target=client, name=f"client-{i}", daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    def settle() -> None:
        with lock:
            mark = report.sent
        time.sleep(settle_s)
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while time.monotonic() < deadline:
            with lock:
                if report.sent - mark >= clients:
                    return
            time.sleep(0.05)

    try:
        settle()
        for k in range(reloads):
            started = time.perf_counter()
            reload(k)
            report.reload_s.append(time.perf_counter() - started)
            settle()
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    return report


def run_against_server(artifact: Path, *, clients: int, reloads: int, runtime: str = "auto",
                       settle_s: float = 1.0, mc_samples: int = 10) -> Report:
    """The whole benchmark: a server on a temporary copy of `artifact`, `clients` httpx clients."""
    import httpx
    import numpy as np

    from benchmarks.server_process import ServerProcess

    name = artifact.name
    with tempfile.TemporaryDirectory(prefix="hot-reload-") as tmp:
        model_dir = Path(tmp) / "models"
        shutil.copytree(artifact, model_dir / name / "1")

        def add(version: int) -> None:
            hidden = model_dir / name / f".{version}.tmp"
            shutil.copytree(artifact, hidden)
            hidden.rename(model_dir / name / str(version))

        image = np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3)).tolist()
        with ServerProcess(model_dir, runtime=runtime, model_version_policy="latest") as server:
            local = threading.local()

            def send() -> tuple[int, str | None]:
                http = getattr(local, "http", None)
                if http is None:
                    http = local.http = httpx.Client(base_url=server.url, timeout=60)
                r = http.post(f"/v1/models/{name}/predict", params={"mc_samples": mc_samples, "seed": 0},
                              json={"instances": image})
                return r.status_code, (r.json()["version"] if r.status_code == 200 else r.text[:200])

            def reload(k: int) -> None:
                add(k + 2)
                r = httpx.post(f"{server.url}/v2/repository/models/{name}/load", timeout=300)
                if r.status_code != 200:
                    raise RuntimeError(f"load answered {r.status_code}: {r.text[:300]}")

            return hammer(send, reload, clients=clients, reloads=reloads, settle_s=settle_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact", type=Path, default=REPO / "models" / "shipped" / "cifar10-augmix")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--reloads", type=int, default=5)
    parser.add_argument("--settle-s", type=float, default=1.0, help="seconds of load before, between and after "
                                                                     "the reloads")
    parser.add_argument("--runtime", choices=("auto", "keras", "litert"), default="auto")
    parser.add_argument("--mc-samples", type=int, default=10)
    args = parser.parse_args(argv)
    report = run_against_server(args.artifact, clients=args.clients, reloads=args.reloads, runtime=args.runtime,
                                settle_s=args.settle_s, mc_samples=args.mc_samples)
    print(f"hot reload, {args.clients} clients, {args.reloads} reloads of {args.artifact.name} ({args.runtime}): "
          + report.line())
    for error in report.errors[:5]:
        print("  failed:", error)
    return 0 if report.failed == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
