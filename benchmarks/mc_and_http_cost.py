"""`python -m benchmarks.mc_and_http_cost`: what MC dropout and HTTP cost, side by side in one run.

In-process on one batch: deterministic predict vs MC T=100 vectorised vs the plain Keras loops
(backbone once then T head calls with training=True; the naive T full passes). Then a real
uvicorn process on loopback (the Docker CMD's command): one-image latency and throughput
sequentially and at 16 concurrent clients (whose requests the predict micro-batcher merges into
shared backbone passes), and a 10,000-image .npz evaluation against the in-process
forward pass over the same images. Bounded loops; prints, never asserts.
"""

from __future__ import annotations

import asyncio
import io
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.server_process import ServerError, ServerProcess
from commandline import ArgumentParser, CommandError, command, invoked_as, setup_tensorflow

setup_tensorflow()   # as `python -m service` does
PROG = invoked_as("benchmarks.mc_and_http_cost")

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "tests" / "data" / "cifar10-fixture"  # 600 real CIFAR-10 JPEGs shipped with the repo


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def in_process(model, x: np.ndarray, t: int, repeats: int, naive_repeats: int) -> dict:
    """Deterministic and MC runs alternate, so drift in machine load hits both alike."""
    from service import dataplane

    det_fn = lambda: dataplane.predict(model, x, mc_samples=0, seed=None)  # noqa: E731
    mc_fn = lambda: dataplane.predict(model, x, mc_samples=t, seed=0)  # noqa: E731
    keras_fn = lambda: model.classifier.mc_logits_keras(x, t)  # noqa: E731
    naive_fn = lambda: model.classifier.mc_logits_naive(x, t)  # noqa: E731
    clf = model.classifier
    det_fn(), mc_fn(), clf.mc_logits_keras(x, 2), clf.mc_logits_naive(x, 2)  # warm-up (tracing)
    pairs = [(_timed(det_fn), _timed(mc_fn)) for _ in range(repeats)]
    det = statistics.median(d for d, _ in pairs)
    mc = statistics.median(m for _, m in pairs)
    ratio = statistics.median(m / d for d, m in pairs)
    keras_loop = statistics.median(_timed(keras_fn) for _ in range(naive_repeats))
    naive = statistics.median(_timed(naive_fn) for _ in range(naive_repeats))
    print(f"\nIn-process, batch of {len(x)} images, median of {repeats} alternating runs (naive: {naive_repeats})")
    print(f"  {'deterministic predict':<42}{det * 1e3:>10.1f} ms   1.00x")
    print(f"  {f'MC T={t}, vectorised (backbone once)':<42}{mc * 1e3:>10.1f} ms   {ratio:.2f}x"
          f"   (median per-pair ratio; target <= 1.5x)")
    print(f"  {f'MC T={t}, Keras head loop (backbone once)':<42}{keras_loop * 1e3:>10.1f} ms   "
          f"{keras_loop / det:.2f}x")
    print(f"  {f'MC T={t}, naive loop ({t} full passes)':<42}{naive * 1e3:>10.1f} ms   {naive / det:.2f}x"
          f"   (vectorised is {naive / mc:.1f}x faster)")
    return {"deterministic": det, "mc": mc, "keras_loop": keras_loop, "naive": naive, "ratio": ratio}


