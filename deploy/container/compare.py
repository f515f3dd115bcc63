"""Check a containerised service against `python -m service` on the host, request by request.

`python deploy/container/compare.py CONTAINER_URL HOST_URL`: sends the same JSON predict,
multipart predict and evaluate (64 fixture JPEGs, every shipped model) to both servers and
requires equal answers: every number within 1e-5, everything else identical (the container may
serve with LiteRT and the host with Keras: `GET /v1/models` says which, and is printed; MC dropout
draws the same masks on both for the same seed). Then times a 64-image predict on each (median of 5). Exit 1 on the first difference. httpx only, so the
check needs nothing the project does not already install.
"""

from __future__ import annotations

import base64
import io
import statistics
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

TOLERANCE = 1e-5
FIXTURE = Path(__file__).resolve().parents[2] / "tests" / "data" / "cifar10-fixture" / "test"
N_IMAGES = 64


def fixture_images(n: int) -> list[Path]:
    return sorted(FIXTURE.glob("*/*.jpg"))[:n]


# Fields that name one call, not its answer: every prediction gets a fresh id to send feedback for
PER_CALL_FIELDS = {"prediction_id"}


def differences(a, b, where: str = "") -> list[tuple[str, float | str]]:
    """Paths where two JSON values differ: numbers by more than TOLERANCE, anything else at all
    (except PER_CALL_FIELDS, which only need to be present on both sides)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [(where, f"keys {sorted(a)} != {sorted(b)}")]
        return [d for k in a if k not in PER_CALL_FIELDS for d in differences(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [(where, f"length {len(a)} != {len(b)}")]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool):
        return [(where, abs(a - b))] if abs(a - b) > TOLERANCE else []
    return [] if a == b else [(where, f"{a!r} != {b!r}")]


def max_abs_difference(a, b) -> float:
    if isinstance(a, dict):
        return max((max_abs_difference(a[k], b[k]) for k in a if k not in PER_CALL_FIELDS), default=0.0)
    if isinstance(a, list):
        return max((max_abs_difference(x, y) for x, y in zip(a, b)), default=0.0)
    if isinstance(a, (int, float)) and not isinstance(a, bool):
        return float(abs(a - b))
    return 0.0


def requests(model: str, classes: list[str], paths: list[Path]) -> dict[str, dict]:
    """The calls to compare, as httpx.request keyword arguments."""
    labels = [classes.index(p.parent.name) for p in paths]
    x = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    npz = io.BytesIO()
    np.savez(npz, x=x, y=np.asarray(labels))
    base = f"/v1/models/{model}"
    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]
    return {
        "json predict, MC T=20": dict(
            method="POST", url=f"{base}/predict", params={"mc_samples": 20, "seed": 0, "return_logits": "true"},
            json={"instances": [{"b64": base64.b64encode(p.read_bytes()).decode()} for p in paths]}),
        "multipart predict": dict(method="POST", url=f"{base}/predict", params={"mc_samples": 0}, files=files),
        "evaluate (.npz)": dict(method="POST", url=f"{base}/evaluate", params={"bins": 15, "fit_temperature": "true"},
                                files={"file": ("batch.npz", npz.getvalue(), "application/octet-stream")}),
    }


def predict_latency(client: httpx.Client, model: str, paths: list[Path], repeats: int = 5) -> float:
    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]
    times = []
    for _ in range(repeats + 1):   # the first is a warm-up
        start = time.perf_counter()
        client.post(f"/v1/models/{model}/predict", params={"mc_samples": 100, "seed": 0}, files=files).raise_for_status()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    container = httpx.Client(base_url=argv[0], timeout=300)
    host = httpx.Client(base_url=argv[1], timeout=300)
    paths = fixture_images(N_IMAGES)
    models = container.get("/v1/models").raise_for_status().json()["models"]
    host_models = host.get("/v1/models").raise_for_status().json()["models"]
    if [m["name"] for m in models] != [m["name"] for m in host_models]:
        print(f"models differ: {[m['name'] for m in models]} vs {[m['name'] for m in host_models]}")
        return 1
    print(f"  runtime: container {sorted({m.get('runtime') for m in models})}, "
          f"host {sorted({m.get('runtime') for m in host_models})}")
    worst = 0.0
    for m in models:
        for what, call in requests(m["name"], m["classes"], paths).items():
            a = container.request(**call).raise_for_status().json()
            b = host.request(**call).raise_for_status().json()
            diff = differences(a, b)
            if diff:
                print(f"FAIL {m['name']} {what}: {len(diff)} differences, first {diff[:3]}")
                return 1
            worst = max(worst, max_abs_difference(a, b))
            print(f"  ok {m['name']:<20} {what:<24} max |container - host| {max_abs_difference(a, b):.2e}")
    print(f"  all answers equal within {TOLERANCE:g} (largest difference {worst:.2e})")
    name = models[0]["name"]
    for label, client in (("container", container), ("host", host)):
        print(f"  {label:<9} predict {N_IMAGES} images MC T=100 ({name}): "
              f"{predict_latency(client, name, paths) * 1e3:.0f} ms (median of 5)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
