"""`python -m training.shift`: the CIFAR-10-C benchmark end to end in quick mode, its pieces
(stratified subset, synthetic OOD sets, the --ood-data readers) and its one-line usage errors."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from training.data import DataSourceError
from training.shift.benchmark import stratified_subset
from training.shift.ood_sets import load_ood_images, seeded_subset, shuffled_patches, uniform_noise

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PROG = "python -m training.shift"


def strings(value):
    """Every string in a JSON document."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings(v)
    elif isinstance(value, str):
        yield value


@pytest.fixture
def ood_folder(tmp_path, sample_data_dir) -> Path:
    """A tiny image folder in the <class>/<image> layout (12 fixture JPEGs), for --ood-data."""
    root = tmp_path / "ood-images"
    for name in ("cat", "ship", "frog"):
        (root / name).mkdir(parents=True)
        for src in sorted((sample_data_dir / "train" / name).iterdir())[:4]:
            shutil.copy(src, root / name / src.name)
    return root


# --- end to end -----------------------------------------------------------------------------------

def test_quick_run_writes_a_consistent_report(tmp_path, tiny_artifact, sample_data_dir, ood_folder):
    from training.shift.__main__ import main

    second = shutil.copytree(tiny_artifact, tmp_path / "second")   # same card name: two lines, two names
    out = tmp_path / "report"
    code = main([str(tiny_artifact), str(second), "--quick", "--data", str(sample_data_dir),
                 "--ood-data", str(ood_folder), "--cache-dir", "none", "--output", str(out)])
    assert code == 0
    doc = json.loads((out / "report.json").read_text())

    assert doc["quick"] is True and doc["n_images"] == 50 and doc["n_test_images"] == 300
    assert doc["severities"] == [1, 2, 3, 4, 5] and len(doc["corruptions"]) == 3
    assert doc["mc_samples"] == 10
    assert doc["data"]["checksum"].startswith("sha256:")
    names = [m["name"] for m in doc["models"]]
    assert len(names) == 2 and len(set(names)) == 2
    ood = {s["name"]: s for s in doc["ood_sets"]}
    assert set(ood) == {"uniform_noise", "shuffled_8x8_patches", "ood-images"}
    assert ood["ood-images"]["n"] == 12 and ood["ood-images"]["checksum"].startswith("sha256:")
    # no absolute path of this machine anywhere in the report
    assert not [s for s in strings(doc) if s.startswith("/")]
    assert str(REPO) not in (out / "report.md").read_text()

    for m in doc["models"]:
        sets = [f"{c}/{s}" for c in doc["corruptions"] for s in doc["severities"]]
        assert sorted(m["per_set"]) == sorted(sets)
        for metric, agg in (("accuracy", "cA"), ("nll", "cNLL"), ("brier", "cBrier"), ("ece", "cCE")):
            assert m["aggregates"][agg] == pytest.approx(np.mean([m["per_set"][k][metric] for k in sets]))
            for s in doc["severities"]:
                row = [m["per_set"][f"{c}/{s}"][metric] for c in doc["corruptions"]]
                assert m["per_severity"][str(s)][metric] == pytest.approx(np.mean(row))
        assert 0.0 <= m["clean"]["accuracy"] <= 1.0 and m["clean"]["nll"] > 0
        per_sev = m["ood"]["corruption_per_severity"]
        for score in ("max_probability", "predictive_entropy", "mutual_information"):
            values = [m["ood"]["corruption_per_set"][f"{c}/5"][score]["auroc"] for c in doc["corruptions"]]
            assert per_sev["5"][score]["auroc"] == pytest.approx(np.mean(values))
            for d in m["ood"]["synthetic_and_real"].values():
                assert 0.0 <= d[score]["auroc"] <= 1.0 and 0.0 <= d[score]["fpr_at_95_tpr"] <= 1.0
                assert d[score]["n_in"] == 50
        check = m["ood"]["entropy_auroc_threshold"]
        assert check["auroc"] == per_sev["5"]["predictive_entropy"]["auroc"] and check["threshold"] == 0.85
        assert set(m["reliability"]) == {"clean", "severity_3", "severity_5"}
        assert m["reliability"]["severity_5"]["n"] == 50 * 3          # pooled over the types

    md = (out / "report.md").read_text()
    assert "**N = 50 test images per set**" in md
    assert "entropy AUROC clean vs severity 5" in md and "cifar10-fixture" in md
    for png in doc["pngs"]:
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, png
    assert len(doc["pngs"]) == 3 + 2                                  # 3 summary plots + 1 diagram per model


