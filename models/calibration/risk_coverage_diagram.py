"""The risk-coverage curve rendered to PNG bytes (selective prediction, see `selective`).

Same rules as the reliability diagram: a bare ``Figure`` on the Agg canvas (no pyplot global
state, safe in server threads) and matplotlib imported lazily.
"""

from __future__ import annotations

import io

import numpy as np

from .selective import SelectiveReport, risk_coverage_curve

__all__ = ["risk_coverage_png"]


def risk_coverage_png(confidence, correct, report: SelectiveReport, *,
                      title: str = "Risk-coverage curve") -> bytes:
    """Selective risk against coverage at every distinct confidence (not the report's compact
    curve), the oracle's curve for reference, the report's coverage points and, when it has one,
    the threshold for the target accuracy."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    curve = risk_coverage_curve(confidence, correct)
    n = curve.n
    k = np.arange(1, n + 1)
    n_right = int(np.count_nonzero(correct))
    oracle_risk = np.maximum(0, k - n_right) / k

    fig = Figure(figsize=(6.5, 5.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.step(np.r_[0.0, curve.coverage], np.r_[curve.risk[0], curve.risk], where="pre", color="tab:blue",
            label=f"model: AURC = {report.aurc:.4f}")
    ax.plot(k / n, oracle_risk, linestyle="--", color="gray",
            label=f"oracle: AURC = {report.oracle_aurc:.4f} (E-AURC = {report.e_aurc:.4f})")
    ax.scatter([p.accepted / n for p in report.at_coverage], [p.risk for p in report.at_coverage],
               color="tab:orange", zorder=3, label="coverage " + ", ".join(f"{p.coverage:.0%}"
                                                                          for p in report.at_coverage))
    target = report.target
    if target is not None and target.achieved:
        ax.scatter([target.coverage], [1.0 - target.accuracy], marker="*", s=160, color="tab:green", zorder=4,
                   label=f"accuracy >= {target.target_accuracy:g}: conf >= {target.threshold:.4f}, "
                         f"coverage {target.coverage:.2%}")
    elif target is not None:
        ax.plot([], [], " ", label=f"no threshold reaches accuracy {target.target_accuracy:g}")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, max(0.05, float(curve.risk.max()) * 1.1))
    ax.set_xlabel("Coverage (fraction of images accepted, most confident first)")
    ax.set_ylabel("Selective risk (error rate among accepted)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")

    buf = io.BytesIO()
    fig.canvas.print_png(buf)
    return buf.getvalue()
