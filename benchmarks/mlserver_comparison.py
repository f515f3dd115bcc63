"""`python -m benchmarks.mlserver_comparison`: this service against MLServer on the same model, side
by side: one client's latency and 64 clients' throughput on `/v2/models/{name}/infer`.

Three servers run at once on loopback, each measured in turn with `wrk` posting the same one-image
JSON request (UINT8 pixels, the calibrated probabilities back, no MC dropout): this service on the
LiteRT runtime (its defaults: micro-batching), MLServer without batching, and MLServer with
adaptive batching (`--max-batch-size`, `--max-batch-time-ms`). MLServer serves the same LiteRT
classifier through `benchmarks.mlserver_runtime`; the answers are checked to agree first. MLServer
runs from its own venv (`--mlserver-venv`, default $MLSERVER_VENV; setup in docs/figures.md),
since its dependencies cannot share this project's environment. Prints, never asserts.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks import wrk
from benchmarks.concurrent_throughput import tree_cpu_seconds
from benchmarks.server_process import REPO, ServerError, ServerProcess, free_port
from commandline import ArgumentParser, CommandError, command, invoked_as

PROG = invoked_as("benchmarks.mlserver_comparison")
SAMPLE = REPO / "tests" / "data" / "cifar10-fixture"
RUNTIME = "benchmarks.mlserver_runtime.LiteRTCalibratedClassifier"


class MLServerProcess(ServerProcess):
    """`mlserver start` on a model repository written to a temporary folder: one model, this
    project's LiteRT runtime, optionally adaptive batching."""

    def __init__(self, venv: Path, artifact: Path, name: str, *, max_batch_size: int = 1,
                 max_batch_time_s: float = 0.0, ready_timeout: float = 300):
        self._repo = tempfile.TemporaryDirectory(prefix="mlserver-repo-")
        super().__init__(self._repo.name, ready_timeout=ready_timeout)
        root = Path(self._repo.name)
        (root / "settings.json").write_text(json.dumps({
            "http_port": self.port, "grpc_port": free_port(), "metrics_port": free_port(),
            "host": "127.0.0.1", "debug": False}))
        (root / name).mkdir()
        model = {"name": name, "implementation": RUNTIME, "parameters": {"uri": str(artifact)}}
        if max_batch_size > 1:
            model.update(max_batch_size=max_batch_size, max_batch_time=max_batch_time_s)
        (root / name / "model-settings.json").write_text(json.dumps(model))
        self.command = [str(venv / "bin" / "mlserver"), "start", str(root)]
        self.env["PYTHONPATH"] = str(REPO)   # this project's code only: MLServer's venv has its own packages
        self.ready_path = f"/v2/models/{name}/ready"

    def stop(self) -> None:
        super().stop()
        self._repo.cleanup()


def one_image() -> np.ndarray:
    """The first test image of the fixture, uint8 [32, 32, 3]."""
    from PIL import Image

    path = sorted((SAMPLE / "test").rglob("*.jpg"))[0]
    return np.asarray(Image.open(path).convert("RGB"), np.uint8)


def infer_body(image: np.ndarray) -> bytes:
    return json.dumps({"inputs": [{"name": "images", "shape": [1, *image.shape], "datatype": "UINT8",
                                   "data": image.reshape(-1).tolist()}]}).encode()


def probabilities(url: str, name: str, body: bytes) -> np.ndarray:
    import httpx

    r = httpx.post(f"{url}/v2/models/{name}/infer", content=body, headers={"content-type": "application/json"},
                   timeout=60)
    r.raise_for_status()
    out = next(o for o in r.json()["outputs"] if o["name"] == "probabilities")
    return np.asarray(out["data"], np.float32).reshape(out["shape"])


def measure(server: ServerProcess, name: str, body: bytes, clients: int, duration: float,
            single_duration: float) -> dict:
    url = f"{server.url}/v2/models/{name}/infer"
    wrk.run(url, body, connections=clients, duration_s=2)   # warm-up: connections, batch sizes
    one = wrk.run(url, body, connections=1, duration_s=single_duration)
    cpu0 = tree_cpu_seconds(server.pid)
    many = wrk.run(url, body, connections=clients, duration_s=duration)
    return {"one_req_s": one["req_s"], "one_p50": one["p50_ms"], "one_p99": one["p99_ms"],
            "many_req_s": many["req_s"], "many_p50": many["p50_ms"], "many_p99": many["p99_ms"],
            "server_cpu": (tree_cpu_seconds(server.pid) - cpu0) / many["seconds"], "wrk_cpu": many["wrk_cpu"]}


