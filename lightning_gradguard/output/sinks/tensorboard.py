"""The TensorBoard dashboard: a custom-scalars layout, the report as text, gradient histograms, a gradient-flow image.

Everything goes through a ``SummaryWriter`` (``torch.utils.tensorboard``'s or tensorboardX's: the
``experiment`` of Lightning's ``TensorBoardLogger``, or the writer a plain loop passes in), so the dashboard
lives in the same run directory as the scalars that :mod:`lightning_gradguard.output.metrics` writes:

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

The histograms and the gradient-flow picture are drawn from statistics the engine measures at the steps the
dashboard asks for (:class:`~lightning_gradguard.core.measure.StatsRequest`): the dashboard never reads a gradient,
and the layout and the text cost nothing per step. A named guard writes under ``gradguard/<name>/`` instead.
"""

from __future__ import annotations

import re
import warnings
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Optional

from lightning_gradguard.core.measure import HISTOGRAM_BINS, StatsRequest
from lightning_gradguard.errors import GradGuardWarning
from lightning_gradguard.output.metrics import PREFIX, auto_depth, module_key
from lightning_gradguard.output.sinks.base import RunInfo, Sink
from lightning_gradguard.output.sinks.pictures import gradient_flow_stats, render_gradient_flow
from lightning_gradguard.report import GradReport
from lightning_gradguard.report_text import REPORT_TAG, report_markdown

if TYPE_CHECKING:
    from lightning_gradguard.core.observer import StepCheck

FLOW_TAG = f"{PREFIX}/gradient_flow"
HISTOGRAM_PREFIX = f"{PREFIX}/grad_hist"
AMP_SKIPPED_TAG = f"{PREFIX}/amp_skipped_steps"
ROOT_MODULE = "(root)"

_MAX_MODULE_CHARTS = 64  # top-level modules with their own chart; the rest share one


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


def _module_regex(prefix: str, series: str, module: str, root_params: Sequence[str]) -> str:
    # tags are matched with re.match (anchored at the start only); the tail keeps "enc" from matching "encoder"
    if module == ROOT_MODULE:  # parameters of the root module itself, by name (a module name has no dot either)
        return rf"{prefix}/{series}/({'|'.join(re.escape(n) for n in root_params)})$"
    return rf"{prefix}/{series}/{re.escape(module)}(\.|$)"


def dashboard_layout(names: Sequence[str], amp: bool = False, prefix: str = PREFIX) -> dict[str, dict[str, list]]:
    """The custom-scalars layout for a model whose parameters are ``names``.

    Args:
        names: parameter names (as in the report).
        amp: add the chart of steps skipped by the gradient scaler.
        prefix: the tag prefix (``gradguard``, or ``gradguard/<name>`` for a named guard).

    Returns:
        ``{category: {chart title: ["Multiline", [tag regex, ...]]}}``, as ``SummaryWriter.add_custom_scalars``
        takes it.

    """
    overview: dict[str, list] = {
        "total gradient norm": ["Multiline", [rf"{prefix}/total_norm$"]],
        "parameters without a gradient": [
            "Multiline",
            [rf"{prefix}/none_params$", rf"{prefix}/intermittent_params$"],
        ],
        "cumulative steps without a gradient, by parameter": [
            "Multiline",
            [rf"{prefix}/none_steps/"],
        ],
        "parameters with a non-finite gradient": ["Multiline", [rf"{prefix}/nonfinite_params$"]],
        "parameters with an all-zero gradient": ["Multiline", [rf"{prefix}/zero_params$"]],
    }
    if amp:
        overview["steps skipped by the AMP gradient scaler"] = ["Multiline", [rf"{prefix}/amp_skipped_steps$"]]
    modules = top_level_modules(names)
    root_params = [n for n in names if "." not in n]
    shown, rest = modules[:_MAX_MODULE_CHARTS], modules[_MAX_MODULE_CHARTS:]
    norms: dict[str, list] = {}
    nones: dict[str, list] = {}
    for module in shown:
        norms[module] = ["Multiline", [_module_regex(prefix, "(norm|module_norm)", module, root_params)]]
        nones[module] = ["Multiline", [_module_regex(prefix, "none_steps", module, root_params)]]
    if rest:
        others = "|".join(re.escape(m) for m in rest if m != ROOT_MODULE) or "$^"
        norms["other modules"] = ["Multiline", [rf"{prefix}/(norm|module_norm)/({others})(\.|$)"]]
        nones["other modules"] = ["Multiline", [rf"{prefix}/none_steps/({others})(\.|$)"]]
    title = "GradGuard" if prefix == PREFIX else f"GradGuard {prefix[len(PREFIX) + 1:]}"
    return {
        title: overview,
        f"{title}: gradient norm by module": norms,
        f"{title}: steps without a gradient by module": nones,
    }


