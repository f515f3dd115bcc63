"""A model's own reliability diagram, drawn from its card: the dashboard (and anyone) can show how
calibrated a model was on its test split without uploading data.

Training writes the test split's full metrics, reliability bins included, before and after the
temperature (`metrics.test_before_temperature` / `test_after_temperature`, the card's headline
figures), so the diagram is redrawn from those bins: no images, no inference. The PNG is cached
per model name and metrics (a served card does not change; a reloaded one may).
"""

from __future__ import annotations

import hashlib
import json
import threading

from models.calibration.diagram import reliability_diagram_png
from models.calibration.metrics import CalibrationMetrics

BEFORE, AFTER = "test_before_temperature", "test_after_temperature"

_cache: dict[tuple[str, str], bytes] = {}
_lock = threading.Lock()


class DiagramUnavailable(ValueError):
    """The card holds no usable reliability bins (an older or hand-written card)."""


def card_metrics(card: dict) -> tuple[CalibrationMetrics, CalibrationMetrics]:
    """The test split's metrics before and after the temperature, as the card records them."""
    metrics = card.get("metrics") or {}
    try:
        return CalibrationMetrics.from_dict(metrics[BEFORE]), CalibrationMetrics.from_dict(metrics[AFTER])
    except (KeyError, TypeError, ValueError) as exc:
        raise DiagramUnavailable(f"the model card has no test-split reliability bins "
                                 f"(metrics.{BEFORE} and metrics.{AFTER})") from exc


def card_reliability_png(name: str, card: dict) -> bytes:
    """The reliability diagram of the card's test split, before and after the temperature (PNG)."""
    before, after = card_metrics(card)
    metrics = card["metrics"]
    digest = hashlib.sha256(json.dumps([metrics[BEFORE], metrics[AFTER]], sort_keys=True).encode()).hexdigest()
    key = (name, digest)
    with _lock:
        png = _cache.get(key)
    if png is not None:
        return png
    title = f"{name}: test split, N={after.n}, T={after.temperature:.3f}, ECE {before.ece:.4f} -> {after.ece:.4f}"
    png = reliability_diagram_png(before, after, title=title)
    with _lock:
        _cache[key] = png
    return png
