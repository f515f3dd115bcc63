"""Every lab section's `--quick` run completes into tmp_path and writes a complete report."""

from __future__ import annotations

import json
import math

import pytest

pytestmark = pytest.mark.lab

pytest.importorskip("tensorflow")


def _numbers(value, where="figures"):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _numbers(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _numbers(v, f"{where}[{i}]")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield where, value


def _run(section, tmp_path, *extra):
    from training.lab.__main__ import main

    assert main([section, "--quick", "--out", str(tmp_path), *extra]) == 0
    out = tmp_path / section
    report = json.loads((out / "report.json").read_text())
    assert report["section"] == section and report["quick"] is True
    assert report["command"].startswith(f"python -m training.lab {section} --quick")
    assert report["seed"] == 0 and report["wall_seconds"] > 0
    assert {"tensorflow", "keras", "numpy", "python"} <= set(report["versions"])
    numbers = list(_numbers(report["figures"]))
    assert numbers, "no figures"
    bad = [(w, v) for w, v in numbers if not math.isfinite(v)]
    assert not bad, bad
    md = (out / "report.md").read_text()
    assert report["command"] in md and "wall time" in md and "seed: 0" in md
    pngs = sorted(out.glob("*.png"))
    assert pngs and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert sorted(p.name for p in pngs) == sorted(report["pngs"])
    return report


def _cifar_provenance(report):
    assert report["data"]["source"] and report["data"]["checksum"].startswith("sha256:")
    assert report["data"]["used"]["train"] > 0 and report["data"]["used"]["test"] > 0


def test_weight_decay_quick(tmp_path, sample_archive):
    r = _run("weight-decay", tmp_path, "--data", str(sample_archive))
    _cifar_provenance(r)
    f = r["figures"]
    assert set(f["variants"]) == {"none", "l2_fit", "manual_tape", "adamw"}
    epochs = f["settings"]["epochs"]
    for v in f["variants"].values():
        assert len(v["curve"]["test_accuracy"]) == epochs
        assert 0.0 <= v["final_test_accuracy"] <= 1.0 and v["final_kernel_norm"] > 0
    assert f["regularizer_vs_manual"]["first_batch_max_gradient_difference"] < 1e-5
    # the penalties shrink the weights relative to no penalty
    assert f["variants"]["l2_fit"]["final_kernel_norm"] < f["variants"]["none"]["final_kernel_norm"]


def test_dropout_quick(tmp_path, sample_archive, tiny_artifact):
    r = _run("dropout", tmp_path, "--data", str(sample_archive), "--artifact", str(tiny_artifact))
    _cifar_provenance(r)
    f = r["figures"]
    u = f["mc_dropout_uncertainty"]
    assert set(u) == {"clean", "gaussian_noise_s25", "gaussian_noise_s50", "blur_sigma1.5",
                      "random_noise_images"}
    for stats in u.values():
        assert stats["mean_mutual_information"] >= 0 and 0 < stats["mean_top_probability"] <= 1
    trained = f["mc_dropout_uncertainty_trained_artifact"]
    assert trained["artifact"] == str(tiny_artifact) and set(trained["sets"]) == set(u)
    report_md = (tmp_path / "dropout" / "report.md").read_text()
    assert "trained artifact" in report_md and "still drops" not in report_md
    curve = f["training_curve"]
    assert len(curve["test_accuracy_one_mc_sample"]) == len(curve["test_accuracy"]) >= 1
    comp = f["training_true_batch_composition"]
    assert 0 <= comp["alone_vs_clean_batch_argmax_agreement"] <= 1
    drift = f["training_true_moving_stat_updates"]
    assert drift["after_100_calls_on_random_noise_images"]["max_relative_change_of_moving_stats"] > 0
    assert drift["clean_test_accuracy_after_restoring_stats"] == drift["clean_test_accuracy_before"]


def test_batchnorm_quick(tmp_path, sample_archive):
    r = _run("batchnorm", tmp_path, "--data", str(sample_archive))
    _cifar_provenance(r)
    f = r["figures"]
    assert all(v < 1e-4 for v in f["layer_parity_vs_keras"].values())
    assert f["keras_default_training_flag_is_inference"] is True
    assert len(f["curves"]) == 2
    bug = f["bug_training_in_inference_mode"]
    assert bug["running_stats_max_distance_from_initial_0_and_1"] == 0.0
    assert "training_mode_single_images" in f["bug_evaluating_in_training_mode"]


def test_mixing_quick(tmp_path, sample_archive):
    r = _run("mixing", tmp_path, "--data", str(sample_archive))
    _cifar_provenance(r)
    f = r["figures"]
    assert set(f["accuracy"]) == {"baseline", "flips_crops", "flips_crops_mixup", "flips_crops_cutmix"}
    for v in f["accuracy"].values():
        assert len(v["test_accuracy"]) == f["settings"]["epochs"]
    s = f["label_statistics"]
    assert s["ours_CutMix"]["lambda_is_per_batch"] and not s["keras_CutMix"]["lambda_is_per_batch"]
    assert s["ours_CutMix"]["label_weight_vs_pasted_pixel_fraction_max_abs_difference"] < 1e-6
    assert not (tmp_path / "mixing" / ".checkpoint").exists()   # removed once the report is written


def test_mixing_quick_on_the_airbench_backbone_with_a_temperature(tmp_path, sample_archive):
    """The full-scale protocol's options on the fixture: the shipped backbone's shape, a held-out
    validation split, and ECE before and after a temperature fitted on it, per condition."""
    r = _run("mixing", tmp_path, "--data", str(sample_archive), "--arch", "airbench",
             "--group-widths", "8,16,16", "--validation-size", "100", "--batch-size", "64")
    assert r["data"]["used"]["validation"] == 100
    assert r["data"]["used"]["train"] + 100 == r["data"]["available"]["train"]
    settings = r["figures"]["settings"]
    assert (settings["arch"], settings["group_widths"], settings["batch_size_used"]) == ("airbench", [8, 16, 16], 64)
    assert settings["whiten_eps"] == 0.05          # the shipped models' stem, not airbench's 5e-4
    for name, result in r["figures"]["accuracy"].items():
        c = result["calibration"]
        assert 0.05 <= c["temperature"] <= 20, name
        for key in ("test_ece15_before_temperature", "test_ece15_after_temperature", "validation_accuracy"):
            assert 0 <= c[key] <= 1, (name, key)
        assert c["test_nll_before_temperature"] > 0 and c["test_nll_after_temperature"] > 0
    md = (tmp_path / "mixing" / "report.md").read_text()
    assert "The airbench backbone (groups 8, 16, 16)" in md and "| ECE-15 after T |" in md


def test_seeds_table_averages_two_section_4_runs(tmp_path, sample_archive):
    from training.lab.seeds import main as seeds_main

    runs = []
    for seed in (0, 1):
        out = tmp_path / f"seed{seed}"
        r = _run_seeded("mixing", out, seed, "--data", str(sample_archive), "--validation-size", "100")
        runs.append(r)
    table = tmp_path / "combined" / "seeds.md"
    assert seeds_main([str(tmp_path / "seed0"), str(tmp_path / "seed1"), "--out", str(table)]) == 0
    text = table.read_text()
    assert "seeds 0, 1" in text and "| ECE-15 after T |" in text
    acc = [r["figures"]["accuracy"]["flips_crops_mixup"]["final_test_accuracy"] * 100 for r in runs]
    row = next(line for line in text.splitlines() if line.startswith("| flips_crops_mixup |"))
    assert row.split("|")[2].strip() == f"{sum(acc) / 2:.2f}% ± {abs(acc[0] - acc[1]) / 2:.2f}"
    assert table.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the same seed twice, or different settings, are refused
    assert seeds_main([str(tmp_path / "seed0"), str(tmp_path / "seed0"), "--out", str(table)]) == 2


def _run_seeded(section, out, seed, *extra):
    from training.lab.__main__ import main

    assert main([section, "--quick", "--out", str(out), "--seed", str(seed), *extra]) == 0
    return json.loads((out / section / "report.json").read_text())


@pytest.mark.parametrize("widths", ["8,16", "8,x,16", "8,0,16"])
def test_mixing_refuses_bad_group_widths(widths, capsys):
    from training.lab.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["mixing", "--quick", "--arch", "airbench", "--group-widths", widths])
    assert exc.value.code == 2 and "--group-widths" in capsys.readouterr().err


