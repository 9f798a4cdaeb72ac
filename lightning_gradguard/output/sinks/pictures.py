"""The dashboard's pictures: the gradient-flow chart, drawn from what the engine measured at the step.

Per parameter (or per module for big models) the mean and the max absolute gradient on a log scale, with the
parameters that had no gradient marked in red. Drawing needs matplotlib (``pip install 'lightning-gradguard[plot]'``);
the statistics come from :func:`lightning_gradguard.core.measure.measure_stats`, so nothing here reads a gradient.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from lightning_gradguard.output.metrics import auto_depth, module_key

MAX_FLOW_BARS = 96  # above this many parameters the gradient-flow image shows modules instead


def gradient_flow_stats(
    names: Sequence[str],
    l1: Sequence[float],
    peak: Sequence[float],
    numel: Sequence[int],
    missing: Sequence[bool],
    max_bars: int = MAX_FLOW_BARS,
) -> tuple[list[str], list[float], list[float], list[bool]]:
    """Mean and max absolute gradient per parameter, or per module when there are more than ``max_bars``.

    Args:
        names: parameter names.
        l1, peak, numel: per parameter, the L1 norm and the max absolute value of its gradient and its element
            count, as the engine measured them (0 for a parameter without a gradient).
        missing: per parameter, whether it had no gradient.
        max_bars: the most bars the picture shows.

    Returns:
        ``(labels, means, maxes, missing)``; a module is missing when any of its parameters is.

    """
    if len(names) <= max_bars:
        means = [l1[i] / numel[i] if numel[i] else 0.0 for i in range(len(names))]
        return list(names), means, list(peak), list(missing)
    depth = auto_depth(names, max_bars)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, name in enumerate(names):
        groups[module_key(name, depth)].append(i)
    labels, means, maxes, flags = [], [], [], []
    for module, members in groups.items():
        count = sum(numel[i] for i in members)
        n_missing = sum(bool(missing[i]) for i in members)
        labels.append(f"{module} ({n_missing} missing)" if n_missing else module)
        means.append(sum(l1[i] for i in members) / count if count else 0.0)
        maxes.append(max(peak[i] for i in members))
        flags.append(n_missing > 0)
    return labels, means, maxes, flags


def render_gradient_flow(
    labels: Sequence[str], means: Sequence[float], maxes: Sequence[float], missing: Sequence[bool], title: str = ""
) -> Any:
    """Draw the gradient-flow chart; returns an ``(H, W, 3)`` uint8 array. Needs matplotlib (no pyplot state)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    n = len(labels)
    x = np.arange(n)
    mean = np.array(means, dtype=np.float64)
    peak = np.array(maxes, dtype=np.float64)
    finite = np.isfinite(mean) & np.isfinite(peak)
    values = np.concatenate([mean[finite], peak[finite]])
    positive = values[values > 0]
    floor = float(positive.min()) / 4 if positive.size else 1e-8
    top = float(positive.max()) * 2.5 if positive.size else 1.0
    shown_peak = np.where(finite & (peak > 0), peak, np.nan)
    shown_mean = np.where(finite & (mean > 0), mean, np.nan)

    fig = Figure(figsize=(min(max(6.0, 0.22 * n + 2.5), 40.0), 5.0), dpi=100)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    ax.bar(x, shown_peak, width=0.8, color="#9ecae1", label="max |grad|")
    ax.bar(x, shown_mean, width=0.8, color="#08519c", label="mean |grad|")
    for i in np.flatnonzero(np.array(missing, dtype=bool)):
        ax.axvspan(i - 0.5, i + 0.5, color="#fcbba1", alpha=0.6, linewidth=0)
    missing_x = [i for i, m in enumerate(missing) if m]
    if missing_x:
        ax.plot(missing_x, [floor * 1.5] * len(missing_x), "x", color="#cb181d", markersize=9, mew=2)
    nonfinite_x = [i for i in range(n) if not finite[i]]
    if nonfinite_x:
        ax.plot(nonfinite_x, [top / 1.5] * len(nonfinite_x), "^", color="#fd8d3c", markersize=8)
    ax.set_yscale("log")
    ax.set_ylim(floor, top)
    ax.set_xlim(-0.75, n - 0.25)
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=90, fontsize=7 if n > 30 else 8)
    for tick, is_missing in zip(ax.get_xticklabels(), missing):
        if is_missing:
            tick.set_color("#cb181d")
    ax.set_ylabel("|gradient| (log scale)")
    fig.suptitle(title or "Gradient flow", fontsize=10)
    ax.grid(axis="y", which="major", alpha=0.3)
    handles = [
        Patch(color="#9ecae1", label="max |grad|"),
        Patch(color="#08519c", label="mean |grad|"),
        Patch(color="#fcbba1", label="no gradient"),
    ]
    if nonfinite_x:
        handles.append(Patch(color="#fd8d3c", label="non-finite"))
    ax.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(handles), fontsize=8,
              frameon=False)  # fmt: skip
    fig.tight_layout()
    canvas.draw()
    image = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    return image


def require_matplotlib(argument: str) -> None:
    """Raise a clear error when ``argument`` asks for a picture and matplotlib is not installed.

    Raises:
        ModuleNotFoundError: matplotlib cannot be imported.

    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ModuleNotFoundError(
            f"`{argument}` draws a picture and needs matplotlib: pip install 'lightning-gradguard[plot]' "
            "(or pip install matplotlib)"
        ) from None


