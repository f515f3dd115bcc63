"""`python -m benchmarks.recalibration_under_shift --quick` end to end on the tiny artifact: a real
server, a profile fitted over HTTP per corrupted set, both evaluations, and a report whose summary
follows from its rows; usage errors exit 2 before anything slow."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from benchmarks.recalibration_under_shift import main, split_fit_eval

pytestmark = pytest.mark.server  # starts `python -m service`


def test_quick_run_writes_a_consistent_report(tiny_artifact, tmp_path, capsys):
    models = tmp_path / "models"
    shutil.copytree(tiny_artifact, models / "tiny")
    out = tmp_path / "report"
    assert main(["--quick", "--model", "tiny", "--model-dir", str(models), "--runtime", "keras",
                 "--corruptions", "gaussian_noise,contrast", "--fit-images", "60", "--resamples", "5",
                 "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    doc = json.loads((out / "report.json").read_text())
    assert [r["set"] for r in doc["sets"]] == ["gaussian_noise-s5", "contrast-s5"]
    for row in doc["sets"]:
        assert row["n_fit"] == 60 and row["n_eval"] == 300 - 60
        assert row["profile"]["method"] == "temperature" and row["profile"]["conformal_n"] == 60
        for side in ("card", "profile_eval"):
            assert 0 <= row[side]["ece_15"] <= 1 and row[side]["nll"] > 0
            assert 0 <= row[side]["conformal"]["coverage"] <= 1 and row[side]["conformal"]["method"] == "lac"
        assert row["card"]["accuracy"] == pytest.approx(row["profile_eval"]["accuracy"], abs=0.02)
        # the card's sets come from the artifact's validation scores, the profile's from its 60 images
        assert row["card"]["conformal"]["calibration_n"] > 0 and row["profile_eval"]["conformal"]["calibration_n"] == 60
        # the offline re-fit on the served logits is the service's own fit: the same figures as over HTTP
        offline = row["offline"]["methods_on_this_draw"]["temperature"]
        assert offline["ece_15"] == pytest.approx(row["profile_eval"]["ece_15"], abs=1e-4)
        assert offline["coverage"] == pytest.approx(row["profile_eval"]["conformal"]["coverage"], abs=1e-9)
        methods = row["offline"]["methods_on_this_draw"]
        assert set(methods) == {"temperature", "vector", "dirichlet", "auto"}
        assert "needs at least" in methods["dirichlet"]["skipped"]     # 60 images are too few for it
        draws = row["offline"]["coverage_over_draws"]
        assert draws["draws"] == 5 and draws["p05"] <= draws["mean"] <= draws["p95"]
    # each set draws its own fit sample
    assert doc["sets"][0]["fit_seed"] != doc["sets"][1]["fit_seed"]
    s5 = doc["summary"]["per_severity"]["5"]
    assert s5["coverage_over_draws"]["draws_per_set"] == 5
    assert s5["mean_ece_15"]["profile"] == pytest.approx(np.mean([r["profile_eval"]["ece_15"] for r in doc["sets"]]))
    assert s5["coverage_min_max"]["card"] == [min(r["card"]["conformal"]["coverage"] for r in doc["sets"]),
                                              max(r["card"]["conformal"]["coverage"] for r in doc["sets"])]
    assert doc["plots"] == ["severity-5.png"] and (out / "severity-5.png").stat().st_size > 1000
    assert doc["command"].startswith("python -m benchmarks.recalibration_under_shift --quick")
    assert "gaussian_noise-s5" in (out / "report.md").read_text()
    assert "severity 5: mean ECE-15 card" in printed and "targets met" in printed


def test_fit_and_evaluation_images_are_disjoint_stratified_and_seeded():
    labels = np.repeat(np.arange(10), 100)
    fit, rest = split_fit_eval(labels, 100, seed=0)
    assert len(fit) == 100 and len(rest) == 900 and not set(fit) & set(rest)
    assert np.bincount(labels[fit]).tolist() == [10] * 10
    again, _ = split_fit_eval(labels, 100, seed=0)
    assert np.array_equal(fit, again)


@pytest.mark.parametrize("argv, message", [
    (["--quick", "--corruptions", "fog,nope"], "unknown corruption"),
    (["--quick", "--severities", "6"], "--severities must be in 1..5"),
    (["--quick", "--coverage", "1.5"], "--coverage must be in (0, 1)"),
    (["--quick", "--fit-images", "1"], "--fit-images must be at least 2"),
    (["--quick", "--resamples", "-1"], "--resamples must be >= 0"),
])
def test_usage_errors_exit_2(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err
