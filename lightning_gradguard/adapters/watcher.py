"""What the adapters for loops GradGuard does not own have in common: plain PyTorch, Fabric, the Hugging Face Trainer.

A :class:`Watcher` holds the engine, the reporter and the training context, numbers the steps, and offers the few
calls an adapter translates its loop's events into:

* :meth:`Watcher.start_micro_batch`, :meth:`Watcher.backward_started`, :meth:`Watcher.backward_ended` around each
  backward pass,
* :meth:`Watcher.before_step` right before an optimizer steps (the check; strict mode raises from here) and
  :meth:`Watcher.after_step` once it has stepped (logging, the collective of a logging step),
* :meth:`Watcher.close` at the end.

The adapters (:mod:`~lightning_gradguard.adapters.loop`, :mod:`~lightning_gradguard.adapters.fabric`) only install
their framework's hooks and call these; they override nothing.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor, nn

from lightning_gradguard.adapters.optimizer_steps import OptimizerSteps
from lightning_gradguard.adapters.patching import warn_at_user_code
from lightning_gradguard.config import GuardConfig
from lightning_gradguard.core.engine import NO_BACKWARD_HINT, GradGuardEngine
from lightning_gradguard.errors import GradGuardError, GradGuardWarning
from lightning_gradguard.isolation import feature
from lightning_gradguard.output.reporter import Reporter, claim, release
from lightning_gradguard.output.sinks.console import ConsoleSink
from lightning_gradguard.output.sinks.json_file import JsonSink
from lightning_gradguard.output.sinks.loggers import LoggerSink
from lightning_gradguard.output.sinks.tensorboard import (
    ScalarWriterSink,
    TensorBoardDashboard,
    open_writer,
    tensorboard_writers,
    writer_log_dir,
)
from lightning_gradguard.report import GradReport
from lightning_gradguard.training.collective import Collective
from lightning_gradguard.training.context import TrainingContext
from lightning_gradguard.training.precision import FusedStepSkips, LossScaleTracker
from lightning_gradguard.training.strategies import DDP, FSDP, FSDP2, StrategyInfo

DEFAULT_LOG_EVERY_N_STEPS = 50  # Lightning's default cadence


class Watcher:
    """The engine, reporter and context of one guarded loop, and the calls that drive them.

    Args:
        model: the module whose parameter names the report uses (unwrapped from DDP and the like).
        optimizers: the optimizers whose steps are checked.
        config: the validated options.
        writes: this process writes logs, the report and warnings (global rank zero).
        strategy: how the model is distributed.
        log_dir: write TensorBoard scalars, the dashboard and the report file here.
        writer: a ``SummaryWriter`` to write to instead (the report file goes to its log directory).
        loggers: Lightning loggers to log through (Fabric's), with their TensorBoard dashboard and log directory.
        ddp_fix: how the user turns on DDP's search for unused parameters in their framework.
        scale: the AMP loss-scale tracker, when the loop runs under a ``GradScaler`` the adapter can see.
        late_backward: the adapter notices a backward pass only once it runs (hooks inside autograd).
        report_dir: write the report file here instead of the log directory (the Hugging Face Trainer's
            ``output_dir``, next to its checkpoints, while TensorBoard logs go to their own directory).
        no_backward_hint: what, in this loop, leaves a step without a backward pass (see the engine).
        joinable: the ``DistributedDataParallel`` module the loop may train under ``join()`` (uneven inputs).

    """

    def __init__(
        self,
        model: nn.Module,
        optimizers: Sequence[torch.optim.Optimizer],
        config: GuardConfig,
        *,
        writes: bool,
        strategy: StrategyInfo,
        log_dir: Optional[str] = None,
        writer: Any = None,
        loggers: Sequence[Any] = (),
        ddp_fix: str = "DistributedDataParallel(model, find_unused_parameters=True)",
        scale: Optional[LossScaleTracker] = None,
        late_backward: bool = False,
        report_dir: Optional[str] = None,
        no_backward_hint: str = NO_BACKWARD_HINT,
        joinable: Any = None,
    ) -> None:
        self.config = config
        self.optimizers = list(optimizers)
        self.writes = writes
        self.scale = scale
        self.fused_skips = FusedStepSkips()  # without a scaler the adapter sees: what fused optimizers say
        self.engine = GradGuardEngine(config, warn=self._warn, no_backward_hint=no_backward_hint)
        self.global_step = 0  # optimizer steps checked, all optimizers together (Lightning's global_step)
        self.report_path: Optional[str] = None
        self._disabled: set[str] = set()
        self._closed = False
        self._handles: list[Any] = []
        self.steps = OptimizerSteps(self)  # what the adapters' optimizer step hooks do
        self._step: Optional[tuple[int, bool]] = None  # the step being taken: (number, logging step)
        self._json: Optional[JsonSink] = None
        self.engine.bind(model.named_parameters(), module=model)  # opens the first diagnosis window
        try:
            self._require_trainable(model)
            self._measure_every_step = config.measures_every_step(self.engine.registry.params) or scale is not None
            self.context = self._context(strategy, ddp_fix, joinable)
            # the step check reuses the gradients read at the end of the last backward pass if the .grad attributes
            # still hold them (zero_grad invalidates the read; `p.grad = None` is caught by the check), except where
            # gradients are rewritten after the backward pass the adapter brackets: DDP's reducer, FSDP's views
            self.engine.start_run(
                reuse_backward_read=not strategy.distributed, late_backward=late_backward, verify_backward_read=True
            )
            self._audit()
            self.reporter = self._reporter(log_dir, writer, loggers, report_dir)
        except BaseException:
            self.engine.end_diagnosis()  # a guard that was never built leaves no instrument behind
            if getattr(self, "context", None) is not None:
                self.context.release()
            raise

    # ------------------------------------------------------------------ set-up
    @feature("audit")
    def _audit(self) -> None:
        self.engine.audit(self.optimizers)  # unregistered tensors, parameters in no optimizer

    def _require_trainable(self, model: nn.Module) -> None:
        registered = {id(p) for p in model.parameters()}
        for optimizer in self.optimizers:
            _, params = self.engine.registry.optimizer_params(optimizer)
            if any(p.requires_grad and id(p) in registered for p in params):
                return
        raise ValueError(
            "the optimizers hold no trainable parameter of `model`: nothing for GradGuard to check (pass the model "
            "whose parameters the optimizers update)"
        )

    def _context(self, info: StrategyInfo, ddp_fix: str, joinable: Any) -> Optional[TrainingContext]:
        # several processes (DDP, FSDP): counts, norms and strict decisions become global through one collective
        # per logging step, as in the Trainer callback
        if not info.distributed or info.name not in (DDP, FSDP, FSDP2) or not Collective.available():
            return None
        device = next((p.device for p in self.engine.registry.params if p.device.type != "meta"), None)
        return TrainingContext(self.engine, info, collective=Collective(device=device), warn=self._warn,
                               ddp_fix=ddp_fix, joinable=joinable)

    def _reporter(
        self, log_dir: Optional[str], writer: Any, loggers: Sequence[Any], report_dir: Optional[str] = None
    ) -> Reporter:
        config = self.config
        reporter = Reporter(
            self.engine,
            every=config.log_every_n_steps or DEFAULT_LOG_EVERY_N_STEPS,
            logs=log_dir is not None or writer is not None or bool(loggers),
            name=config.name,
            writes=self.writes,
            context=self.context,
            label=lambda opt: f"optimizer_{self.optimizers.index(opt)}" if opt in self.optimizers else "optimizer",
        )
        if self.writes:
            destinations: list[tuple[Any, str]] = []
            if log_dir is not None and writer is None:
                writer = open_writer(log_dir)
                if writer is not None:
                    reporter.add(ScalarWriterSink(writer, owned=True))
            elif writer is not None:
                reporter.add(ScalarWriterSink(writer))
                log_dir = writer_log_dir(writer)
            if writer is not None:
                destinations.append((("writer", id(writer)), f"the SummaryWriter of {log_dir or 'this run'}"))
            if loggers:
                reporter.add(LoggerSink(loggers))
                destinations += [(("logger", id(logger)), f"the logger {type(logger).__name__}") for logger in loggers]
                log_dir = log_dir or next((getattr(lg, "log_dir", None) for lg in loggers), None)
            log_dir = report_dir or log_dir
            writers = ([writer] if writer is not None else []) + tensorboard_writers(loggers)
            if writers:
                reporter.add(TensorBoardDashboard(writers, config.histogram_every_n_steps,
                                                  config.gradient_flow_every_n_steps, config.max_logged_series))
            if log_dir is not None:  # written before the console summary, which names it
                self._json = JsonSink(os.fspath(log_dir))
                reporter.add(self._json)
                destinations.append((("dir", os.path.realpath(os.fspath(log_dir))), f"the directory {log_dir}"))
            if config.summary:
                json_sink = self._json
                reporter.add(ConsoleSink(lambda: json_sink.target if json_sink is not None else None))
            claim(reporter, destinations)
        reporter.start(amp=self.scale is not None)
        return reporter

    # ------------------------------------------------------------------ the calls adapters make
    @feature("check")
    def backward_started(self, loss: Any = None, new_micro_batch: bool = False) -> None:
        """A backward pass that writes ``.grad`` starts (``loss``: its root tensor, or that tensor's ``grad_fn``, when
        the adapter sees it).

        ``new_micro_batch``: it belongs to a new micro-batch (its forward pass ran since the previous backward).
        """
        if new_micro_batch and self.context is not None:  # DDP: this micro-batch's own arrivals, per rank
            self.context.start_micro_batch()
        self.engine.before_backward(loss, new_micro_batch=new_micro_batch)

    def _bracket_unseen(self) -> None:
        self.unseen_backward()  # adapters that restart windows at backward passes restart them first

    @feature("check")
    def unseen_backward(self) -> None:
        """A backward pass ran that the adapter did not see (found at the step): count it as one micro-batch.
        (Under DDP the ledger's autograd hooks saw it, in the micro-batch it records now.)"""
        self.engine.bracket_unseen()

    @feature("check")
    def backward_ended(self) -> None:
        self.engine.after_backward()

    @feature("check")
    def gradients_zeroed(self, optimizer: torch.optim.Optimizer) -> None:
        """``optimizer.zero_grad(set_to_none=False)`` just ran."""
        if not self._closed:
            self.engine.gradients_zeroed(optimizer)

    def before_step(self, optimizer: torch.optim.Optimizer, grad_scale: Optional[Tensor] = None) -> None:
        """``optimizer`` is about to step: check it (strict mode raises here, before any weight changes).

        ``grad_scale``: the loss scale its gradients still carry (AMP with a fused optimizer), as a tensor.
        """
        if self._closed:
            return
        if self.scale is None:
            self.fused_skips.at_step(optimizer)
        try:
            self._check(optimizer, grad_scale)
        except GradGuardError as err:  # strict mode: the report reaches TensorBoard before the raise
            self._stopped(err)
            raise

    @feature("check")
    def _check(self, optimizer: torch.optim.Optimizer, grad_scale: Optional[Tensor]) -> None:
        step = self.global_step
        self.global_step += 1
        reporter = self.reporter
        due = reporter.log_due(step)
        self._step = (step, due)
        # with several ranks every rank measures on the same steps (rank zero alone logs): shard norms add up
        measure = self._measure_every_step or reporter.measure_due(step, ahead=len(self.optimizers))
        extras = reporter.extras(step) if "dashboard" not in self._disabled else None
        if self.engine.backward_unseen(optimizer):  # counted now: the gradients it left are what the step applies
            self._bracket_unseen()
        check = self.engine.check_step(optimizer, step=step, measure=measure, grad_scale=grad_scale, extras=extras)
        self._after_check(check, step)

    @feature("dashboard")
    def _after_check(self, check: Any, step: int) -> None:
        self.reporter.after_check(check, step)

    @feature("dashboard")
    def _stopped(self, err: GradGuardError) -> None:
        if err.report is not None:
            self.reporter.stopped(err.report, max(self.global_step - 1, 0))

    def after_step(self, scalars: Optional[dict[str, Tensor]] = None) -> None:
        """The optimizer stepped (or the AMP scaler skipped the step): log, and under DDP/FSDP reduce."""
        if self._closed or self._step is None:
            return
        if self.scale is not None:
            self.scale.settle()  # scaler.update() ran: the step counts as skipped if it overflowed
        if not self.reporter.end_due(*self._step):
            self._step = None
            return
        self._reduce()  # its own feature: if logging fails on one rank, the others must not wait for it
        self._write(scalars)
        self._step = None

    @feature("distributed")
    def _reduce(self) -> None:
        step, due = self._step  # type: ignore[misc]
        self.reporter.reduce(step, due)

    @feature("log")
    def _write(self, scalars: Optional[dict[str, Tensor]]) -> None:
        step, due = self._step  # type: ignore[misc]
        if due and (self.scale is not None or self.fused_skips.skipped_tensor() is not None):
            skipped = (self.scale or self.fused_skips).skipped_tensor()
            scalars = {**(scalars or {}), "amp_skipped_steps": skipped if skipped is not None else torch.zeros(())}
        self.reporter.write(step, due, scalars)

    # ------------------------------------------------------------------ reading out, closing
    @property
    def disabled(self) -> set[str]:
        """The features an internal error turned off (see :mod:`lightning_gradguard.isolation`)."""
        return self._disabled

    def report_internal_error(self, message: str) -> None:
        self._report_internal_error(message)

    def _report_internal_error(self, message: str) -> None:
        warnings.warn(message, GradGuardWarning, stacklevel=3)

    def report(self) -> GradReport:
        """The :class:`~lightning_gradguard.report.GradReport` for the steps so far."""
        report = self.engine.report()
        if self.scale is not None:
            report.amp_skipped_steps = self.scale.skipped_steps()
        else:
            report.amp_skipped_steps = self.fused_skips.skipped_steps()
        return report

    @property
    def closed(self) -> bool:
        return self._closed

    def at_exit(self) -> None:
        """The interpreter exits with this guard open: close it, without the collective."""
        if not self._closed:
            self._close(collective=False, finished=True)  # the loop ended without close(): its verdicts stand

    def close(self, summary: bool = True) -> GradReport:
        """Remove every hook, print the summary, write the report file and the dashboard's final report.

        Safe to call more than once; returns the final report. ``summary=False`` leaves the console summary out
        (the guard's ``summary`` option still decides when it is True). With several processes (DDP, FSDP) it makes one
        collective, so that the last steps' counts are global: call it on every rank, at the same point (as for
        ``torch.distributed.destroy_process_group``). A guard left open is closed at interpreter exit without a
        collective (its report then holds the counts of the last logging step plus this rank's own since).

        Raises:
            GradGuardError: in strict mode, when a parameter received gradients but never moved in this run (its
                param group's learning rate was 0 at every step, or every observed step skipped it).

        """
        return self._close(collective=True, summary=summary, finished=True)

    def undo(self) -> None:
        """A set-up that failed leaves nothing behind: hooks and instruments come off, the destinations are free."""
        self._closed = True
        self.engine.end_diagnosis()
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self.context is not None:
            self.context.release()
        release(self.reporter)

    def abandon(self, summary: bool = True) -> GradReport:
        """Close without the collective: the loop raised, or the interpreter exits (another rank may be gone)."""
        return self._close(collective=False, summary=summary)

    def _close(self, collective: bool, summary: bool = True, finished: bool = False) -> GradReport:
        if self._closed:
            return self.report()
        self._closed = True
        self.engine.end_diagnosis()  # a window still open (the loop raised or ended early): instruments come out
        self._finish_context(collective)
        for handle in self._handles:
            handle.remove()
        self._handles = []
        error = self.engine.finish_run() if finished else None  # weights that never moved, now the run is known
        report = self.report()
        self._finish(report, summary)
        if error is not None and collective:  # strict mode, once the report is out (not at interpreter exit)
            error.report = report
            raise error
        return report

    @feature("distributed")
    def _finish_context(self, collective: bool) -> None:
        if self.context is None:
            return
        if collective:  # every rank closes its guard at the same point: the last steps' counts become global
            self.context.finish()
        else:  # at interpreter exit, or the loop raised: another rank may be gone, so no collective
            self.context.release()

    @feature("report")
    def _finish(self, report: GradReport, summary: bool) -> None:
        if not summary:
            self.reporter.sinks = [sink for sink in self.reporter.sinks if not isinstance(sink, ConsoleSink)]
        self.reporter.finish(report, self.global_step)
        json_sink = getattr(self, "_json", None)
        self.report_path = json_sink.path if json_sink is not None else None

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> None:
        if exc_type is None:
            self.close()
            return
        # the loop raised: the user's exception must come out unchanged, and another rank may never get here
        try:
            self.abandon()
        except Exception:  # noqa: BLE001 - never replace the user's exception with one of ours
            pass

    def _warn(self, message: str) -> None:
        """Warnings come from the process that writes (global rank zero), pointing at the user's line."""
        if self.writes:
            warn_at_user_code(message)