def test_feature_density_adds_a_mahalanobis_score_fitted_on_training_images(tmp_path, tiny_artifact,
                                                                            sample_data_dir):
    from models.artifact import load_artifact
    from models.calibration import detection
    from models.calibration.feature_density import FeatureGaussian
    from models.inference import SplitClassifier
    from training.data import load_cifar10
    from training.shift.__main__ import main
    from training.shift.benchmark import stratified_subset
    from training.shift.ood_sets import uniform_noise

    out = tmp_path / "report"
    assert main([str(tiny_artifact), "--quick", "--data", str(sample_data_dir), "--cache-dir", "none",
                 "--corruptions", "contrast", "--severities", "5", "--feature-density", "100",
                 "--output", str(out)]) == 0
    doc = json.loads((out / "report.json").read_text())
    assert doc["feature_density"]["n_train"] == 100 and doc["feature_density"]["score"] == "feature_mahalanobis"
    ood = doc["models"][0]["ood"]
    assert set(ood["corruption_per_set"]["contrast/5"]) == {
        "max_probability", "predictive_entropy", "mutual_information", "feature_mahalanobis"}
    md = (out / "report.md").read_text()
    assert "| MC MI | Mahalanobis |" in md and "Mahalanobis score: squared Mahalanobis distance" in md
    assert "ood_auroc.png" in doc["pngs"]

    # the same figure, recomputed here from the training split only
    data = load_cifar10(sample_data_dir)
    classifier = SplitClassifier(load_artifact(tiny_artifact).model)
    train = stratified_subset(data.y_train, 100, seed=0)
    g = FeatureGaussian.fit(classifier.features(data.x_train[train]), data.y_train[train], 10)
    clean = data.x_test[stratified_subset(data.y_test, 50, seed=0)]
    expected = detection("feature_mahalanobis", g.score(classifier.features(clean)),
                         g.score(classifier.features(uniform_noise(50, seed=0))))
    assert ood["synthetic_and_real"]["uniform_noise"]["feature_mahalanobis"]["auroc"] == pytest.approx(
        expected.auroc, abs=1e-6)


# --- pieces ---------------------------------------------------------------------------------------

def test_litert_backbone_gives_the_keras_report(tmp_path, tiny_litert_artifact, sample_data_dir):
    """--backbone-runtime litert only swaps the backbone for its LiteRT export: same metrics and
    the same MC mutual information (the head and its dropout masks stay Keras')."""
    from training.shift.__main__ import main

    docs = {}
    for runtime in ("keras", "litert"):
        out = tmp_path / runtime
        assert main([str(tiny_litert_artifact), "--quick", "--data", str(sample_data_dir), "--cache-dir", "none",
                     "--backbone-runtime", runtime, "--output", str(out)]) == 0
        docs[runtime] = json.loads((out / "report.json").read_text())
    keras_model, litert_model = docs["keras"]["models"][0], docs["litert"]["models"][0]
    assert "--backbone-runtime litert" in docs["litert"]["command"]
    for key in ("cA", "cNLL", "cBrier", "cCE"):
        assert litert_model["aggregates"][key] == pytest.approx(keras_model["aggregates"][key], abs=1e-5)
    for set_name, row in keras_model["per_set"].items():
        assert litert_model["per_set"][set_name]["accuracy"] == row["accuracy"]
        assert litert_model["per_set"][set_name]["ece"] == pytest.approx(row["ece"], abs=1e-5)
    mi_keras = keras_model["ood"]["corruption_per_set"]
    mi_litert = litert_model["ood"]["corruption_per_set"]
    for set_name, scores in mi_keras.items():
        assert mi_litert[set_name]["mutual_information"]["auroc"] == pytest.approx(
            scores["mutual_information"]["auroc"], abs=2e-3)