@command(PROG)
def main(argv: list[str] | None = None) -> int:
    from service.settings import DEFAULT_MODEL_DIR

    p = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--mlserver-venv", type=Path, default=os.environ.get("MLSERVER_VENV"),
                   help="a venv with mlserver 1.7 and ai-edge-litert (default: $MLSERVER_VENV)")
    p.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    p.add_argument("--model", default="cifar10-augmix", help="the model (an artifact folder in --model-dir)")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--duration", type=float, default=20, help="seconds at --clients")
    p.add_argument("--single-duration", type=float, default=10, help="seconds with one client")
    p.add_argument("--max-batch-size", type=int, default=64, help="MLServer adaptive batching")
    p.add_argument("--max-batch-time-ms", type=float, default=5.0, help="MLServer adaptive batching")
    p.add_argument("--rounds", type=int, default=1, help="measurements of each server, in alternation")
    args = p.parse_args(argv)
    if args.mlserver_venv is None or not (args.mlserver_venv / "bin" / "mlserver").exists():
        raise CommandError("no MLServer: pass --mlserver-venv (a venv with mlserver; docs/figures.md)")
    artifact = args.model_dir / args.model
    if not artifact.is_dir():
        raise CommandError(f"no model {args.model!r} in {args.model_dir}")
    if not wrk.available():
        raise CommandError("wrk is not installed (apt-get install wrk)")

    with tempfile.TemporaryDirectory(prefix="one-model-") as only:
        (Path(only) / args.model).symlink_to(artifact.resolve())
        servers = {
            "this service": ServerProcess(only, ready_timeout=900, runtime="litert"),
            "MLServer, no batching": MLServerProcess(args.mlserver_venv, artifact.resolve(), args.model),
            f"MLServer, adaptive batching ({args.max_batch_size}, {args.max_batch_time_ms:g} ms)": MLServerProcess(
                args.mlserver_venv, artifact.resolve(), args.model, max_batch_size=args.max_batch_size,
                max_batch_time_s=args.max_batch_time_ms / 1000),
        }
        results: dict[str, list[dict]] = {label: [] for label in servers}
        try:
            for server in servers.values():
                server.start()
            for server in servers.values():
                server.wait_ready()
            body = infer_body(one_image())
            answers = {label: probabilities(s.url, args.model, body) for label, s in servers.items()}
            reference = answers["this service"]
            for label, got in answers.items():
                diff = float(np.abs(got - reference).max())
                print(f"same answer: {label}: max |p - p_service| = {diff:.2e}")
                if diff > 1e-5:
                    raise CommandError(f"{label} answers differently from this service ({diff:.2e})")
            print(f"model {args.model}, {os.cpu_count()} CPUs, wrk: 1 client for {args.single_duration:g} s, "
                  f"{args.clients} clients for {args.duration:g} s, one keep-alive connection each")
            for round_ in range(args.rounds):
                for label, server in servers.items():
                    r = measure(server, args.model, body, args.clients, args.duration, args.single_duration)
                    results[label].append(r)
                    print(f"  {label:<48} {args.clients} clients {r['many_req_s']:6.1f} req/s (p50 "
                          f"{r['many_p50']:5.0f} ms)   1 client {r['one_req_s']:6.1f} req/s, p50 {r['one_p50']:5.2f} ms"
                          f"   server CPU {r['server_cpu']:.2f} cores, wrk {r['wrk_cpu']:.2f}")
        except (ServerError, wrk.WrkError) as exc:
            raise CommandError(exc) from None
        finally:
            for server in servers.values():
                server.stop()

    med = {label: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for label, rs in results.items()}
    ours, plain, adaptive = (med[label] for label in servers)
    print(f"median of {args.rounds} round(s):")
    print(f"| server | {args.clients} clients | 1 client (p50) |")
    print("|---|---|---|")
    for label, m in med.items():
        print(f"| {label} | {m['many_req_s']:.1f} req/s | {m['one_req_s']:.1f} req/s ({m['one_p50']:.2f} ms) |")
    print(f"single-client p50: this service / MLServer without batching = {ours['one_p50'] / plain['one_p50']:.2f}x "
          f"(target <= 1)")
    print(f"{args.clients} clients: this service / MLServer with adaptive batching = "
          f"{ours['many_req_s'] / adaptive['many_req_s']:.2f}x (target >= 1.1); / without batching = "
          f"{ours['many_req_s'] / plain['many_req_s']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
