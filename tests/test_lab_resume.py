"""Every lab section that trains over epochs resumes (training.lab.resume): stopped right after an
epoch's checkpoint, in the middle of its second training loop, the same command re-run restores
that epoch, trains the rest and writes the figures of an uninterrupted run (to float32 rounding:
a model restored from its checkpoint can evaluate ~1e-8 apart from the one that trained). A checkpoint of
other settings is refused. (Section 4, `mixing`: tests/test_resume.py.)"""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.lab, pytest.mark.training]

# section -> how many epoch checkpoints are written before the stop (2 epochs per loop)
STOP_AFTER = {"weight-decay": 3, "batchnorm": 3, "smoothing": 3, "dropout": 1}


class Stopped(Exception):
    pass


def _figures(out, section) -> dict:
    figures = json.loads((out / section / "report.json").read_text())["figures"]

    def strip(value):      # wall-clock seconds differ between runs; nothing else may
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k != "seconds"}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return strip(figures)


def _run(section, out, *extra):
    from training.lab.__main__ import parse_args, run_section

    args = parse_args([section, "--quick", "--epochs", "2", "--out", str(out), *extra])
    return run_section(section, args, f"python -m training.lab {section}")


@pytest.mark.parametrize("section", sorted(STOP_AFTER))
def test_a_stopped_section_resumes_with_the_same_figures(section, tmp_path, monkeypatch, capsys):
    from commandline import UsageError
    from training.lab import resume

    _run(section, tmp_path / "straight")
    real_write = resume.write_checkpoint
    written = []

    def write_then_stop(*args, **kwargs):
        path = real_write(*args, **kwargs)
        written.append(path)
        if len(written) == STOP_AFTER[section]:
            raise Stopped
        return path

    monkeypatch.setattr(resume, "write_checkpoint", write_then_stop)
    out = tmp_path / "resumed"
    with pytest.raises(Stopped):
        _run(section, out)
    monkeypatch.setattr(resume, "write_checkpoint", real_write)
    checkpoints = out / section / ".checkpoint"
    assert len([p for p in checkpoints.iterdir() if p.is_dir()]) == (STOP_AFTER[section] + 1) // 2
    with pytest.raises(UsageError, match="other settings"):   # another seed, same folder
        _run(section, out, "--seed", "1")
    capsys.readouterr()

    _run(section, out)
    log = capsys.readouterr().out
    assert "resuming from epoch 1" in log
    assert not checkpoints.exists()                            # removed with the report written
    # equal, but for float32 rounding in a few evaluations of a restored model (smoothing: ~1e-8)
    assert _differences(_figures(out, section), _figures(tmp_path / "straight", section)) == []


def _differences(a, b, path="") -> list:
    """Where two figure trees differ: structure, strings and integers exactly, floats beyond
    float32 rounding (relative 1e-5)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [(path, sorted(set(a) ^ set(b)))]
        return [d for k in a for d in _differences(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [(path, len(a), len(b))]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{path}[{i}]")]
    if isinstance(a, float) and isinstance(b, float):
        return [] if a == pytest.approx(b, rel=1e-5, abs=1e-7) else [(path, a, b)]
    return [] if a == b else [(path, a, b)]
