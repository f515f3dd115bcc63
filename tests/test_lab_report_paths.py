"""Lab reports are committed and read elsewhere: they record paths as typed, never this machine's layout.

Also the weight-decay report's parity sentence, which must say what its two numbers say.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from training.lab.context import QUICK_SAMPLE, LabContext
from training.lab.report import Report, portable_command, portable_path
from training.lab.weight_penalties import regularizer_vs_manual_sentence

# A path token that starts at the root: "/x..." not preceded by a path or word character.
ABSOLUTE = re.compile(r"(^|[^.\w/~$-])/[\w.-]")


def _absolute_paths(text: str) -> list[str]:
    return [text[max(0, m.start() - 20):m.end() + 40] for m in ABSOLUTE.finditer(text)]


def test_relative_data_path_gives_a_report_without_absolute_paths(tmp_path, monkeypatch, sample_archive):
    pytest.importorskip("tensorflow")   # Report.write records the TensorFlow/Keras versions
    monkeypatch.delenv("CIFAR10_DIR", raising=False)
    monkeypatch.chdir(sample_archive.parent)
    typed = sample_archive.name                   # the user typed a relative path
    argv = ["weight-decay", "--data", typed, "--out", str(tmp_path)]
    ctx = LabContext(data=typed)
    report = Report("weight-decay", tmp_path / "weight-decay", command=portable_command(argv),
                    seed=0, quick=False, arguments=ctx.picked)
    data = ctx.cifar(report, train_full=20, test_full=10)
    assert len(data.x_train) == 20 and len(data.x_test) == 10
    out = report.write()

    md = (out / "report.md").read_text()
    doc = json.loads((out / "report.json").read_text())
    assert doc["arguments"]["data"] == typed
    assert doc["data"]["source"].endswith(f" {typed}") and typed in md
    assert doc["data"]["checksum"].startswith("sha256:")
    # --out was typed absolute (a temporary folder): the command shows it relative to the cwd
    assert doc["command"].startswith(f"python -m training.lab weight-decay --data {typed} --out ")
    assert doc["command"] in md
    raw = (out / "report.json").read_text()
    for text in (md, raw):
        assert not _absolute_paths(text), _absolute_paths(text)


def test_quick_default_sample_is_recorded_relative_to_the_cwd(tmp_path, monkeypatch):
    monkeypatch.delenv("CIFAR10_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    ctx = LabContext(quick=True)
    assert os.path.isabs(ctx.data_source)          # the code resolved it ...
    shown = portable_path(ctx.data_source)         # ... so the report must not show it so
    assert not os.path.isabs(shown)
    assert (tmp_path / shown).resolve() == QUICK_SAMPLE.resolve()


def test_paths_under_cifar10_dir_are_written_as_the_variable(tmp_path, monkeypatch):
    root = tmp_path / "cifar10-jpeg"
    monkeypatch.setenv("CIFAR10_DIR", str(root) + "/")     # a trailing slash changes nothing
    monkeypatch.chdir(tmp_path)
    assert portable_path(str(root)) == "$CIFAR10_DIR"
    assert portable_path(str(root / "train")) == "$CIFAR10_DIR/train"
    assert portable_path(str(tmp_path / "cifar10-jpeg-other")) == "cifar10-jpeg-other"  # not a prefix match
    assert portable_path("data/x") == "data/x"             # relative: as typed
    command = portable_command(["mixing", "--data", str(root), "--epochs", "30",
                                f"--artifact={root / 'a b'}", "--out", str(tmp_path / "out")])
    assert command == ("python -m training.lab mixing --data $CIFAR10_DIR --epochs 30 "
                       "--artifact=$CIFAR10_DIR'/a b' --out out")
    assert portable_command(["all", "--quick"]) == "python -m training.lab all --quick"


def test_the_ood_set_under_cifar100_dir_is_written_as_its_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("CIFAR10_DIR", str(tmp_path / "cifar10"))
    monkeypatch.setenv("CIFAR100_DIR", str(tmp_path / "cifar100"))
    monkeypatch.chdir(tmp_path / "..")
    assert portable_path(str(tmp_path / "cifar100" / "apple")) == "$CIFAR100_DIR/apple"
    command = portable_command(["m", "--data", str(tmp_path / "cifar10"), "--ood-data", str(tmp_path / "cifar100")],
                               "python -m training.shift")
    assert command == "python -m training.shift m --data $CIFAR10_DIR --ood-data $CIFAR100_DIR"


def test_identical_penalty_results_are_called_identical():
    sentence = regularizer_vs_manual_sentence(0.0, 0.0)
    assert "bit-identical weights" in sentence and "identical first-batch gradients" in sentence
    assert "0.00e+00" not in sentence and "rounding" not in sentence


def test_different_penalty_results_give_the_figure_and_the_reason():
    sentence = regularizer_vs_manual_sentence(3.1e-9, 2.5e-6)
    assert "at most 3.10e-09" in sentence and "at most 2.50e-06" in sentence
    assert "rounding" in sentence and "identical" not in sentence
    only_gradients = regularizer_vs_manual_sentence(3.1e-9, 0.0)
    assert "at most 3.10e-09" in only_gradients and "weights are bit-identical" in only_gradients
    assert "amplified" not in only_gradients
