"""The Lightning Trainer adapter: translates Trainer hooks into engine and reporter calls."""

from __future__ import annotations

import copy
import functools
import sys
import weakref
from typing import Any, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

from lightning_gradguard.adapters.lightning_loop import (
    backward_skipped,
    batches_started,
    nothing_between_backward_and_step,
    pl_module_skips_batches,
    zero_grad_sets_none,
)
from lightning_gradguard.adapters.lightning_output import trainer_reporter
from lightning_gradguard.adapters.user_frames import package_dirs, user_stacklevel
from lightning_gradguard.config import OPTIONS, AllowNone, GuardConfig, LogGranularity, NonfiniteCheck, NormType
from lightning_gradguard.core.engine import GradGuardEngine
from lightning_gradguard.errors import GradGuardError, GradGuardWarning
from lightning_gradguard.isolation import feature
from lightning_gradguard.output.reporter import Reporter, claim, release
from lightning_gradguard.output.sinks.json_file import JsonSink
from lightning_gradguard.report import GradReport
from lightning_gradguard.training.context import TrainingContext
from lightning_gradguard.training.strategies import DDP, SINGLE

_SKIPPED_BY_NONE = "training_step returned None (Lightning skips such a batch)"
_RETURN_THE_LOSS = "If that is not meant to happen, make the training step return its loss on every batch."
_SKIPPED_BY_LIGHTNING = "Lightning skipped their backward pass on purpose (as StochasticWeightAveraging does in its " \
    "extra epoch, which recomputes batch-norm statistics)"


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
            no gradient, before the optimizer changes any weight, and at the end of fit for parameters that received
            gradients but never moved (a param group at ``lr=0``). Otherwise warn once per parameter.
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
        name: a name for this guard, when several share a Trainer's loggers: metrics under ``gradguard/<name>/``,
            the report in ``gradguard-<name>.json``.

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
        allow_none: AllowNone = (),
        log_every_n_steps: Optional[int] = None,
        norm_type: NormType = 2.0,
        nonfinite_check: NonfiniteCheck = "auto",
        log_granularity: LogGranularity = "auto",
        log_module_depth: Optional[int] = None,
        max_logged_series: int = 256,
        histogram_every_n_steps: Optional[int] = None,
        gradient_flow_every_n_steps: Optional[int] = None,
        summary: bool = True,
        name: Optional[str] = None,
    ) -> None:
        super().__init__()
        given = locals()
        self.config = GuardConfig.create(**{option: given[option] for option in OPTIONS})
        self.engine = GradGuardEngine(self.config, warn=_warn, no_backward_hint=_NO_BACKWARD_HINT)
        self.reporter: Optional[Reporter] = None  # built for each fit
        self.report_path: Optional[str] = None
        self._disabled: set[str] = set()
        self._batches_started: Optional[int] = None
        self._cleared: Optional[torch.optim.Optimizer] = None  # its zero_grad(set_to_none) ran in this micro-batch
        self._measure_every_step = self.config.nonfinite_check == "every_step"  # decided at fit start
        self._context: Optional[TrainingContext] = None  # precision and strategy knowledge for the current fit
        self._context_state: dict[str, Any] = {}  # restored from a checkpoint until the fit builds its context
        self._step: Optional[tuple[int, bool]] = None  # this batch's (step number, logging step) once it stepped
        self._checked: Optional[tuple[int, int]] = None  # (id of the optimizer, global step) of the last check
        self._skips_batches = False  # Lightning skips a batch whose training_step returns None (decided at fit start)
        self._trainable_at_setup: Optional[dict[int, bool]] = None  # requires_grad before the strategy wraps the model
        self._sent_away = False  # pickled (to ddp_spawn's processes): a run may happen elsewhere
        self._json: Optional[JsonSink] = None
        self._fit_optimizers: weakref.WeakSet = weakref.WeakSet()  # the optimizers a fit began with, or adopted
        self._evaluating = False  # validate/test/predict: a checkpoint they load holds no counts for this guard

    @property
    def summary(self) -> bool:
        return self.config.summary

    # ------------------------------------------------------------------ public
    def _report_internal_error(self, message: str) -> None:
        _warn(message)

    def report(self) -> GradReport:
        """The :class:`~lightning_gradguard.report.GradReport` for the run so far.

        Raises:
            RuntimeError: the guard was pickled or copied before any training in this process (a run with
                ``strategy="ddp_spawn"`` happens in the processes it starts): this object saw none of it, and an
                empty report would pass any check.

        """
        if self._sent_away and not len(self.engine.registry):
            raise RuntimeError(
                "this GradGuard was pickled or copied before it saw any training in this process, so it holds no "
                "counts: strategy='ddp_spawn' sends the callbacks to the processes it starts, and the guard ran "
                "there. Its report was printed there and written to gradguard.json in the run's log directory "
                "(trainer.log_dir): read it with GradReport.load(path)."
            )
        if self.engine.holds_unbound_counts:
            raise RuntimeError(
                "this GradGuard is a copy (pickled or deep-copied) that holds the counts of a run but has not seen "
                "its model, so it cannot name the parameters: read the report of the guard that trained, or "
                "gradguard.json in the run's log directory (a fit with this copy continues the counts)"
            )
        return self.engine.report()

    @functools.cached_property
    def state_key(self) -> str:  # type: ignore[override]
        # Lightning reads this at every hook call (profiler names): once cached, a plain instance attribute
        extra = {"name": self.config.name} if self.config.name is not None else {}
        return self._generate_state_key(allow_none=self.config.allow_none, strict=self.config.strict, **extra)

    def state_dict(self) -> dict[str, Any]:
        extra = self._context.state_dict() if self._context is not None else self._context_state
        return {**self.engine.state_dict(), **extra}

    def __getstate__(self) -> dict[str, Any]:
        # what crosses a process boundary (strategy="ddp_spawn" pickles the Trainer's callbacks): the options, the
        # counts, and what a subclass added; hooks, writers and norm kernels belong to the process that built them
        self._sent_away = True
        own = _own_attributes()
        extra = {key: value for key, value in self.__dict__.items() if key not in own}
        return {"config": self.config, "counts": self.state_dict(), "extra": extra}

    def __setstate__(self, state: dict[str, Any]) -> None:
        config = state["config"]
        GradGuard.__init__(self, **{option: getattr(config, option) for option in OPTIONS})
        self.__dict__.update(state.get("extra", {}))
        self.load_state_dict(state["counts"])

    def load_state_dict(self, state_dict: Any) -> None:
        """Continue the counts of a checkpoint; an unusable state is ignored with one warning (counting restarts
        from zero, checking stays on). The checkpoint that ``trainer.validate/test/predict(ckpt_path=...)`` loads
        is not applied: evaluating a checkpoint does not rewind the training counts."""
        if self._evaluating:
            return
        try:
            skipped = state_dict.get("amp_skipped_steps", 0) if isinstance(state_dict, dict) else 0
            if isinstance(skipped, bool) or not isinstance(skipped, int) or skipped < 0:
                raise ValueError(f"`amp_skipped_steps` must be a non-negative integer, got {skipped!r}")
            self.engine.load_state_dict(state_dict)
        except Exception as err:  # noqa: BLE001 - a bad checkpoint entry must never stop the resumed run
            _warn(
                f"GradGuard: the checkpoint's GradGuard state cannot be used ({err}); it is ignored, and counting "
                "starts from zero with checking on."
            )
            return
        self._context_state = {"amp_skipped_steps": skipped} if skipped else {}

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # The state key includes allow_none and strict, so resuming with `strict=True` turned on (to stop at the
        # bad step) would silently restart every count. When the checkpoint holds exactly one GradGuard state and
        # none under this key, continue from it. (Lightning calls load_state_dict after this hook; it finds
        # nothing under our key and does not overwrite.)
        states = checkpoint.get("callbacks") if isinstance(checkpoint, dict) else None
        if not isinstance(states, dict) or self._evaluating:
            return
        if self.state_key in states:
            entry = states[self.state_key]
            if not entry and not isinstance(entry, dict):  # Lightning skips a falsy entry (None, "", []) silently
                self.load_state_dict(entry)  # ... which is still unusable: say so
            return
        ours = [key for key in states if isinstance(key, str) and key.startswith(f"{type(self).__qualname__}{{")]
        if len(ours) == 1:
            self.load_state_dict(copy.deepcopy(states[ours[0]]))

    # ------------------------------------------------------------------ Trainer hooks
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        reporter, self._json = trainer_reporter(trainer, self.engine, self.config)
        claim(reporter, [(("logger", id(logger)), f"the logger {type(logger).__name__}") for logger in trainer.loggers])
        self.reporter = reporter
        self._start(trainer, pl_module)

    @feature("check")
    def _start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # after the strategy has wrapped the model: the parameter objects are now the ones optimizers hold
        self.engine.bind(pl_module.named_parameters(), module=pl_module)
        self._batches_started = None
        self._checked = None
        self._measure_every_step = self.config.measures_every_step(self.engine.registry.params)
        self._skips_batches = pl_module_skips_batches(trainer)
        self._start_context(trainer)
        # a guard reused for a second fit: windows restart, counts carry on
        self.engine.start_run(reuse_backward_read=self._nothing_between_backward_and_step(trainer, pl_module))
        self._fit_optimizers = weakref.WeakSet(trainer.optimizers)
        self._start_reporter(trainer)
        self._audit(trainer)

    def _start_context(self, trainer: Trainer) -> None:
        # precision (AMP loss scale) and strategy (DDP, FSDP, DeepSpeed): what a gradient means in this fit
        if self._context is not None:  # a reused guard: counts carry on, and so do the skipped AMP steps
            self._context_state = self._context.state_dict()
            self._context.detach()
        self._context = TrainingContext.from_trainer(trainer, self.engine, warn=_warn, restored=self._context_state)
        self._context.trainable_before_wrap = self._trainable_at_setup
        if self._context.measure_every_step and self.config.nonfinite_check == "auto":
            self._measure_every_step = True

    @feature("dashboard")
    def _start_reporter(self, trainer: Trainer) -> None:
        assert self.reporter is not None
        self.reporter.context = self._context
        self.reporter.start(amp=getattr(trainer.precision_plugin, "scaler", None) is not None)

    def _nothing_between_backward_and_step(self, trainer: Trainer, pl_module: LightningModule) -> bool:
        """Whether the step check may reuse the gradients read right after backward (see
        :func:`~lightning_gradguard.adapters.lightning_loop.nothing_between_backward_and_step`)."""
        context = self._context
        if context is None or context.info.name not in (SINGLE, DDP):  # FSDP's views, DeepSpeed: read again
            return False
        return nothing_between_backward_and_step(self, trainer, pl_module)

    @feature("audit")
    def _audit(self, trainer: Trainer) -> None:
        self.engine.audit(trainer.optimizers)  # unregistered tensors, parameters in no optimizer

    @feature("diagnosis")
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.engine.end_diagnosis()  # a step raised: no diagnosis instrument may outlive it
        self._explain_exception(trainer, exception)
        self._save_interrupted(exception)
        if self.reporter is not None:  # nothing more is logged for this run, and no collective is started
            self.reporter.drop()
            release(self.reporter)

    @feature("log")
    def _save_interrupted(self, exception: BaseException) -> None:
        # one process (Ctrl-C, a crash): the report file as it stands, for `gradguard report`; with several ranks the
        # counts become global only in a collective, which a run that raised must not start
        json_sink, reporter = self._json, self.reporter
        if json_sink is None or reporter is None or not reporter.writes:
            return
        if self._context is not None and self._context.reduces:
            return
        json_sink.write_report(self.engine.report(), self._step[0] if self._step is not None else -1, None)
        self.report_path = json_sink.path
        if isinstance(exception, KeyboardInterrupt) and self.report_path is not None:
            print(f"GradGuard: training was interrupted; the report so far is in {self.report_path}", flush=True)

    @feature("distributed")
    def _explain_exception(self, trainer: Trainer, exception: BaseException) -> None:
        if self._context is not None:  # DDP's unused-parameter error: add the names Lightning's message drops
            self._context.on_exception(trainer, exception)
            self._context.release()

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # before Lightning restores a checkpoint (ckpt_path=...) into the callbacks
        self._evaluating = stage != "fit"
        # before the strategy wraps the model: which parameters DDP will number (its error names them by index)
        self._trainable_at_setup = {id(p): p.requires_grad for p in pl_module.parameters()}

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._evaluating = False

    @feature("diagnosis")
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.engine.evaluation(True)

    @feature("diagnosis")
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.engine.evaluation(False)

    @feature("check")
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        # Lightning counts a batch as started after every on_train_batch_start hook; when the LightningModule's
        # hook returned -1 (skip the rest of the epoch) the count did not move, and the batch never ran
        started = batches_started(trainer)
        if started is not None and started == self._batches_started:
            self.engine.cancel_micro_batch()
        elif self._skips_batches or backward_skipped(trainer):  # the last batch ran no backward pass
            self.engine.drop_skipped_micro_batch()
        self._batches_started = started
        self._cleared = None
        self._step = None
        self.engine.start_micro_batch()
        if self._context is not None:  # under DDP, each micro-batch's own gradients are recorded per rank
            self._context.start_micro_batch()

    @feature("check")
    def on_before_zero_grad(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # Lightning zeroes the gradients right before this micro-batch's backward pass; when that sets every one of
        # `optimizer`'s to None, the snapshot before backward does not need to read them (10k tensors: 0.5-2 ms)
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer wraps the user's
        self._cleared = optimizer if zero_grad_sets_none(pl_module, optimizer) else None
        if self.engine.windows.backwards_since_step(optimizer):  # a window the loop left open (an epoch ended early
            self.engine.restart_window(optimizer, in_progress=True)  # by -1): the zero_grad drops what it holds

    @feature("check")
    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        cleared, self._cleared = self._cleared, None
        self.engine.before_backward(loss, cleared=cleared)

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
            self._check(trainer, optimizer)
        except GradGuardError as err:  # strict mode: the report reaches TensorBoard before the run stops
            self._stopped(err)
            raise

    @feature("check")
    def _check(self, trainer: Trainer, optimizer: torch.optim.Optimizer) -> None:
        context, reporter = self._context, self.reporter
        if context is None or reporter is None or not context.checks_gradients:  # DeepSpeed: not in p.grad
            return
        # Lightning calls this hook after every evaluation of the step's closure, and LBFGS evaluates it several
        # times inside one optimizer.step(): only the first is the step's check (the step count moves only after it)
        step = trainer.global_step
        if self._checked == (id(optimizer), step):
            return
        self._checked = (id(optimizer), step)
        # Lightning skips a batch whose training_step returned None (and still calls this hook): not a missing
        # gradient, once the run has trained (a run that never did forgot to return its loss, and is reported)
        skipped = backward_skipped(trainer)
        if self._skips_batches or skipped:  # this batch's training_step may have returned None, or all the window's
            self.engine.drop_skipped_micro_batch()
            reason = (_SKIPPED_BY_LIGHTNING, "") if skipped else (_SKIPPED_BY_NONE, _RETURN_THE_LOSS)
            if self.engine.skip_empty_window(optimizer, *reason):
                return
        if optimizer not in self._fit_optimizers:  # built during the fit (strategy.setup_optimizers for a new stage)
            self._fit_optimizers.add(optimizer)
            self.engine.optimizer_joined(optimizer)
        stepped = trainer.fit_loop.epoch_loop._batches_that_stepped
        # decided alike on every rank, whatever failed on this one: the reduction of a logging step is a collective
        due = reporter.log_due(stepped) or (reporter.logs and trainer.should_stop)
        self._step = (stepped, due)
        check = self.engine.check_step(
            optimizer,
            step=step,
            accumulate=trainer.accumulate_grad_batches,
            measure=due or self._measure_every_step,
            grad_scale=context.grad_scale(optimizer),
            extras=reporter.extras(stepped) if "dashboard" not in self._disabled else None,
        )
        self._after_check(check, stepped)

    @feature("dashboard")
    def _after_check(self, check: Any, stepped: int) -> None:
        if self.reporter is not None:
            self.reporter.after_check(check, stepped)

    @feature("dashboard")
    def _stopped(self, err: GradGuardError) -> None:
        if self.reporter is not None and err.report is not None and self._step is not None:
            self.reporter.stopped(err.report, self._step[0])

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._step is None or self.reporter is None or not self.reporter.end_due(*self._step):
            return
        self._reduce()  # its own feature: if logging fails on one rank, the others must not wait for it
        self._write()

    @feature("distributed")
    def _reduce(self) -> None:
        if self._context is not None:
            self._context.settle()  # the AMP scaler has finished this batch's steps
        step, due = self._step  # type: ignore[misc]
        self.reporter.reduce(step, due)  # type: ignore[union-attr]

    @feature("log")
    def _write(self) -> None:
        step, due = self._step  # type: ignore[misc]
        scalars = self._context.log_scalars() if due and self._context is not None else None
        self.reporter.write(step, due, scalars)  # type: ignore[union-attr]

    @feature("report")
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.engine.end_diagnosis()
        self._finish_context()
        error = self.engine.finish_run()  # weights that never moved: decided now that the whole run is known
        report = self.engine.report()  # every rank reads its device counters: a local, not collective, copy
        if self.reporter is not None:
            self.reporter.finish(report, trainer.fit_loop.epoch_loop._batches_that_stepped)
            json_sink = getattr(self, "_json", None)
            self.report_path = json_sink.path if json_sink is not None else None
        if error is not None:  # strict mode, once the report is out (every rank counted alike)
            error.report = report
            raise error

    @feature("distributed")
    def _finish_context(self) -> None:
        if self._context is not None:  # every rank: the last steps' counts become global (a collective)
            self._context.finish()


_NO_BACKWARD_HINT = "training_step returned None, or the optimizer stepped without manual_backward"


@functools.lru_cache(maxsize=1)
def _own_attributes() -> frozenset[str]:
    """The instance attributes GradGuard itself keeps (rebuilt, not copied, when a guard is unpickled)."""
    return frozenset(GradGuard(summary=False).__dict__) | {"state_key"}


def _warn(message: str) -> None:
    # at the user's trainer.fit(...) line; stacklevel 4 is rank_zero_warn's caller, this function
    skip = package_dirs("lightning_gradguard", "lightning", "pytorch_lightning", "lightning_fabric", "torch")
    rank_zero_warn(message, category=GradGuardWarning, stacklevel=user_stacklevel(5, sys._getframe(1), skip) or 4)