def load_images(data: Path | None, n: int, num_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Real labelled images (tiled to n) when a dataset is at hand, else random pixels."""
    if data is not None and data.exists():
        from training.data import load_cifar10

        d = load_cifar10(str(data))
        reps = -(-n // len(d.x_test))
        return np.tile(d.x_test, (reps, 1, 1, 1))[:n], np.tile(d.y_test, reps)[:n], data.name
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, num_classes, n),
            "random pixels")


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def http(url: str, model: str, requests: int, concurrency: int, eval_x, eval_y, forward_seconds: float) -> None:
    import httpx

    image = eval_x[0].tolist()
    body = {"instances": [image]}
    path = f"/v1/models/{model}/predict"
    with httpx.Client(base_url=url, timeout=120) as client:
        for _ in range(5):
            client.post(path, json=body).raise_for_status()
        lat = []
        wall_start = time.perf_counter()
        for _ in range(requests):
            start = time.perf_counter()
            client.post(path, json=body).raise_for_status()
            lat.append(time.perf_counter() - start)
        seq_wall = time.perf_counter() - wall_start
    print("\nHTTP on loopback (uvicorn, one process), one-image predict with MC T=100 (server default)")
    print(f"  sequential, {requests} requests: {requests / seq_wall:.1f} req/s   "
          f"p50 {_pct(lat, 50) * 1e3:.1f} ms   p95 {_pct(lat, 95) * 1e3:.1f} ms")

    async def load() -> tuple[float, list[float]]:
        per_client = max(1, requests // concurrency)
        latencies: list[float] = []
        limits = httpx.Limits(max_connections=concurrency)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as ac:
            async def worker():
                for _ in range(per_client):
                    start = time.perf_counter()
                    (await ac.post(path, json=body)).raise_for_status()
                    latencies.append(time.perf_counter() - start)
            start = time.perf_counter()
            await asyncio.gather(*[worker() for _ in range(concurrency)])
            return time.perf_counter() - start, latencies

    before = _batch_counts(url, model)
    wall, lat = asyncio.run(load())
    passes, batched_requests, batched_images = (a - b for a, b in zip(_batch_counts(url, model), before))
    print(f"  {concurrency} concurrent clients, {len(lat)} requests: {len(lat) / wall:.1f} req/s   "
          f"p50 {_pct(lat, 50) * 1e3:.1f} ms   p95 {_pct(lat, 95) * 1e3:.1f} ms   "
          f"({len(lat) / wall * seq_wall / requests:.2f}x sequential throughput)")
    if passes:
        print(f"    micro-batcher: {int(batched_requests)} requests in {int(passes)} backbone passes, "
              f"{batched_images / passes:.1f} images per pass on average")
    else:
        print("    micro-batcher: off (CALIB_BATCH_WAIT_MS=0)")

    buf = io.BytesIO()
    np.savez(buf, x=eval_x, y=eval_y)
    data = buf.getvalue()
    with httpx.Client(base_url=url, timeout=600) as client:
        start = time.perf_counter()
        r = client.post(f"/v1/models/{model}/evaluate", files={"file": ("val.npz", data)})
        seconds = time.perf_counter() - start
    r.raise_for_status()
    print(f"  evaluate {len(eval_x):,} images (.npz upload, {len(data) / 2**20:.1f} MiB): {seconds:.2f} s   vs "
          f"in-process forward pass {forward_seconds:.2f} s   ({seconds / forward_seconds:.2f}x)   "
          f"ECE {r.json()['before_temperature']['ece']:.4f} -> {r.json()['after_temperature']['ece']:.4f}")


def _batch_counts(url: str, model: str) -> tuple[float, float, float]:
    """(backbone passes, requests, images) of the server's predict micro-batcher, from /metrics."""
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=10).text
    values = dict.fromkeys(("images_count", "requests_sum", "images_sum"), 0.0)
    for line in text.splitlines():
        for key in values:
            prefix = f'calib_predict_batch_{key}{{model="{model}"}} '
            if line.startswith(prefix):
                values[key] = float(line[len(prefix):])
    return values["images_count"], values["requests_sum"], values["images_sum"]


@command(PROG)
def main(argv: list[str] | None = None) -> int:
    from service.settings import load_settings

    p = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path, default=load_settings().model_dir)
    p.add_argument("--model", help="model name (default: the first loaded)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--mc-samples", type=int, default=100)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--naive-repeats", type=int, default=2, help="runs of each plain Keras loop")
    p.add_argument("--requests", type=int, default=160, help="requests per HTTP measurement")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--eval-images", type=int, default=10_000)
    p.add_argument("--skip-http", action="store_true")
    p.add_argument("--data", type=Path, default=SAMPLE,
                   help="labelled images (CIFAR layout/archive) to tile; random pixels if missing")
    args = p.parse_args(argv)

    if not args.model_dir.exists():
        raise CommandError(f"model directory {args.model_dir} does not exist (--model-dir)")
    from service import dataplane
    from service.registry import load_registry

    registry = load_registry(args.model_dir, runtime="keras")  # compares against the Keras references
    if not registry.models:
        reasons = "; ".join(f"{f.path}: {f.error}" for f in registry.failures)
        raise CommandError(f"no model loaded from {args.model_dir}: {reasons or 'no artifact in it'}")
    model = registry.get(args.model or registry.names()[0])
    import tensorflow as tf

    print(f"model {model.name} ({model.path}), T={model.temperature:.4f}, "
          f"{model.classifier.model.count_params():,} parameters; TensorFlow {tf.__version__}, "
          f"{os.cpu_count()} CPUs")
    x, _, _ = load_images(args.data, args.batch, model.num_classes, seed=0)
    in_process(model, x, args.mc_samples, args.repeats, args.naive_repeats)
    if args.skip_http:
        return 0

    eval_x, eval_y, source = load_images(args.data, args.eval_images, model.num_classes, seed=2)
    dataplane.logits_in_chunks(model, eval_x[:500], 500)  # warm-up
    start = time.perf_counter()
    dataplane.logits_in_chunks(model, eval_x, 500)
    forward = time.perf_counter() - start
    print(f"\n(evaluation data: {len(eval_x):,} images from {source})")
    name = model.name
    del registry, model  # free the in-process copy before the server loads its own

    try:
        with ServerProcess(args.model_dir) as server:
            http(server.url, name, args.requests, args.concurrency, eval_x, eval_y, forward)
    except ServerError as exc:
        raise CommandError(exc) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