# ---------------------------------------------------------------------------------------------- the sinks
class TensorBoardDashboard(Sink):
    """GradGuard's dashboard through one or more ``SummaryWriter`` objects: the layout, the report text, and on their
    own cadence the gradient histograms and the gradient-flow image.

    Args:
        writers: ``SummaryWriter`` objects (see :func:`tensorboard_writers`).
        histogram_every_n_steps: gradient histograms every n steps (``None``: never).
        gradient_flow_every_n_steps: the gradient-flow image every n steps (``None``: never); when set, the image
            is also drawn at the first step with a missing gradient.
        max_series: above this many parameters, histograms are drawn per module.

    Example::

        reporter.add(TensorBoardDashboard([writer], histogram_every_n_steps=500))

    """

    def __init__(
        self,
        writers: Sequence[Any],
        histogram_every_n_steps: Optional[int] = None,
        gradient_flow_every_n_steps: Optional[int] = None,
        max_series: int = 256,
    ) -> None:
        self.writers = list(writers)
        self.histogram_every_n_steps = histogram_every_n_steps
        self.gradient_flow_every_n_steps = gradient_flow_every_n_steps
        self.max_series = max_series
        self.first_missing_step: Optional[int] = None
        self._run: Optional[RunInfo] = None
        self._series: dict[tuple[int, ...], list[tuple[str, list[int]]]] = {}

    def start(self, run: RunInfo) -> None:
        self._run = run
        for writer in self.writers:
            writer.add_custom_scalars(dashboard_layout(run.shown, amp=run.amp, prefix=run.prefix))

    def request(self, check: StepCheck, step: int) -> Optional[StatsRequest]:
        if not check.checked:
            return None
        first_missing = bool(check.missing) and self.first_missing_step is None
        flow = self.gradient_flow_every_n_steps is not None and (first_missing or _due(self.gradient_flow_every_n_steps,
                                                                                         step))
        histograms = self._histogram_series(check) if _due(self.histogram_every_n_steps, step) else ()
        return StatsRequest(flow=flow, histograms=histograms) if flow or histograms else None

    def _histogram_series(self, check: StepCheck) -> list[tuple[str, list[int]]]:
        """One series per parameter, or per module when there are more than ``max_series`` (cached per layout)."""
        missing = set(check.missing)
        present = tuple(i for i in check.checked if i not in missing)
        series = self._series.get(present)
        if series is None:
            name = self._name
            if len(present) <= self.max_series:
                series = [(name(i), [i]) for i in present]
            else:
                depth = auto_depth([name(i) for i in present], self.max_series)
                grouped: dict[str, list[int]] = defaultdict(list)
                for i in present:
                    grouped[module_key(name(i), depth)].append(i)
                series = list(grouped.items())
            self._series = {present: series}  # one layout kept: a model whose missing set moves recomputes it
        return series

    def _name(self, index: int) -> str:
        names = self._run.names if self._run is not None else ()
        return names[index] if index < len(names) else str(index)

    def write_step(self, check: StepCheck, step: int) -> None:
        if not self.writers or not check.checked:
            return
        stats = check.stats
        if stats is not None:
            prefix = self._run.prefix if self._run is not None else PREFIX
            for name, packed in stats.histograms:
                self._write_histogram(f"{prefix}/grad_hist/{name}", packed, step)
            if stats.flow is not None:
                self._write_flow(check, step)
        if check.missing and self.first_missing_step is None:
            self.first_missing_step = step
            names = [self._name(i) for i in check.missing[:5]]
            shown = ", ".join(names) + (", ..." if len(check.missing) > 5 else "")
            if self._run is not None:
                title = f"GradGuard: first missing gradient at step {step} ({shown})"
                self.write_report(self._run.report(), step, title)

    def _write_histogram(self, tag: str, packed: Any, step: int) -> None:
        values = packed.cpu().tolist()
        low, high, count, total, squares = values[:5]
        if not count:
            return
        counts = values[5:]
        width = (high - low) / HISTOGRAM_BINS
        limits = [low + width * (b + 1) for b in range(HISTOGRAM_BINS)]
        for writer in self.writers:
            writer.add_histogram_raw(tag, low, high, count, total, squares, limits, counts, step)

    def _write_flow(self, check: StepCheck, step: int) -> None:
        indices, l1, peak, numel = check.stats.flow  # type: ignore[union-attr,misc]
        measured = dict(zip(indices, zip(l1.cpu().tolist(), peak.cpu().tolist(), numel)))
        names, l1s, peaks, numels, missing = [], [], [], [], []
        for i in check.checked:
            names.append(self._name(i))
            a, b, n = measured.get(i, (0.0, 0.0, 0))
            l1s.append(a)
            peaks.append(b)
            numels.append(n)
            missing.append(i not in measured)
        labels, means, maxes, flags = gradient_flow_stats(names, l1s, peaks, numels, missing)
        n_missing = sum(missing)
        title = f"Gradient flow at step {step}"
        if n_missing:
            title += f": {n_missing} parameter{'s' if n_missing != 1 else ''} without a gradient"
        image = render_gradient_flow(labels, means, maxes, flags, title)
        prefix = self._run.prefix if self._run is not None else PREFIX
        for writer in self.writers:
            writer.add_image(f"{prefix}/gradient_flow", image, step, dataformats="HWC")

    def write_report(self, report: GradReport, step: int, title: Optional[str]) -> None:
        if title is None:
            title = f"GradGuard report at the end of training (step {step})"
        text = report_markdown(report, title)
        tag = f"{self._run.prefix}/report" if self._run is not None else REPORT_TAG
        for writer in self.writers:
            writer.add_text(tag, text, step)
        self.flush()

    def flush(self) -> None:
        for writer in self.writers:
            flush = getattr(writer, "flush", None)
            if callable(flush):
                flush()

    def close(self) -> None:
        self.flush()