def test_stratified_subset_keeps_class_shares_and_is_seeded():
    labels = np.repeat(np.arange(10), [100, 100, 100, 100, 100, 100, 100, 100, 100, 103])
    idx = stratified_subset(labels, 200, seed=3)
    assert len(idx) == 200 and len(np.unique(idx)) == 200 and np.all(np.diff(idx) > 0)
    counts = np.bincount(labels[idx], minlength=10)
    assert counts.sum() == 200 and counts.max() - counts.min() <= 1
    assert np.array_equal(idx, stratified_subset(labels, 200, seed=3))
    assert not np.array_equal(idx, stratified_subset(labels, 200, seed=4))
    assert np.array_equal(stratified_subset(labels, len(labels), seed=0), np.arange(len(labels)))
    with pytest.raises(ValueError):
        stratified_subset(labels, len(labels) + 1, seed=0)


def test_uniform_noise_is_seeded_uint8_images():
    x = uniform_noise(64, seed=1)
    assert x.shape == (64, 32, 32, 3) and x.dtype == np.uint8
    assert np.array_equal(x, uniform_noise(64, seed=1)) and not np.array_equal(x, uniform_noise(64, seed=2))
    assert x.min() == 0 and x.max() == 255 and abs(float(x.mean()) - 127.5) < 2


def test_shuffled_patches_permute_whole_patches_within_each_image(sample_data):
    src = sample_data.x_test[:20]
    out = shuffled_patches(src, patch=8, seed=5)
    assert out.shape == src.shape and out.dtype == np.uint8
    assert np.array_equal(out, shuffled_patches(src, patch=8, seed=5))
    assert not np.array_equal(out, shuffled_patches(src, patch=8, seed=6))

    def patches(img):
        return sorted(img[r:r + 8, c:c + 8].tobytes() for r in range(0, 32, 8) for c in range(0, 32, 8))

    moved = 0
    for a, b in zip(src, out):
        assert np.array_equal(np.sort(a, axis=None), np.sort(b, axis=None))   # same pixel multiset
        assert patches(a) == patches(b)                                          # same patches
        moved += not np.array_equal(a, b)
    assert moved >= 19
    with pytest.raises(ValueError):
        shuffled_patches(src, patch=5, seed=0)


def test_ood_data_reads_folders_and_the_official_cifar100_test_file(tmp_path, ood_folder):
    folder = load_ood_images(ood_folder)
    assert folder.images.shape == (12, 32, 32, 3) and folder.checksum.startswith("sha256:")
    assert load_ood_images(ood_folder).checksum == folder.checksum
    assert len(seeded_subset(folder.images, 5, seed=0)) == 5

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (7, 3072), dtype=np.uint8)
    batch = {b"filenames": [b"a.png"] * 7, b"batch_label": b"testing batch 1 of 1",
             b"fine_labels": list(range(7)), b"coarse_labels": [0] * 7, b"data": x}
    (tmp_path / "cifar-100-python").mkdir()
    test_file = tmp_path / "cifar-100-python" / "test"
    test_file.write_bytes(pickle.dumps(batch, protocol=2))
    for source in (test_file, tmp_path / "cifar-100-python", tmp_path):
        got = load_ood_images(source)
        assert got.name == "cifar100" and got.checksum.startswith("sha256:")
        assert np.array_equal(got.images, x.reshape(7, 3, 32, 32).transpose(0, 2, 3, 1))


