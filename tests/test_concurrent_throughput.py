"""`python -m benchmarks.concurrent_throughput` end to end on the tiny artifact: a real server per
runtime, a handful of clients; the figures it prints are there and consistent."""

from __future__ import annotations

import re
import shutil

import pytest


@pytest.mark.slow
@pytest.mark.parametrize("runtime,generator", [("keras", "httpx"), ("litert", "wrk")])
def test_benchmark_prints_capacity_ratio_profile_and_cpu(runtime, generator, tiny_litert_artifact, tmp_path, capsys):
    from benchmarks import wrk
    from benchmarks.concurrent_throughput import main

    if generator == "wrk" and not wrk.available():
        pytest.skip("wrk is not installed (apt-get install wrk)")
    model_dir = tmp_path / "models"
    shutil.copytree(tiny_litert_artifact, model_dir / "tiny")
    assert main(["--model-dir", str(model_dir), "--runtime", runtime, "--clients", "4", "--requests", "12",
                 "--sequential", "3", "--duration", "2", "--sequential-duration", "1", "--generator", generator,
                 "--repeats", "1", "--mc-samples", "10"]) == 0
    out = capsys.readouterr().out

    timing = re.search(rf"runtime {runtime}: deterministic ([\d.]+) ms, MC T=10 ([\d.]+) ms \(([\d.]+)x\)", out)
    assert timing, out
    plain, mc, ratio = map(float, timing.groups())
    # the times are printed to 0.1 ms: on the tiny model (~5 ms) that rounding moves their ratio by ~2 %
    assert plain > 0 and mc > 0 and ratio == pytest.approx(mc / plain, rel=0.03, abs=0.01)
    capacity = float(re.search(rf"batch of 64, runtime {runtime}: ([\d.]+) images/s", out).group(1))
    row = re.search(r"default\s+([\d.]+) req/s\s+([\d.]+)x\s+p50\s+(\d+) ms\s+p99\s+(\d+) ms", out)
    assert row, out
    req_s, share, p50, p99 = float(row[1]), float(row[2]), int(row[3]), int(row[4])
    assert capacity > 0 and req_s > 0 and share == pytest.approx(req_s / capacity, abs=0.01)
    assert p50 <= p99
    assert "load generator" in out and "batch_queue" in out and "backbone" in out
    one = re.search(r"one client: p50\s+([\d.]+) ms, ([\d.]+) req/s.*CPU server ([\d.]+) cores, load generator "
                    r"([\d.]+) cores", out)
    assert one, out
    assert float(one[1]) > 0 and float(one[2]) > 0 and float(one[3]) > 0 and float(one[4]) >= 0
    assert f"load generator: {'wrk' if generator == 'wrk' else 'this process (httpx)'}" in out