def test_smoothing_quick(tmp_path, sample_archive):
    r = _run("smoothing", tmp_path, "--data", str(sample_archive))
    _cifar_provenance(r)
    f = r["figures"]
    assert abs(f["settings"]["gap_bound"] - math.log((1 - 0.1 + 0.01) / 0.01)) < 1e-9
    assert set(f["models"]) == {"no_smoothing", "smoothing_0.1"}
    for m in f["models"].values():
        assert m["temperature"] > 0
        assert m["wrapper_matches_logits_over_T_max_abs_diff"] < 1e-4
        assert m["test_before"]["accuracy"] == m["test_after"]["accuracy"]
        assert len(m["history"]["median_gap"]) == f["settings"]["epochs"]
    assert len([p for p in r["pngs"] if p.startswith("reliability_")]) == 2


def test_spectral_clipping_quick(tmp_path):
    r = _run("spectral-clipping", tmp_path)
    f = r["figures"]
    sv = f["spectral_normalization"]["spectral_norm"]["singular_values"]
    assert len(sv) == 3 and f["spectral_norm_all_layers_within_tolerance"] is True
    assert all(v["sigma_max_after_training_mode_call"] <= 1.05 for v in sv.values())
    clip = f["gradient_clipping"]
    assert set(clip) == {"none", "clipnorm (per tensor)", "global_clipnorm", "clipvalue"}
    assert clip["global_clipnorm"]["cosine_raw_vs_applied"]["min"] > 1 - 1e-4
    assert clip["none"]["cosine_raw_vs_applied"]["min"] > 1 - 1e-4
