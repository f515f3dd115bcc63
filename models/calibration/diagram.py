"""Reliability diagrams rendered to PNG bytes.

Uses a bare ``matplotlib.figure.Figure`` with the Agg canvas, never pyplot's
global state, so it is safe to call from server threads. matplotlib is
imported lazily so importing the package stays cheap for the training loop.
"""

from __future__ import annotations

import io

from .metrics import CalibrationMetrics

__all__ = ["reliability_diagram_png"]


def _draw_panel(ax, hist_ax, name: str, m: CalibrationMetrics) -> None:
    lefts = [b.lower for b in m.bins]
    widths = [b.upper - b.lower for b in m.bins]
    full = [b for b in m.bins if b.count > 0]
    f_left = [b.lower for b in full]
    f_width = [b.upper - b.lower for b in full]
    acc = [b.accuracy for b in full]
    conf = [b.mean_confidence for b in full]

    ax.bar(f_left, acc, width=f_width, align="edge", color="tab:blue",
           edgecolor="black", linewidth=0.6, label="Accuracy")
    ax.bar(f_left, [c - a for c, a in zip(conf, acc)], bottom=acc, width=f_width,
           align="edge", color="tab:red", alpha=0.3, edgecolor="tab:red",
           hatch="//", linewidth=0.6, label="Gap to confidence")
    ax.plot([0.0, 1.0], [0.0, 1.0], linestyle="--", color="gray",
            label="Perfect calibration")
    ax.plot([], [], " ", label=f"ECE = {m.ece:.4f}")
    ax.plot([], [], " ", label=f"MCE = {m.mce:.4f}")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("Accuracy")
    ax.set_title(f"{name}: T = {m.temperature:.3g}, acc = {m.accuracy:.3f}, n = {m.n}")
    ax.legend(loc="upper left", fontsize="small")
    ax.tick_params(labelbottom=False)

    hist_ax.bar(lefts, [b.count for b in m.bins], width=widths, align="edge",
                color="gray", edgecolor="black", linewidth=0.6)
    hist_ax.set_xlim(0.0, 1.0)
    hist_ax.set_xlabel("Confidence")
    hist_ax.set_ylabel("Count")


def reliability_diagram_png(
    before: CalibrationMetrics,
    after: CalibrationMetrics | None = None,
    *,
    title: str = "Reliability diagram",
) -> bytes:
    """PNG of the reliability diagram; side-by-side panels when ``after`` is given."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [("Before" if after is not None else "Model", before)]
    if after is not None:
        panels.append(("After", after))
    for _, m in panels:
        if not isinstance(m, CalibrationMetrics):
            raise TypeError(f"expected CalibrationMetrics, got {type(m).__name__}")

    fig = Figure(figsize=(5.5 * len(panels), 6.5), layout="constrained")
    canvas = FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, len(panels), height_ratios=[3, 1])
    for col, (name, m) in enumerate(panels):
        ax = fig.add_subplot(grid[0, col])
        hist_ax = fig.add_subplot(grid[1, col], sharex=ax)
        _draw_panel(ax, hist_ax, name, m)
    fig.suptitle(title)

    buf = io.BytesIO()
    canvas.print_png(buf)
    return buf.getvalue()
