"""Histograms of uncertainty scores for two batches (in-distribution vs suspect), to PNG bytes.

Like `diagram.py`: a bare matplotlib Figure on the Agg canvas (no pyplot state, safe in server
threads), matplotlib imported only when a picture is asked for.
"""

from __future__ import annotations

import io
from typing import Mapping

import numpy as np

__all__ = ["score_histograms_png"]

LABELS = {"max_probability": "1 - max probability", "predictive_entropy": "predictive entropy (nats)",
          "mutual_information": "MC mutual information (nats)"}


def score_histograms_png(in_scores: Mapping[str, np.ndarray], suspect_scores: Mapping[str, np.ndarray],
                         detections: Mapping[str, object] | None = None, *,
                         thresholds: Mapping[str, float | None] | None = None,
                         title: str = "Uncertainty scores") -> bytes:
    """One panel per score: both batches' histograms on shared bins (densities, so batches of
    different sizes compare), the AUROC in the panel title, a score's flag threshold as a line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = [n for n in in_scores if n in suspect_scores]
    if not names:
        raise ValueError("no score common to both batches")
    fig = Figure(figsize=(4.5 * len(names), 4.0), layout="constrained")
    canvas = FigureCanvasAgg(fig)
    for i, name in enumerate(names):
        ax = fig.add_subplot(1, len(names), i + 1)
        a = np.asarray(in_scores[name], dtype=np.float64)
        b = np.asarray(suspect_scores[name], dtype=np.float64)
        lo, hi = float(min(a.min(), b.min())), float(max(a.max(), b.max()))
        bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, 31)
        ax.hist(a, bins=bins, density=True, alpha=0.55, color="tab:blue", label=f"in-distribution (N={a.size})")
        ax.hist(b, bins=bins, density=True, alpha=0.55, color="tab:red", label=f"suspect (N={b.size})")
        threshold = (thresholds or {}).get(name)
        if threshold is not None:
            ax.axvline(threshold, color="black", linestyle="--", linewidth=1.0, label="flag threshold")
        d = (detections or {}).get(name)
        ax.set_title(LABELS.get(name, name) + (f"\nAUROC {d.auroc:.3f}, FPR@95 {d.fpr_at_95_tpr:.3f}"
                                               if d is not None else ""), fontsize="medium")
        ax.set_xlabel("score (higher: more likely out of distribution)")
        ax.set_ylabel("density")
        ax.legend(fontsize="small")
    fig.suptitle(title)
    buf = io.BytesIO()
    canvas.print_png(buf)
    return buf.getvalue()
