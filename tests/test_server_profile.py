"""`python -m benchmarks.server_profile`: py-spy's raw stacks sorted into categories by their
innermost matching frame, and (slow) the whole command against a real server on the tiny model."""

from __future__ import annotations

import re
import shutil

import pytest

from benchmarks.server_profile import OTHER, categorize, tally


def test_the_innermost_matching_frame_names_the_sample():
    outer = "run (asyncio/base_events.py:600);handle (fastapi/routing.py:300)"
    assert categorize(outer) == "FastAPI routing and dependencies"
    assert categorize(outer + ";_infer (service/rest/v2.py:180)") == "our routes (/v2, /v1)"
    assert categorize(outer + ";_infer (service/rest/v2.py:180);decode (json/decoder.py:337)") \
        == "request parsing (JSON, tensors)"
    assert categorize("_bootstrap (threading.py:1002);predict (models/litert_classifier.py:90)") \
        == "LiteRT backbone"
    assert categorize("<module> (somewhere_else.py:1)") == OTHER


def test_tally_adds_the_counts_of_raw_lines_and_skips_junk():
    raw = ("a (asyncio/events.py:1);b (h11/_connection.py:2) 7\n"
           "a (asyncio/events.py:1) 3\n"
           "a (asyncio/events.py:1);c (fastapi/routing.py:3) 5\n"
           "not a sample line\n\n")
    counts = tally(raw)
    assert counts == {"h11 (HTTP parsing and writing)": 7, "asyncio event loop": 3,
                      "FastAPI routing and dependencies": 5}


@pytest.mark.slow
def test_profile_of_a_real_server_under_load(tiny_litert_artifact, tmp_path, capsys):
    from benchmarks import wrk
    from benchmarks.server_profile import main

    if not wrk.available():
        pytest.skip("wrk is not installed (apt-get install wrk)")
    model_dir = tmp_path / "models"
    shutil.copytree(tiny_litert_artifact, model_dir / "tiny")
    assert main(["--model-dir", str(model_dir), "--model", "tiny", "--clients", "4", "--seconds", "2",
                 "--rate", "200"]) == 0
    out = capsys.readouterr().out
    head = re.search(r"(\d+) samples with the GIL held; wrk ([\d.]+) req/s", out)
    assert head, out
    total, req_s = int(head.group(1)), float(head.group(2))
    assert total > 0 and req_s > 0
    rows = re.findall(r"^\s+(\d+)\s+([\d.]+)%\s+(.+)$", out, flags=re.M)
    assert sum(int(n) for n, _, _ in rows) == total
    assert abs(sum(float(p) for _, p, _ in rows) - 100) < 0.5
    assert {"FastAPI routing and dependencies", "asyncio event loop"} & {name for _, _, name in rows}, out