class ScalarWriterSink(Sink):
    """Scalars to a ``SummaryWriter`` (plain loops and Fabric without a Lightning logger).

    Args:
        writer: a ``SummaryWriter`` (``torch.utils.tensorboard`` or tensorboardX).
        owned: the sink created the writer and closes it at the end.

    """

    def __init__(self, writer: Any, owned: bool = False) -> None:
        self.writer = writer
        self.owned = owned

    def write_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        if self.owned:
            self.writer.close()
        else:
            flush = getattr(self.writer, "flush", None)
            if callable(flush):
                flush()


def _due(every: Optional[int], step: int) -> bool:
    return every is not None and (step + 1) % every == 0


def open_writer(log_dir: str) -> Any:
    """A ``SummaryWriter`` on ``log_dir``, or None with a warning that says why when it cannot be created."""
    from torch.utils.tensorboard import SummaryWriter

    try:
        return SummaryWriter(log_dir=log_dir)
    except OSError as err:
        warnings.warn(
            f"GradGuard cannot write TensorBoard logs to {log_dir}: {err.strerror or err}. It checks every step and "
            "prints its report as usual, without logs there.",
            GradGuardWarning,
            stacklevel=4,
        )
        return None


def writer_log_dir(writer: Any) -> Optional[str]:
    """The log directory of a ``SummaryWriter`` (torch's or tensorboardX's), None when it does not say."""
    get = getattr(writer, "get_logdir", None)
    if callable(get):
        return get()
    return getattr(writer, "log_dir", None) or getattr(writer, "logdir", None)
