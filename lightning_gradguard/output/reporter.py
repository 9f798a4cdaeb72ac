"""Where a finding is logged: the one reporting path every adapter uses.

A :class:`Reporter` owns what leaves the guard:

* **the cadence**: a logging step is every ``every``-th step; at a logging step, every optimizer that stepped
  since the previous one is logged with its latest measured norms (so an alternating GAN loop logs both networks
  at any cadence), and ``total_norm`` covers all of them (``total_norm/<optimizer>`` each, when there are several);
* **the staging of device values**: a logging step's norms start their copy to the host right away and are
  written once they have landed (:class:`~lightning_gradguard.output.metrics.StagedMetrics`), so the device never
  waits for logging;
* **the collective**: under DDP and FSDP the training context's reduction makes counts and norms global, on every
  rank, at logging steps (and every ``every`` steps without a logger);
* **the sinks** (:mod:`lightning_gradguard.output.sinks`): Lightning loggers, a ``SummaryWriter``, the TensorBoard
  dashboard, the console summary, the JSON report. Only the writing rank (global rank zero) writes.

A named guard (``name="generator"``) writes its tags under ``gradguard/generator/`` and its report to
``gradguard-generator.json``; two guards that would write the same tags to the same destination are refused.
"""

from __future__ import annotations

import weakref
from collections import deque
from collections.abc import Hashable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Callable, Optional

from torch import Tensor

from lightning_gradguard.core.measure import StatsRequest
from lightning_gradguard.output.metrics import PREFIX, LogLayout, StagedMetrics, layout_for
from lightning_gradguard.output.sinks.base import RunInfo, Sink
from lightning_gradguard.report import REPORT_FILENAME, GradReport

if TYPE_CHECKING:
    from lightning_gradguard.core.engine import GradGuardEngine
    from lightning_gradguard.core.observer import StepCheck
    from lightning_gradguard.training.context import TrainingContext

_MAX_IN_FLIGHT = 4  # logging steps whose copies may still be on their way before the oldest is waited for


