"""`python -m benchmarks.drift_replay --quick`: the whole loop against a real server on the tiny
artifact and the repository's fixture (clean, then severity 3 and 5 of three corruptions), with
feedback, monitoring after every batch, and the report, plot and targets it writes."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.server


def test_quick_replay_writes_its_report(tiny_artifact, tmp_path, capsys):
    from benchmarks.drift_replay import main

    out = tmp_path / "replay"
    assert main(["--quick", "--model-dir", str(tiny_artifact), "--runtime", "keras", "--output", str(out),
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    doc = json.loads((out / "report.json").read_text())
    assert (out / "drift_replay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "# Drift replay" in (out / "report.md").read_text()
    assert [p["phase"] for p in doc["phases"]] == ["clean", "severity 3", "severity 5"]
    assert [p["predictions"] for p in doc["phases"]] == [300, 300, 300]
    records = doc["records"]
    assert len(records) == 18 and records[-1]["served"] == 900            # one answer per batch of 50
    assert all(0 < r["estimated_accuracy"] <= 1 for r in records if r["estimated_accuracy"] is not None)
    # feedback came back: about 30% of each window is labelled
    full = [r for r in records if r["window_predictions"] == 150 and r["calibration"] is None]
    assert full and all(20 <= r["labelled"] <= 75 for r in full)
    assert doc["events"]["phase_starts"] == {"clean": 0, "severity 3": 300, "severity 5": 600}
    summary = doc["summary"]
    assert set(summary["met"]) >= {"drift_within_500", "clean_false_alarms", "estimate_gap_clean",
                                   "estimate_gap_severity_3"}
    if doc["events"]["profile"] is not None:   # the alert fired under shift: the rest is served with the profile
        profile = doc["events"]["profile"]
        after = [r for r in records if r["served"] > profile["served"]]
        assert after and all(r["calibration"] == profile["id"] for r in after)
    printed = capsys.readouterr().out
    assert "targets met:" in printed and "drift after the switch to severity 3" in printed
