"""The Lightning Trainer adapter: translates Trainer hooks into engine calls and writes what the engine found."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any, Literal, Optional, Union

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

from lightning_gradguard.config import GuardConfig, LogGranularity, NonfiniteCheck
from lightning_gradguard.context import TrainingContext
from lightning_gradguard.engine import GradGuardEngine, StepCheck
from lightning_gradguard.errors import GradGuardError, GradGuardWarning
from lightning_gradguard.isolation import feature
from lightning_gradguard.metrics import stage_metrics
from lightning_gradguard.report import GradReport
from lightning_gradguard.sinks import log_to_loggers, print_summary, write_report
from lightning_gradguard.sinks.tensorboard import TensorBoardDashboard, tensorboard_writers
from lightning_gradguard.strategies import DDP, SINGLE


def _batches_started(trainer: Trainer) -> Optional[int]:
    """Training batches Lightning has started in this fit (None if this Lightning version does not say)."""
    progress = getattr(getattr(trainer.fit_loop.epoch_loop, "batch_progress", None), "total", None)
    return getattr(progress, "started", None)


def _zero_grad_sets_none(pl_module: LightningModule, optimizer: torch.optim.Optimizer) -> bool:
    """Whether the ``zero_grad`` Lightning is about to run leaves every gradient of ``optimizer`` None: neither the
    LightningModule's ``optimizer_zero_grad`` nor the optimizer's ``zero_grad`` is overridden, and torch's
    ``zero_grad`` sets gradients to None by default."""
    return (
        type(pl_module).optimizer_zero_grad is LightningModule.optimizer_zero_grad
        and type(optimizer).zero_grad is torch.optim.Optimizer.zero_grad
    )




class GradGuard(Callback):
    r"""Names every trainable parameter that receives no gradient, and logs per-parameter gradient norms.

    At every optimizer step (``on_before_optimizer_step``, before the weights change) it checks the parameters of
    the optimizer about to step; after every backward pass (``on_after_backward``) it records which parameters
    that micro-batch gave a gradient, so that with ``accumulate_grad_batches=k`` it can tell "no gradient in all
    k micro-batches" from "in some". Logging goes through every logger in ``trainer.loggers`` at Lightning's step
    numbering, with one device-to-host copy per logging step; at the end of fit it prints a summary and writes
    ``gradguard.json`` to the log directory.

    Args:
        strict: raise :class:`~lightning_gradguard.GradGuardError` at the first step where a checked parameter has
            no gradient, before the optimizer changes any weight. Otherwise warn once per parameter.
        allow_none: ``fnmatch`` patterns of parameter names never reported (optional heads, MoE experts).
        log_every_n_steps: logging cadence in optimizer steps; ``None`` follows ``Trainer(log_every_n_steps)``.
        norm_type: the p of the per-parameter p-norm: a positive float or ``"inf"``.
        nonfinite_check: ``"auto"``, ``"every_step"`` or ``"log_steps"``: when gradient values are read to count
            NaN/Inf (see :class:`~lightning_gradguard.config.GuardConfig`).
        log_granularity: ``"auto"``, ``"param"`` or ``"module"``.
        log_module_depth: module depth for per-module aggregates; ``None`` picks one automatically.
        max_logged_series: the most norm series one logging step writes under ``"auto"``.
        histogram_every_n_steps: with a ``TensorBoardLogger``, write gradient histograms every n steps (``None``:
            never).
        gradient_flow_every_n_steps: with a ``TensorBoardLogger``, draw the gradient-flow image every n steps and
            at the first missing gradient (``None``: never); needs matplotlib.
        summary: print the report at the end of fit (rank zero).

    Raises:
        TypeError: an argument has the wrong type (or an unknown keyword was passed).
        ValueError: an argument is out of range, e.g. ``norm_type <= 0`` or ``log_every_n_steps=0``.

    Example::

        from lightning import Trainer
        from lightning_gradguard import GradGuard

        guard = GradGuard(allow_none=["heads.optional.*"])
        trainer = Trainer(callbacks=[guard], accumulate_grad_batches=4)
        trainer.fit(model, datamodule)
        print(guard.report().missing)

    """

    def __init__(
        self,
        strict: bool = False,
        allow_none: Union[str, Iterable[str]] = (),
        log_every_n_steps: Optional[int] = None,
        norm_type: Union[float, Literal["inf"]] = 2.0,
        nonfinite_check: NonfiniteCheck = "auto",
        log_granularity: LogGranularity = "auto",
        log_module_depth: Optional[int] = None,
        max_logged_series: int = 256,
        histogram_every_n_steps: Optional[int] = None,
        gradient_flow_every_n_steps: Optional[int] = None,
        summary: bool = True,
    ) -> None:
        super().__init__()
        self.config = GuardConfig.create(
            strict=strict,
            allow_none=allow_none,
            log_every_n_steps=log_every_n_steps,
            norm_type=norm_type,
            nonfinite_check=nonfinite_check,
            log_granularity=log_granularity,
            log_module_depth=log_module_depth,
            max_logged_series=max_logged_series,
            histogram_every_n_steps=histogram_every_n_steps,
            gradient_flow_every_n_steps=gradient_flow_every_n_steps,
        )
        if not isinstance(summary, bool):
            raise TypeError(f"`summary` must be True or False, got {summary!r}")
        self.summary = summary
        self.engine = GradGuardEngine(self.config, warn=_warn)
        self._disabled: set[str] = set()
        self._pending_logs: list[StepCheck] = []
        self._log_step: Optional[int] = None
        self._unwritten: list[tuple[Any, int]] = []  # (StagedMetrics, step): values still on their way to the host
        self._batches_started: Optional[int] = None
        self._cleared: Optional[torch.optim.Optimizer] = None  # its zero_grad(set_to_none) ran in this micro-batch
        self._measure_every_step = self.config.nonfinite_check == "every_step"  # decided at fit start
        self.report_path: Optional[str] = None
        self._dashboard: Optional[TensorBoardDashboard] = None  # set when a TensorBoardLogger is in trainer.loggers
        # precision and strategy knowledge for the current fit (lightning_gradguard.context)
        self._context: Optional[TrainingContext] = None
        self._context_state: dict[str, Any] = {}  # restored from a checkpoint until the fit builds its context
        self._reduce_due = False  # the cross-rank reduction is due at the end of this batch

    # ------------------------------------------------------------------ public
    def _report_internal_error(self, message: str) -> None:
        _warn(message)

    def report(self) -> GradReport:
        """The :class:`~lightning_gradguard.report.GradReport` for the run so far."""
        return self.engine.report()

    @property
    def state_key(self) -> str:
        # Lightning reads this at every hook call (profiler names): build it once, the config is frozen
        key = self.__dict__.get("_state_key")
        if key is None:
            key = self.__dict__["_state_key"] = self._generate_state_key(
                allow_none=self.config.allow_none, strict=self.config.strict
            )
        return key

    def state_dict(self) -> dict[str, Any]:
        extra = self._context.state_dict() if self._context is not None else self._context_state
        return {**self.engine.state_dict(), **extra}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.engine.load_state_dict(state_dict)
        self._context_state = {k: v for k, v in state_dict.items() if k == "amp_skipped_steps"}

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # The state key includes allow_none and strict, so resuming with `strict=True` turned on (to stop at the
        # bad step) would silently restart every count. When the checkpoint holds exactly one GradGuard state and
        # none under this key, continue from it. (Lightning calls load_state_dict after this hook; it finds
        # nothing under our key and does not overwrite.)
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states:
            return
        ours = [key for key in states if isinstance(key, str) and key.startswith(f"{type(self).__qualname__}{{")]
        if len(ours) == 1:
            self.load_state_dict(copy.deepcopy(states[ours[0]]))

    # ------------------------------------------------------------------ Trainer hooks
    @feature("check")
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # after the strategy has wrapped the model: the parameter objects are now the ones optimizers hold
        self.engine.bind(pl_module.named_parameters(), module=pl_module)
        self.engine.start_run()  # a guard reused for a second fit: windows restart, counts carry on
        self._batches_started = None
        self._measure_every_step = self.config.measures_every_step(self.engine.registry.params)
        self._start_context(trainer)
        self.engine.reuse_backward_read = self._nothing_between_backward_and_step(trainer, pl_module)
        self._start_dashboard(trainer)
        self._audit(trainer)

    def _start_context(self, trainer: Trainer) -> None:
        # precision (AMP loss scale) and strategy (DDP, FSDP, DeepSpeed): what a gradient means in this fit
        if self._context is not None:  # a reused guard: counts carry on, and so do the skipped AMP steps
            self._context_state = self._context.state_dict()
            self._context.detach()
        self._context = TrainingContext.from_trainer(
            trainer, self.engine, warn=_warn, restored=self._context_state
        )
        if self._context.measure_every_step and self.config.nonfinite_check == "auto":
            self._measure_every_step = True

    def _nothing_between_backward_and_step(self, trainer: Trainer, pl_module: LightningModule) -> bool:
        """Whether no code can change a ``.grad`` between this guard's ``on_after_backward`` and its step check.

        Under automatic optimization Lightning runs, in between, only the ``on_after_backward`` of the callbacks
        after this one and of the LightningModule, and the ``on_before_optimizer_step`` of the callbacks before
        this one (gradient clipping comes after the check). When none of them is overridden, the gradients read
        right after backward are still those at the step, and the check need not read every ``.grad`` again.
        Strategies that re-point gradients after backward (FSDP's views, DeepSpeed) always read again.
        """
        context = self._context
        if not pl_module.automatic_optimization or context is None or context.info.name not in (SINGLE, DDP):
            return False
        if _overrides(pl_module, "on_after_backward"):
            return False
        callbacks = list(trainer.callbacks)
        position = next((i for i, callback in enumerate(callbacks) if callback is self), None)
        if position is None:
            return False
        after = callbacks[position + 1 :]
        before = callbacks[:position]
        return not any(_overrides(c, "on_after_backward") for c in after) and not any(
            _overrides(c, "on_before_optimizer_step") for c in before
        )

    @feature("audit")
    def _audit(self, trainer: Trainer) -> None:
        self.engine.audit(trainer.optimizers)  # unregistered tensors, parameters in no optimizer

    @feature("diagnosis")
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._explain_exception(trainer, exception)
        self.engine.end_diagnosis()  # a step raised: no diagnosis instrument may outlive it

    @feature("distributed")
    def _explain_exception(self, trainer: Trainer, exception: BaseException) -> None:
        if self._context is not None:  # DDP's unused-parameter error: add the names Lightning's message drops
            self._context.on_exception(trainer, exception)
            self._context.release()

    @feature("check")
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        # Lightning counts a batch as started after every on_train_batch_start hook; when the LightningModule's
        # hook returned -1 (skip the rest of the epoch) the count did not move, and the batch never ran
        started = _batches_started(trainer)
        if started is not None and started == self._batches_started:
            self.engine.cancel_micro_batch()
        self._batches_started = started
        self._cleared = None
        self.engine.start_micro_batch()
        if self._context is not None:  # under DDP, each micro-batch's own gradients are recorded per rank
            self._context.start_micro_batch()

    @feature("check")
    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        cleared, self._cleared = self._cleared, None
        self.engine.before_backward(loss, cleared=cleared)

    @feature("check")
    def on_before_zero_grad(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # Lightning zeroes the gradients right before this micro-batch's backward pass; when that sets every one of
        # `optimizer`'s to None, the snapshot before backward does not need to read them (10k tensors: 0.5-2 ms)
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer wraps the user's
        self._cleared = optimizer if _zero_grad_sets_none(pl_module, optimizer) else None

    @feature("check")
    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.engine.after_backward()

    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # strategies that accumulate internally (DeepSpeed) call this hook on every micro-batch
        if getattr(trainer.strategy, "handles_gradient_accumulation", False) and trainer.fit_loop._should_accumulate():
            return
        try:
            self._check(trainer, pl_module, optimizer)
        except GradGuardError as err:  # strict mode: the report reaches TensorBoard before the run stops
            self._dashboard_report(trainer, err.report, f"GradGuard stopped training at step {err.step}")
            raise

    @feature("check")
    def _check(self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer) -> None:
        context = self._context
        if context is not None and not context.checks_gradients:  # DeepSpeed: p.grad is not where gradients are
            return
        should_log = self._should_log(trainer)
        log = "log" not in self._disabled and should_log
        measure = log or self._measure_every_step
        check = self.engine.check_step(
            optimizer,
            step=trainer.global_step,
            accumulate=trainer.accumulate_grad_batches,
            measure=measure,
            grad_scale=context.grad_scale(optimizer) if context is not None else None,
        )
        if context is not None:
            context.after_check(check, measured=measure)
            stepped = trainer.fit_loop.epoch_loop._batches_that_stepped
            every = self.config.log_every_n_steps or trainer.log_every_n_steps
            # decided alike on every rank (never from this rank's own state): the reduction is a collective
            self._reduce_due = self._reduce_due or should_log or context.reduce_due(stepped, every)
        self._dashboard_check(trainer, check)
        if log:
            self._pending_logs.append(check)
            self._log_step = trainer.fit_loop.epoch_loop._batches_that_stepped

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._reduce(trainer)  # its own feature: if logging fails on one rank, the others must not wait for it
        self._log_batch_end(trainer)

    @feature("log")
    def _log_batch_end(self, trainer: Trainer) -> None:
        self._flush_logs(trainer)

    @feature("distributed")
    def _reduce(self, trainer: Trainer) -> None:
        if self._context is None:
            return
        self._context.settle()  # the AMP scaler has finished this batch's steps
        if self._reduce_due:  # the one collective of a logging step: counts and norms become global
            self._reduce_due = False
            self._context.reduce(self._pending_logs)

    def _flush_logs(self, trainer: Trainer, wait: bool = False) -> None:
        if self._pending_logs:
            checks, self._pending_logs = self._pending_logs, []
            if trainer.is_global_zero:  # the counts and norms are global by now: rank zero writes them
                scalars = self._context.log_scalars() if self._context is not None else None
                # the copy to the host starts now and is written once it has landed (on the CPU: right away), so
                # the GPU never waits for logging
                self._unwritten.append((stage_metrics(self.engine, checks, scalars), self._log_step or 0))
        while self._unwritten and (wait or self._unwritten[0][0].ready()):
            staged, step = self._unwritten.pop(0)
            if trainer.loggers:
                log_to_loggers(trainer.loggers, staged.result(), step=step)

    @feature("log")
    def _finish_logs(self, trainer: Trainer) -> None:
        self._flush_logs(trainer, wait=True)

    @feature("report")
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.engine.end_diagnosis()
        self._finish_logs(trainer)  # logging steps whose values were still in flight
        self._pending_logs = []
        self._finish_context()
        report = self.engine.report()  # every rank reads its device counters: a local, not collective, copy
        # Trainer.log_dir broadcasts from rank zero (a collective): every rank must ask, or rank zero waits forever
        log_dir = trainer.log_dir if trainer.loggers else None
        if not trainer.is_global_zero:
            return
        if self.summary:
            print_summary(report)
        if log_dir is not None:
            self.report_path = write_report(report, log_dir)
        self._dashboard_report(trainer, report, None)

    @feature("distributed")
    def _finish_context(self) -> None:
        if self._context is not None:  # every rank: the last steps' counts become global (a collective)
            self._context.finish()

    # ------------------------------------------------------------------ TensorBoard dashboard (rank zero)
    @feature("dashboard")
    def _start_dashboard(self, trainer: Trainer) -> None:
        writers = tensorboard_writers(trainer.loggers) if trainer.is_global_zero else []
        if not writers:
            self._dashboard = None
            return
        self._dashboard = TensorBoardDashboard(
            writers, self.engine, self.config.histogram_every_n_steps, self.config.gradient_flow_every_n_steps
        )
        self._dashboard.start(amp=getattr(trainer.precision_plugin, "scaler", None) is not None)

    @feature("dashboard")
    def _dashboard_check(self, trainer: Trainer, check: StepCheck) -> None:
        if self._dashboard is not None:
            self._dashboard.after_check(check, trainer.fit_loop.epoch_loop._batches_that_stepped)

    @feature("dashboard")
    def _dashboard_report(self, trainer: Trainer, report: Optional[GradReport], title: Optional[str]) -> None:
        if self._dashboard is None or report is None:
            return
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        if title is None:
            self._dashboard.finish(report, step)
        else:
            self._dashboard.write_report(report, step, title)
            self._dashboard.flush()

    # ------------------------------------------------------------------ helpers
    def _should_log(self, trainer: Trainer) -> bool:
        if not trainer.loggers:
            return False
        every = self.config.log_every_n_steps or trainer.log_every_n_steps
        if not every:
            return False
        stepped = trainer.fit_loop.epoch_loop._batches_that_stepped
        return (stepped + 1) % every == 0 or trainer.should_stop


def _warn(message: str) -> None:
    rank_zero_warn(message, category=GradGuardWarning)


def _overrides(obj: Any, method: str) -> bool:
    """Whether `obj` or its class defines `method` anywhere below Lightning's own base classes (either namespace)."""
    if method in getattr(obj, "__dict__", {}):  # a hook assigned to the instance
        return True
    for cls in type(obj).__mro__:
        if method in vars(cls):
            return not (cls.__module__ or "").startswith(_FRAMEWORK_BASES)
    return False


# where Lightning's Callback / LightningModule hook stubs live (lightning.pytorch and pytorch_lightning)
_FRAMEWORK_BASES = ("lightning.pytorch.core.", "lightning.pytorch.callbacks.callback", "pytorch_lightning.core.",
                    "pytorch_lightning.callbacks.callback")