class Reporter:
    """The logging cadence, the staged device values and the sinks of one guard.

    Args:
        engine: the engine whose checks and counts are reported.
        every: the logging cadence in steps (the adapter's step numbering); also the reduction cadence of a
            distributed run without a logger.
        logs: scalars are logged at all (a logger or writer exists).
        name: the guard's name: tags under ``gradguard/<name>/``, report file ``gradguard-<name>.json``.
        writes: this process writes (global rank zero); other ranks only take part in reductions.
        context: the training context (precision, strategy, ranks) whose reduction runs at logging steps.
        label: names an optimizer in the per-optimizer totals (default: ``optimizer_<k>`` by first step).

    Example::

        reporter = Reporter(engine, every=50, logs=True)
        reporter.add(ScalarWriterSink(writer))
        reporter.start()
        check = engine.check_step(optimizer, step, measure=reporter.measure_due(step))
        reporter.after_check(check, step)
        reporter.end_step(step)
        reporter.finish(engine.report(), step)

    """

    def __init__(
        self,
        engine: GradGuardEngine,
        every: int,
        logs: bool,
        name: Optional[str] = None,
        writes: bool = True,
        context: Optional[TrainingContext] = None,
        label: Optional[Callable[[Any], str]] = None,
    ) -> None:
        self.engine = engine
        self.every = every
        self.logs = logs
        self.name = name
        self.writes = writes
        self.context = context
        self.prefix = PREFIX if name is None else f"{PREFIX}/{name}"
        self.report_file = REPORT_FILENAME if name is None else f"gradguard-{name}.json"
        self.sinks: list[Sink] = []
        self._label = label
        self._labels: dict[Any, str] = {}
        self._latest: dict[Any, StepCheck] = {}  # optimizer -> its latest measured check since the last log step
        self._staged: deque[tuple[StagedMetrics, int]] = deque()
        self._layout: Optional[tuple[int, LogLayout]] = None
        self._requesting: list[Sink] = []  # the sinks that ask for statistics or see every step
        self._stepping: list[Sink] = []

    # ------------------------------------------------------------------ set-up
    def add(self, sink: Sink) -> Sink:
        self.sinks.append(sink)
        return sink

    def start(self, amp: bool = False) -> None:
        """Training starts: the sinks learn the run (the dashboard writes its layout)."""
        registry = self.engine.registry
        run = RunInfo(
            names=registry.names,
            shown=[n for n, allowed in zip(registry.names, registry.allowed) if not allowed],
            prefix=self.prefix,
            report_file=self.report_file,
            amp=amp,
            report=self.engine.report,
        )
        self._requesting = [s for s in self.sinks if type(s).request is not Sink.request] if self.writes else []
        self._stepping = [s for s in self.sinks if type(s).write_step is not Sink.write_step] if self.writes else []
        if self.writes:
            for sink in self.sinks:
                sink.start(run)

    # ------------------------------------------------------------------ steps
    def log_due(self, step: int) -> bool:
        """Whether ``step`` (0-based) is a logging step."""
        return self.logs and (step + 1) % self.every == 0

    def measure_due(self, step: int, ahead: int = 1) -> bool:
        """Whether the check at ``step`` must measure norms: a logging step comes within ``ahead`` steps (an
        optimizer stepping now is logged with these norms if the others step until the logging step)."""
        return self.logs and any((s + 1) % self.every == 0 for s in range(step, step + max(ahead, 1)))

    def extras(self, step: int) -> Optional[Callable[[StepCheck], Optional[StatsRequest]]]:
        """What the sinks want measured at ``step`` beyond the norms, asked with the classified check."""
        if not self._requesting:
            return None

        def ask(check: StepCheck) -> Optional[StatsRequest]:
            requests = [r for r in (s.request(check, step) for s in self._requesting) if r is not None]
            if not requests:
                return None
            histograms = [series for r in requests for series in r.histograms]
            return StatsRequest(flow=any(r.flow for r in requests), histograms=histograms)

        return ask

    def after_check(self, check: StepCheck, step: int) -> None:
        """A step was checked: keep its norms for the next logging step; the sinks see it (the dashboard's
        pictures, the report at the first missing gradient)."""
        if check.measured and self.logs:
            self._latest[check.optimizer] = check
        for sink in self._stepping:
            sink.write_step(check, step)

    def end_due(self, step: int, log: bool) -> bool:
        """Whether :meth:`end_step` has anything to do after ``step`` (most steps: nothing)."""
        collective = self.context is not None and self.context.reduces and (step + 1) % self.every == 0
        return log or collective or bool(self._staged)

    def end_step(self, step: int, log: Optional[bool] = None, scalars: Optional[Mapping[str, Tensor]] = None) -> None:
        """The step numbered ``step`` is over (every optimizer that steps in it has stepped): :meth:`reduce`, then
        :meth:`write` (adapters that isolate failures call the two apart: a rank whose logging failed must still
        take part in the collective)."""
        log = self.log_due(step) if log is None else log
        self.reduce(step, log)
        self.write(step, log, scalars)

    def reduce(self, step: int, log: bool) -> None:
        """Under DDP/FSDP, on every rank at the same steps: counts and the logging step's norms become global."""
        if self.context is not None and (log or (step + 1) % self.every == 0):
            self.context.reduce(list(self._latest.values()) if log else [])

    def write(self, step: int, log: bool, scalars: Optional[Mapping[str, Tensor]] = None) -> None:
        """At a logging step, stage the latest checks of every optimizer that stepped since the previous one;
        write the logging steps whose values have landed. ``scalars``: further device values to log (the AMP
        skipped-step count), by name under the guard's prefix."""
        if log:
            checks, self._latest = list(self._latest.values()), {}
            if self.writes and checks:
                named = {f"{self.prefix}/{key}": value for key, value in (scalars or {}).items()}
                labels = [self._label_of(c.optimizer) for c in checks]
                staged = StagedMetrics(self.engine, checks, named, prefix=self.prefix, layout=self._log_layout(),
                                       labels=labels)
                self._staged.append((staged, step))
        self._write_landed(wait=len(self._staged) > _MAX_IN_FLIGHT)

    def _write_landed(self, wait: bool = False) -> None:
        while self._staged and (wait or self._staged[0][0].ready()):
            staged, step = self._staged.popleft()
            metrics = staged.result()
            for sink in self.sinks:
                sink.write_metrics(metrics, step)
            wait = wait and len(self._staged) > _MAX_IN_FLIGHT

    def _log_layout(self) -> LogLayout:
        size = len(self.engine.registry)
        if self._layout is None or self._layout[0] != size:  # parameters added since: decide the series again
            self._layout = (size, layout_for(self.engine))
        return self._layout[1]

    def _label_of(self, optimizer: Any) -> str:
        label = self._labels.get(optimizer)
        if label is None:
            label = self._label(optimizer) if self._label is not None else f"optimizer_{len(self._labels)}"
            self._labels[optimizer] = label
        return label

    # ------------------------------------------------------------------ reports
    def stopped(self, report: GradReport, step: int) -> None:
        """Strict mode stopped training: the report reaches the sinks that show intermediate reports."""
        if self.writes:
            for sink in self.sinks:
                sink.write_report(report, step, f"GradGuard stopped training at step {step}")

    def finish(self, report: GradReport, step: int) -> None:
        """Training ended: what is still in flight is written, then the final report, and the sinks close."""
        self._latest = {}
        while self._staged:
            self._write_landed(wait=True)
        if self.writes:
            for sink in self.sinks:
                sink.write_report(report, step, None)
            for sink in self.sinks:
                sink.close()
        release(self)

    def drop(self) -> None:
        """Forget what waits to be logged (a run that raised: nothing more is written for it)."""
        self._latest = {}
        self._staged.clear()


# ---------------------------------------------------------------------------------------------- destinations
_claims: dict[Hashable, list[weakref.ref]] = {}


def claim(reporter: Reporter, destinations: Sequence[tuple[Hashable, str]]) -> None:
    """Reserve ``destinations`` (``(key, description)``) for ``reporter``'s tags and report file.

    Raises:
        ValueError: another live guard with the same name (or also without one) writes there.

    """
    for key, where in destinations:
        for ref in _claims.get(key, []):
            other = ref()
            if other is None or other is reporter or other.name != reporter.name:
                continue
            if reporter.name is None:
                raise ValueError(
                    f"another GradGuard without a name already writes to {where}: the two would log the same tags "
                    "and overwrite each other's gradguard.json. Give each guard its own name (GradGuard(name="
                    "'generator'), watch(..., name='generator'), watch_fabric(..., name='generator')), or watch "
                    "several models with one guard: watch_fabric(fabric, [generator, discriminator], [opt_g, opt_d])"
                )
            raise ValueError(
                f"two GradGuards named {reporter.name!r} write to {where}: give them different names"
            )
    for key, _ in destinations:
        refs = [r for r in _claims.get(key, []) if r() is not None]
        refs.append(weakref.ref(reporter))
        _claims[key] = refs


def release(reporter: Reporter) -> None:
    """Give up ``reporter``'s destinations (its run ended)."""
    for key in list(_claims):
        refs = [r for r in _claims[key] if r() is not None and r() is not reporter]
        if refs:
            _claims[key] = refs
        else:
            del _claims[key]