def test_ood_data_refuses_a_pickle_that_is_not_plain_arrays(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    evil = tmp_path / "test"
    evil.write_bytes(pickle.dumps({b"data": Evil(), b"fine_labels": []}))
    with pytest.raises(DataSourceError, match="not allowed"):
        load_ood_images(evil)


# --- usage errors: one line on stderr, exit 2, before TensorFlow -----------------------------------

def run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "training.shift", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, fragment", [
    (["--n-images", "5"], "--n-images must be at least 10"),
    (["--corruptions", "gaussian_noise,rain"], "unknown type(s) rain"),
    (["--severities", "0,6"], "--severities must be distinct values"),
    (["--severities", "x"], "comma-separated integers"),
    (["--mc-samples", "1"], "--mc-samples must be at least 2"),
    (["--feature-density", "5"], "--feature-density needs at least 20 training images"),
])
def test_bad_arguments_exit_2_with_one_line(args, fragment, tmp_path):
    out = run(tmp_path / "whatever", *args)
    lines = out.stderr.splitlines()
    assert out.returncode == 2, out.stderr
    assert len(lines) == 1 and lines[0].startswith(f"{PROG}: error: ") and fragment in lines[0], out.stderr


def test_missing_artifact_and_too_many_images_are_one_line_errors(tmp_path, tiny_artifact, sample_data_dir):
    out = run(tmp_path / "missing", "--quick")
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "not an artifact folder" in out.stderr
    out = run(tiny_artifact, "--quick", "--n-images", "400", "--output", tmp_path / "r")
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "--n-images 400 is more than the 300 test images" in out.stderr
    out = run(tiny_artifact, "--quick", "--feature-density", "400", "--output", tmp_path / "r")
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "--feature-density 400 is more than the 300 training images" in out.stderr


def test_a_stopped_run_resumes_per_set_with_the_same_report(tmp_path, tiny_artifact, sample_data_dir, monkeypatch,
                                                             capsys):
    """Killed after its fourth corrupted set, the same command re-run reads the five finished sets
    (clean + 4) from <output>/.checkpoint, corrupts and runs only the rest, and writes the report an
    uninterrupted run writes; the checkpoint is gone afterwards. Other settings are refused."""
    from training.shift import benchmark
    from training.shift.__main__ import main

    common = [str(tiny_artifact), "--quick", "--data", str(sample_data_dir), "--cache-dir", "none",
              "--corruptions", "gaussian_noise,fog", "--severities", "1,3,5"]
    straight = tmp_path / "straight"
    assert main([*common, "--output", str(straight)]) == 0
    out = tmp_path / "resumed"

    class Killed(Exception):
        pass

    real_run = benchmark.ModelRunner.run
    calls = {"n": 0}

    def dying_run(self, images):
        calls["n"] += 1
        if calls["n"] == 6:           # clean, then 4 corrupted sets finish; the 5th dies mid-set
            raise Killed
        return real_run(self, images)

    monkeypatch.setattr(benchmark.ModelRunner, "run", dying_run)
    with pytest.raises(Killed):
        main([*common, "--output", str(out)])
    assert len(list((out / ".checkpoint").glob("*.npz"))) == 5
    assert main([*common, "--output", str(out), "--seed", "1"]) == 2   # another seed: refused, checkpoint kept
    assert "other settings" in capsys.readouterr().err
    assert len(list((out / ".checkpoint").glob("*.npz"))) == 5

    calls["n"] = -10**6                              # no more deaths; count what runs
    from training.shift import datasets

    built = []
    original = datasets.corrupted_set
    monkeypatch.setattr(datasets, "corrupted_set", lambda *a, **k: built.append(a[1:3]) or original(*a, **k))
    assert main([*common, "--output", str(out)]) == 0
    assert calls["n"] == -10**6 + 2 + 2              # the last 2 corrupted sets, then the 2 synthetic OOD sets
    assert built == [("fog", 3), ("fog", 5)]
    assert "resuming: 5 set(s)" in capsys.readouterr().err
    assert not (out / ".checkpoint").exists()

    a, b = (json.loads((d / "report.json").read_text()) for d in (straight, out))
    assert a["models"] == b["models"]
    assert b["throughput"]["sets_read_from_an_earlier_run"] == 5
