"""`python -m training.shift.combine`: reports of separate runs of one benchmark become one report
(one line per model in the plots), and runs of different benchmarks are refused."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.subprocess

REPO = Path(__file__).resolve().parents[1]
PROG = "python -m training.shift.combine"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory, tiny_artifact, sample_data_dir) -> Path:
    """A real quick-mode run of the tiny artifact."""
    from training.shift.__main__ import main

    out = tmp_path_factory.mktemp("shift") / "tiny"
    assert main([str(tiny_artifact), "--quick", "--data", str(sample_data_dir), "--cache-dir", "none",
                 "--output", str(out)]) == 0
    return out


def renamed_copy(report: Path, dest: Path, name: str, edit=None) -> Path:
    """The same run under another model name (what a second model's run looks like to combine),
    optionally with the document edited."""
    shutil.copytree(report, dest)
    doc = json.loads((dest / "report.json").read_text())
    old = doc["models"][0]["name"]
    doc["models"][0]["name"] = doc["artifacts"][0]["name"] = name
    doc["pngs"] = [p.replace(old, name) for p in doc["pngs"]]
    (dest / f"reliability_{old}.png").rename(dest / f"reliability_{name}.png")
    if edit:
        edit(doc)
    (dest / "report.json").write_text(json.dumps(doc))
    return dest


def run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "training.shift.combine", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_two_runs_become_one_report_with_a_line_per_model(tmp_path, quick_report):
    from training.shift.combine import main

    base = tmp_path / "reports"
    first = shutil.copytree(quick_report, base / "first")
    second = renamed_copy(quick_report, base / "second", "other-model")
    assert main([str(first), str(second), "--output", str(base)]) == 0

    doc = json.loads((base / "report.json").read_text())
    sources = [json.loads((f / "report.json").read_text()) for f in (first, second)]
    assert [m["name"] for m in doc["models"]] == [sources[0]["models"][0]["name"], "other-model"]
    assert doc["models"] == [s["models"][0] for s in sources]          # numbers copied, not recomputed
    assert [a["name"] for a in doc["artifacts"]] == [m["name"] for m in doc["models"]]
    for key in ("n_images", "corruptions", "severities", "seed", "mc_samples", "data", "ood_sets"):
        assert doc[key] == sources[0][key]
    assert [s["report"] for s in doc["sources"]] == ["first", "second"]
    assert [s["command"] for s in doc["sources"]] == [s["command"] for s in sources]
    assert doc["command"].startswith(PROG) and not [t for t in doc["command"].split() if t.startswith("/")]

    for png in doc["pngs"]:
        assert (base / png).read_bytes()[:8] == PNG, png
    assert doc["pngs"][3:] == [f"first/{sources[0]['pngs'][3]}", "second/reliability_other-model.png"]
    md = (base / "report.md").read_text()
    assert "[first](first/report.md)" in md and "[second](second/report.md)" in md
    for m in doc["models"]:
        assert f"| {m['name']} | clean |" in md and f"**{m['name']}: entropy AUROC" in md
    assert not re.search(r"(?<![.\w])" + re.escape(str(tmp_path)), md)     # only relative paths


@pytest.mark.parametrize("edit, fragment", [
    (lambda d: d.update(seed=1), "seed differ"),
    (lambda d: d.update(severities=[1, 2]), "severities differ"),
    (lambda d: d["data"].update(checksum="sha256:0"), "data checksum differ"),
    (lambda d: d["ood_sets"].pop(), "OOD sets differ"),
])
def test_runs_of_different_benchmarks_are_refused(tmp_path, quick_report, edit, fragment):
    other = renamed_copy(quick_report, tmp_path / "other", "other-model", edit)
    out = run(quick_report, other, "--output", tmp_path / "combined")
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith(f"{PROG}: error: {other} is not the same benchmark") and fragment in out.stderr
    assert not (tmp_path / "combined" / "report.json").exists()


def test_bad_inputs_are_one_line_errors(tmp_path, quick_report):
    out = run(quick_report, quick_report, "--output", tmp_path / "c")
    assert out.returncode == 2 and "appear in more than one report" in out.stderr, out.stderr
    out = run(quick_report, "--output", tmp_path / "c")
    assert out.returncode == 2 and "at least two REPORT_DIRs" in out.stderr
    out = run(quick_report, tmp_path, "--output", tmp_path / "c")
    assert out.returncode == 1 and "no report.json" in out.stderr and out.stderr.count("\n") == 1
    (tmp_path / "report.json").write_text("{not json")
    out = run(quick_report, tmp_path, "--output", tmp_path / "c")
    assert out.returncode == 1 and "not JSON" in out.stderr and out.stderr.count("\n") == 1

    combined = tmp_path / "combined"           # a combined report is not a run: no nesting
    from training.shift.combine import main
    assert main([str(quick_report), str(renamed_copy(quick_report, tmp_path / "b", "b")), "--output",
                 str(combined)]) == 0
    out = run(combined, quick_report, "--output", tmp_path / "c")
    assert out.returncode == 1 and "not the report of one training.shift run" in out.stderr
