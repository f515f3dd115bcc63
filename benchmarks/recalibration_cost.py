"""`python -m benchmarks.recalibration_cost`: what a recalibration profile costs, over HTTP on a real
`python -m service` process (the shipped serve command), side by side in one run.

1. predict with a profile / predict without (the card's temperature): one batch of images, MC
   dropout on or off, requests alternating so machine load hits both alike; issue 24's target is
   <= 1.05x.
2. fitting a profile on N labelled images / an evaluate of the same N (the .npz upload, the
   model's pass over the images, and for the fit the k-fold cross-fitting and the insert); the
   target is <= 3x for N = 5,000.

Bounded loops; prints, never asserts. Images: CIFAR-10's test split from --data (default
$CIFAR10_DIR), else the repository's fixture tiled to N.
"""

from __future__ import annotations

import io
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.server_process import ServerProcess
from commandline import ArgumentParser, command, invoked_as, setup_tensorflow
from training.shift.__main__ import cpu_model

PROG = invoked_as("benchmarks.recalibration_cost", "python -m benchmarks.recalibration_cost")
REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "data" / "cifar10-fixture"


def labelled(data: Path | None, n: int) -> tuple[np.ndarray, np.ndarray, str]:
    from training.data import load_cifar10

    source = data if data is not None and data.exists() else FIXTURE
    d = load_cifar10(str(source))
    reps = -(-n // len(d.x_test))
    return np.tile(d.x_test, (reps, 1, 1, 1))[:n], np.tile(d.y_test, reps)[:n], source.name


def npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def timed(fn) -> float:
    start = time.perf_counter()
    response = fn()
    elapsed = time.perf_counter() - start
    if response.status_code >= 300:
        raise RuntimeError(f"{response.request.url}: HTTP {response.status_code} {response.text[:300]}")
    return elapsed


def predict_ratio(http, url: str, model: str, profile_id: str, x: np.ndarray, mc: int, pairs: int) -> None:
    body = npz(x=x)
    path = f"{url}/v1/models/{model}/predict"
    plain = lambda: http.post(path, params={"mc_samples": mc, "seed": 0},  # noqa: E731
                              files={"file": ("x.npz", body)})
    profiled = lambda: http.post(path, params={"mc_samples": mc, "seed": 0, "calibration": profile_id},  # noqa: E731
                                 files={"file": ("x.npz", body)})
    for _ in range(3):
        timed(plain), timed(profiled)   # warm-up: tracing, the profile cache
    runs = [(timed(plain), timed(profiled)) for _ in range(pairs)]
    without = statistics.median(a for a, _ in runs)
    with_ = statistics.median(b for _, b in runs)
    ratio = statistics.median(b / a for a, b in runs)
    print(f"  predict {len(x)} images, MC T={mc:<4}  without {without * 1e3:8.1f} ms   with profile "
          f"{with_ * 1e3:8.1f} ms   ratio {ratio:.3f}x (median of {pairs} alternating pairs; target <= 1.05x)")


def in_process_ratio(model_dir: Path, x: np.ndarray, y: np.ndarray, pairs: int) -> None:
    """The same comparison without HTTP: `dataplane.predict` with a vector profile's calibrator
    vs the card's temperature, on one batch, alternating (what the profile itself costs)."""
    from models.calibration.recalibration import fit_calibrator
    from service import dataplane
    from service.dataplane import logits_in_chunks
    from service.registry import load_registry

    registry = load_registry(model_dir, warmup=True)
    model = registry.get(registry.names()[0])
    calibrator = fit_calibrator(logits_in_chunks(model, x, 500), y, "vector")
    batch = x[:64]
    print(f"\nIn process (no HTTP), {len(batch)} images, vector profile vs the card's temperature")
    for mc in (0, 100):
        plain = lambda: dataplane.predict(model, batch, mc_samples=mc, seed=0)  # noqa: E731
        profiled = lambda: dataplane.predict(model, batch, mc_samples=mc, seed=0, calibrator=calibrator)  # noqa: E731
        for _ in range(3):
            plain(), profiled()
        runs = []
        for _ in range(pairs):
            a = time.perf_counter(); plain(); b = time.perf_counter(); profiled(); c = time.perf_counter()  # noqa: E702
            runs.append((b - a, c - b))
        print(f"  MC T={mc:<4} without {statistics.median(a for a, _ in runs) * 1e3:8.1f} ms   with profile "
              f"{statistics.median(b for _, b in runs) * 1e3:8.1f} ms   ratio "
              f"{statistics.median(b / a for a, b in runs):.3f}x (median of {pairs} alternating pairs)")


@command(PROG)
def main(argv: list[str] | None = None) -> int:
    setup_tensorflow()
    parser = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cifar10-augmix", help="a shipped model (default cifar10-augmix)")
    parser.add_argument("--data", type=Path, default=Path(os.environ["CIFAR10_DIR"]) if os.environ.get("CIFAR10_DIR")
                        else None, help="CIFAR-10 image folder (default $CIFAR10_DIR; else the test fixture)")
    parser.add_argument("--fit-images", type=int, default=5000)
    parser.add_argument("--fit-repeats", type=int, default=2)
    parser.add_argument("--methods", default="temperature,vector,auto")
    parser.add_argument("--batch", type=int, default=64, help="images per predict request")
    parser.add_argument("--pairs", type=int, default=15, help="alternating predict pairs per setting")
    parser.add_argument("--in-process-only", action="store_true", help="only the in-process predict comparison")
    args = parser.parse_args(argv)
    import httpx

    x, y, source = labelled(args.data, args.fit_images)
    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs); model {args.model}; images: {source}")
    model_dir = REPO / "models" / "shipped" / args.model
    in_process_ratio(model_dir, x[:2000], y[:2000], args.pairs)
    if args.in_process_only:
        return 0
    with tempfile.TemporaryDirectory() as data_dir, \
            ServerProcess(model_dir, data_dir=data_dir, max_eval_images=max(args.fit_images, 50_000),
                          max_body_bytes=256 * 1024 * 1024, log_level="warning") as server, \
            httpx.Client(timeout=1800) as http:
        body = npz(x=x, y=y)
        base = f"{server.url}/v1/models/{args.model}"
        print(f"\nFit a profile on {len(x)} images / evaluate the same {len(x)} (HTTP, .npz upload; "
              f"median of {args.fit_repeats} alternating pairs)")
        profiles = {}
        for method in args.methods.split(","):
            fit = lambda: http.post(f"{base}/calibrations", params={"method": method},  # noqa: E731
                                    files={"file": ("b.npz", body)})
            evaluate = lambda: http.post(f"{base}/evaluate", files={"file": ("b.npz", body)})  # noqa: E731
            runs = []
            for _ in range(args.fit_repeats):
                e = timed(evaluate)
                start = time.perf_counter()
                response = fit()
                f = time.perf_counter() - start
                if response.status_code != 201:
                    raise RuntimeError(f"fit {method}: HTTP {response.status_code} {response.text[:300]}")
                profiles[method] = response.json()["id"]
                runs.append((e, f))
            e, f = statistics.median(a for a, _ in runs), statistics.median(b for _, b in runs)
            chosen = http.get(f"{base}/calibrations/{profiles[method]}").json()["method"]
            print(f"  {method:<12} evaluate {e:7.2f} s   fit {f:7.2f} s   ratio {f / e:.2f}x"
                  f"{f'  (auto chose {chosen})' if method == 'auto' else ''}   (target <= 3x)")
        profile_id = profiles.get("vector") or next(iter(profiles.values()))
        method = http.get(f"{base}/calibrations/{profile_id}").json()["method"]
        print(f"\nPredict with a profile ({method}) / without, HTTP .npz upload")
        for mc in (0, 100):
            predict_ratio(http, server.url, args.model, profile_id, x[:args.batch], mc, args.pairs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
