"""The TensorBoard dashboard: a custom-scalars layout, the report as text, gradient histograms, a gradient-flow image.

Everything goes through a ``SummaryWriter`` (``torch.utils.tensorboard``'s or tensorboardX's: the
``experiment`` of Lightning's ``TensorBoardLogger``, or the writer a plain loop passes in), so the dashboard
lives in the same run directory as the scalars that :mod:`lightning_gradguard.metrics` writes:

* a custom-scalars layout (TensorBoard's "Custom Scalars" tab) written once when training starts: charts of
  the total norm, of the number of parameters without a gradient, of the cumulative steps without a gradient of
  each parameter that missed one, of the number with a non-finite gradient, of skipped AMP steps when a gradient
  scaler is in use; then one chart of gradient norms and one of steps without a gradient per top-level module;
* the report (causes with their source lines, the table, hints) as a markdown text entry under
  ``gradguard/report``, at the first step with a missing gradient, when strict mode stops training, and at the
  end of training. The entry carries the report as JSON in an HTML comment, which TensorBoard does not display,
  so ``gradguard report`` can read a log directory back;
* optional gradient histograms (``gradguard/grad_hist/...``) on their own, sparser cadence;
* an optional gradient-flow image (``gradguard/gradient_flow``): per parameter (or per module for big models)
  the mean and the max absolute gradient on a log scale, with the parameters that had no gradient marked in
  red. It needs matplotlib (``pip install 'lightning-gradguard[plot]'``).

Only histogram and gradient-flow steps read gradient values for the dashboard; the layout and the text cost
nothing per step.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Optional

import torch

from lightning_gradguard.metrics import PREFIX, auto_depth, module_key
from lightning_gradguard.norms import local_tensor, per_param_norms
from lightning_gradguard.report import GradReport
from lightning_gradguard.report_text import (  # torch-free, for the CLI; re-exported for existing imports
    REPORT_TAG,
    problems_markdown,  # noqa: F401
    report_from_text,  # noqa: F401
    report_markdown,
)

if TYPE_CHECKING:
    from lightning_gradguard.engine import GradGuardEngine, StepCheck

FLOW_TAG = f"{PREFIX}/gradient_flow"
HISTOGRAM_PREFIX = f"{PREFIX}/grad_hist"
AMP_SKIPPED_TAG = f"{PREFIX}/amp_skipped_steps"
ROOT_MODULE = "(root)"

_MAX_MODULE_CHARTS = 64  # top-level modules with their own chart; the rest share one
_MAX_FLOW_BARS = 96  # above this many parameters the gradient-flow image shows modules instead


# ---------------------------------------------------------------------------------------------- finding writers
def tensorboard_writers(loggers: Iterable[Any]) -> list[Any]:
    """The ``SummaryWriter`` of every TensorBoard logger in ``loggers`` (either package namespace).

    ``lightning.pytorch.loggers.TensorBoardLogger``, ``pytorch_lightning.loggers.TensorBoardLogger`` and
    Fabric's ``TensorBoardLogger`` are recognised by class name, so neither namespace has to be imported.
    """
    writers = []
    for logger in loggers:
        if any(cls.__name__ == "TensorBoardLogger" for cls in type(logger).__mro__):
            writer = logger.experiment
            if writer is not None and hasattr(writer, "add_scalar"):
                writers.append(writer)
    return writers


# ---------------------------------------------------------------------------------------------- layout
def top_level_modules(names: Sequence[str]) -> list[str]:
    """Top-level module names in first-seen order; parameters of the root module go under ``"(root)"``."""
    seen: dict[str, None] = {}
    for name in names:
        head, dot, _ = name.partition(".")
        seen.setdefault(head if dot else ROOT_MODULE, None)
    return list(seen)


def _module_regex(series: str, module: str, root_params: Sequence[str]) -> str:
    # tags are matched with re.match (anchored at the start only); the tail keeps "enc" from matching "encoder"
    if module == ROOT_MODULE:  # parameters of the root module itself, by name (a module name has no dot either)
        return rf"{PREFIX}/{series}/({'|'.join(re.escape(n) for n in root_params)})$"
    return rf"{PREFIX}/{series}/{re.escape(module)}(\.|$)"


def dashboard_layout(names: Sequence[str], amp: bool = False) -> dict[str, dict[str, list]]:
    """The custom-scalars layout for a model whose parameters are ``names``.

    Args:
        names: parameter names (as in the report).
        amp: add the chart of steps skipped by the gradient scaler.

    Returns:
        ``{category: {chart title: ["Multiline", [tag regex, ...]]}}``, as ``SummaryWriter.add_custom_scalars``
        takes it.

    """
    overview: dict[str, list] = {
        "total gradient norm": ["Multiline", [rf"{PREFIX}/total_norm$"]],
        "parameters without a gradient": [
            "Multiline",
            [rf"{PREFIX}/none_params$", rf"{PREFIX}/intermittent_params$"],
        ],
        "cumulative steps without a gradient, by parameter": [
            "Multiline",
            [rf"{PREFIX}/none_steps/"],
        ],
        "parameters with a non-finite gradient": ["Multiline", [rf"{PREFIX}/nonfinite_params$"]],
    }
    if amp:
        overview["steps skipped by the AMP gradient scaler"] = ["Multiline", [rf"{AMP_SKIPPED_TAG}$"]]
    modules = top_level_modules(names)
    root_params = [n for n in names if "." not in n]
    shown, rest = modules[:_MAX_MODULE_CHARTS], modules[_MAX_MODULE_CHARTS:]
    norms: dict[str, list] = {}
    nones: dict[str, list] = {}
    for module in shown:
        norms[module] = ["Multiline", [_module_regex("(norm|module_norm)", module, root_params)]]
        nones[module] = ["Multiline", [_module_regex("none_steps", module, root_params)]]
    if rest:
        others = "|".join(re.escape(m) for m in rest if m != ROOT_MODULE) or "$^"
        norms["other modules"] = ["Multiline", [rf"{PREFIX}/(norm|module_norm)/({others})(\.|$)"]]
        nones["other modules"] = ["Multiline", [rf"{PREFIX}/none_steps/({others})(\.|$)"]]
    return {
        "GradGuard": overview,
        "GradGuard: gradient norm by module": norms,
        "GradGuard: steps without a gradient by module": nones,
    }


# ---------------------------------------------------------------------------------------------- gradient flow
def gradient_flow_stats(
    names: Sequence[str], grads: Sequence[Optional[torch.Tensor]], max_bars: int = _MAX_FLOW_BARS
) -> tuple[list[str], list[float], list[float], list[bool]]:
    """Mean and max absolute gradient per parameter, or per module when there are more than ``max_bars``.

    Two fused norm launches per (device, dtype) group (L1 and L-inf) and one host copy per device.

    Returns:
        ``(labels, means, maxes, missing)``; a label is missing when its gradient (or, for a module, any of its
        parameters' gradients) is None.

    """
    present = [i for i, g in enumerate(grads) if g is not None]
    l1 = [0.0] * len(grads)
    mx = [0.0] * len(grads)
    numel = [0] * len(grads)
    if present:
        tensors = [grads[i] for i in present]
        for target, p in ((l1, 1.0), (mx, math.inf)):
            by_device: dict[torch.device, list] = defaultdict(list)
            for group in per_param_norms(tensors, p):
                by_device[group.norms.device].append(group)
            for groups in by_device.values():
                values = torch.cat([g.norms for g in groups]).tolist()
                positions = [present[q] for g in groups for q in g.positions]
                for position, value in zip(positions, values):
                    target[position] = value
        for i in present:
            numel[i] = local_tensor(grads[i]).numel()  # type: ignore[arg-type]
    missing = [g is None for g in grads]
    if len(names) <= max_bars:
        means = [l1[i] / numel[i] if numel[i] else 0.0 for i in range(len(names))]
        return list(names), means, mx, missing
    depth = auto_depth(names, max_bars)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, name in enumerate(names):
        groups[module_key(name, depth)].append(i)
    labels, means, maxes, flags = [], [], [], []
    for module, members in groups.items():
        count = sum(numel[i] for i in members)
        n_missing = sum(missing[i] for i in members)
        labels.append(f"{module} ({n_missing} missing)" if n_missing else module)
        means.append(sum(l1[i] for i in members) / count if count else 0.0)
        maxes.append(max(mx[i] for i in members))
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


# ---------------------------------------------------------------------------------------------- the dashboard
class TensorBoardDashboard:
    """Writes GradGuard's dashboard through one or more ``SummaryWriter`` objects.

    Adapters call :meth:`start` once the parameters are bound, :meth:`after_check` right after each
    :meth:`~lightning_gradguard.engine.GradGuardEngine.check_step` (before ``optimizer.step()``, while the
    gradients are in place), and :meth:`finish` at the end of training.

    Args:
        writers: ``SummaryWriter`` objects (see :func:`tensorboard_writers`).
        engine: the engine whose parameters and counts are shown.
        histogram_every_n_steps: write gradient histograms every n logging steps (``None``: never).
        gradient_flow_every_n_steps: draw the gradient-flow image every n steps (``None``: never); when set, the
            image is also drawn at the first step with a missing gradient.

    Example::

        dashboard = TensorBoardDashboard([writer], engine, histogram_every_n_steps=500)
        dashboard.start()
        check = engine.check_step(optimizer, step)
        dashboard.after_check(check, step)
        dashboard.finish(engine.report(), step)

    """

    def __init__(
        self,
        writers: Sequence[Any],
        engine: GradGuardEngine,
        histogram_every_n_steps: Optional[int] = None,
        gradient_flow_every_n_steps: Optional[int] = None,
    ) -> None:
        self.writers = list(writers)
        self.engine = engine
        self.histogram_every_n_steps = histogram_every_n_steps
        self.gradient_flow_every_n_steps = gradient_flow_every_n_steps
        self.first_missing_step: Optional[int] = None

    def start(self, amp: bool = False) -> None:
        """Write the custom-scalars layout (call after the parameters are bound)."""
        names = [n for i, n in enumerate(self.engine.registry.names) if not self.engine.registry.allowed[i]]
        layout = dashboard_layout(names, amp=amp)
        for writer in self.writers:
            writer.add_custom_scalars(layout)

    def after_check(self, check: StepCheck, step: int) -> None:
        """Histograms and gradient flow on their cadence; the report text at the first missing gradient.

        Args:
            check: what :meth:`~lightning_gradguard.engine.GradGuardEngine.check_step` returned.
            step: the step number the scalars of this step are written at.

        """
        if not self.writers or not check.checked:
            return
        first_missing = bool(check.missing) and self.first_missing_step is None
        if _due(self.histogram_every_n_steps, step):
            self.write_histograms(check, step)
        if first_missing or _due(self.gradient_flow_every_n_steps, step):
            if self.gradient_flow_every_n_steps is not None:
                self.write_gradient_flow(check, step)
        if first_missing:
            self.first_missing_step = step
            names = ", ".join(self.engine.names(check.missing[:5])) + (", ..." if len(check.missing) > 5 else "")
            self.write_report(self.engine.report(), step, f"GradGuard: first missing gradient at step {step} ({names})")

    def write_report(self, report: GradReport, step: int, title: str) -> None:
        text = report_markdown(report, title)
        for writer in self.writers:
            writer.add_text(REPORT_TAG, text, step)

    def finish(self, report: GradReport, step: int) -> None:
        """Write the final report as text and flush the writers."""
        self.write_report(report, step, f"GradGuard report at the end of training (step {step})")
        self.flush()

    def flush(self) -> None:
        for writer in self.writers:
            flush = getattr(writer, "flush", None)
            if callable(flush):
                flush()

    # ------------------------------------------------------------------ pictures
    def _checked_grads(self, check: StepCheck) -> tuple[list[str], list[Optional[torch.Tensor]]]:
        registry = self.engine.registry
        missing = set(check.missing)
        names = [registry.names[i] for i in check.checked]
        grads = [None if i in missing else registry.params[i].grad for i in check.checked]
        return names, grads

    def write_histograms(self, check: StepCheck, step: int) -> None:
        """One histogram per parameter gradient, or per module when there are more than ``max_logged_series``."""
        names, grads = self._checked_grads(check)
        present = [(n, g) for n, g in zip(names, grads) if g is not None]
        if not present:
            return
        limit = self.engine.config.max_logged_series
        if len(present) <= limit:
            series = [(n, _flat(g)) for n, g in present]
        else:
            depth = auto_depth([n for n, _ in present], limit)
            grouped: dict[str, list[torch.Tensor]] = defaultdict(list)
            for n, g in present:
                grouped[module_key(n, depth)].append(_flat(g))
            series = [(module, torch.cat(parts)) for module, parts in grouped.items()]
        for name, values in series:
            values = values[torch.isfinite(values)]
            if values.numel() == 0:
                continue
            for writer in self.writers:
                writer.add_histogram(f"{HISTOGRAM_PREFIX}/{name}", values, step)

    def write_gradient_flow(self, check: StepCheck, step: int) -> None:
        names, grads = self._checked_grads(check)
        labels, means, maxes, missing = gradient_flow_stats(names, grads)
        n_missing = sum(g is None for g in grads)
        title = f"Gradient flow at step {step}"
        if n_missing:
            title += f": {n_missing} parameter{'s' if n_missing != 1 else ''} without a gradient"
        image = render_gradient_flow(labels, means, maxes, missing, title)
        for writer in self.writers:
            writer.add_image(FLOW_TAG, image, step, dataformats="HWC")


def _due(every: Optional[int], step: int) -> bool:
    return every is not None and (step + 1) % every == 0


def _flat(grad: torch.Tensor) -> torch.Tensor:
    grad = local_tensor(grad)
    if grad.layout != torch.strided:
        grad = grad.coalesce().values() if grad.is_sparse else grad.values()
    return grad.detach().reshape(-1).to(device="cpu", dtype=torch.float32)
