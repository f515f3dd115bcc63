"""The shift report's detection-threshold block: named for what it is (`entropy_auroc_threshold`),
and reports written before the rename (`issue_target`, such as the committed ones) still read."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from training.shift.report import (
    ENTROPY_AUROC_THRESHOLD,
    OLD_THRESHOLD_KEY,
    THRESHOLD_KEY,
    threshold_check,
    upgrade_report,
)

REPO = Path(__file__).resolve().parents[1]
COMMITTED = sorted((REPO / "reports").glob("shift*/report.json"))


def _model(block_key: str, limit_key: str) -> dict:
    return {"name": "m", "ood": {block_key: {"what": "predictive-entropy AUROC, clean vs severity 5",
                                             "severity": 5, "auroc": 0.7, limit_key: 0.85, "met": False}}}


def test_new_and_old_blocks_read_the_same():
    new, old = _model(THRESHOLD_KEY, "threshold"), _model(OLD_THRESHOLD_KEY, "target")
    assert threshold_check(old) == threshold_check(new) == new["ood"][THRESHOLD_KEY]
    assert OLD_THRESHOLD_KEY in old["ood"]   # reading does not modify


def test_upgrade_renames_the_block_of_every_model():
    doc = {"models": [_model(OLD_THRESHOLD_KEY, "target"), _model(THRESHOLD_KEY, "threshold")]}
    expected = _model(THRESHOLD_KEY, "threshold")["ood"]
    upgraded = upgrade_report(copy.deepcopy(doc))
    assert [m["ood"] for m in upgraded["models"]] == [expected, expected]


@pytest.mark.parametrize("path", COMMITTED, ids=[p.parent.name for p in COMMITTED])
def test_committed_reports_upgrade(path):
    doc = upgrade_report(json.loads(path.read_text()))
    for m in doc["models"]:
        block = m["ood"][THRESHOLD_KEY]
        assert OLD_THRESHOLD_KEY not in m["ood"]
        assert block["threshold"] == ENTROPY_AUROC_THRESHOLD
        assert block["met"] == (block["auroc"] >= block["threshold"])


def test_there_are_committed_reports_to_read():
    assert COMMITTED
