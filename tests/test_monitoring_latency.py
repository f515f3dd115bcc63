"""`python -m benchmarks.monitoring_latency --quick`: two real servers (monitoring on and off) on the
tiny artifact answer alternating predicts; the report names both latencies and their ratio, and the
monitored server recorded every image."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.server


def test_quick_latency_run(tiny_artifact, tmp_path, capsys):
    from benchmarks.monitoring_latency import main

    assert main(["--quick", "--model-dir", str(tiny_artifact), "--runtime", "keras", "--batches", "1,4",
                 "--requests", "3", "--warmup", "1", "--output", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "report.json").read_text())
    assert set(doc["results"]) == {"1", "4"}
    for r in doc["results"].values():
        assert r["on"]["median_ms"] > 0 and r["off"]["median_ms"] > 0
        assert r["ratio_median"] == pytest.approx(r["on"]["median_ms"] / r["off"]["median_ms"])
    assert doc["recorded"] == (1 + 3) * 1 + (1 + 3) * 4   # warm-up and measured requests, every image
    assert "target met:" in capsys.readouterr().out
