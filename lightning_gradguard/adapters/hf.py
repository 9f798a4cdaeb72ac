"""The Hugging Face Trainer adapter: one callback in ``Trainer(callbacks=[...])``.

::

    from transformers import Trainer
    from lightning_gradguard.hf import GradGuardCallback

    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[GradGuardCallback()])
    trainer.train()

A ``TrainerCallback`` sees the optimizer steps but not the backward passes, so the adapter translates what it can
see into the :class:`~lightning_gradguard.adapters.watcher.Watcher`'s calls:

* **steps**: ``on_pre_optimizer_step`` (after gradient clipping, before ``optimizer.step()``) checks the step, and
  strict mode raises from there, before any weight changes; ``on_optimizer_step`` logs once it has stepped. The
  steps carry the Trainer's numbering: a step is numbered by ``state.global_step`` as it reads when the step is
  taken (0 for the first), and its metrics are logged at the number the Trainer logs its own loss at (one more).
* **backward passes and micro-batches**: every micro-batch of the Trainer is one call of the model followed by one
  backward pass from the loss computed from its outputs (``compute_loss``), so a forward hook on the model puts a
  gradient hook on the output tensors, which autograd calls when the backward pass reaches the model; the pass is
  bracketed from there to autograd's end-of-backward callback. That is exact for every micro-batch, costs one hook
  per output tensor (no per-parameter hook), and needs nothing the callback cannot reach. With
  ``gradient_accumulation_steps=k`` the ``k`` backward passes between two steps form the step's accumulation window,
  so a parameter that some micro-batches gave nothing is counted as such. The gradients a pass starts from are
  recorded before the forward call; right after the Trainer's ``model.zero_grad()`` (``on_step_end``) nothing needs
  to be read.
* **causes**: the diagnosis watches the forward passes of the first steps, as with the other adapters. A no_grad
  cause inside a reentrant checkpoint segment names the Hugging Face fix (``use_reentrant=False`` in the
  checkpointing keyword arguments of ``TrainingArguments``, or ``model.enable_input_require_grads()``).
* **logging**: at every logging step (``logging_steps`` by default) the metrics go to ``trainer.state.log_history``,
  to the reporting callbacks of ``report_to`` and to TensorBoard (:mod:`~lightning_gradguard.adapters.hf_logs`).
  ``gradguard.json`` (``gradguard-<name>.json``) goes to ``output_dir``; the summary is printed at the end of
  ``train()``. Only the world process zero writes.
* **a run that raises**: the Trainer has no exception event, so strict mode closes the guard itself before its error
  leaves ``on_pre_optimizer_step``; after any other error the guard is closed by the next ``train()`` or at exit.

Under DDP the counts, norms and strict decisions are global, as with the Lightning callback; DeepSpeed keeps its
gradients outside ``.grad`` and is refused with a clear error.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import warnings
from collections.abc import Mapping
from typing import Any, Optional

from torch import nn
from transformers import TrainerCallback

from lightning_gradguard.adapters.backward import BackwardBracket
from lightning_gradguard.adapters.hf_logs import TrainerLogs, calling_handler, calling_trainer, compiled_wrapper
from lightning_gradguard.adapters.loop import _optimizer_list
from lightning_gradguard.adapters.patching import close_at_exit, open_guards
from lightning_gradguard.adapters.user_frames import package_dirs, user_stacklevel
from lightning_gradguard.adapters.watcher import Watcher
from lightning_gradguard.config import OPTIONS, AllowNone, GuardConfig, LogGranularity, NonfiniteCheck, NormType
from lightning_gradguard.errors import GradGuardError, GradGuardWarning
from lightning_gradguard.isolation import feature
from lightning_gradguard.report import GradReport
from lightning_gradguard.training.precision import LossScaleTracker
from lightning_gradguard.training.strategies import DDP, SINGLE, StrategyInfo, describe_module


class GradGuardCallback(TrainerCallback):
    r"""GradGuard for the Hugging Face ``Trainer``: names every trainable parameter that receives no gradient, says
    why, and logs per-parameter gradient norms through the Trainer's own logging.

    The arguments are :class:`~lightning_gradguard.config.GuardConfig`'s options, validated here, before training.

    Args:
        strict: raise :class:`~lightning_gradguard.GradGuardError` from ``trainer.train()`` at the first step where a
            checked parameter has no gradient, before the optimizer changes any weight, and at the end of training for
            parameters that received gradients but never moved (a param group at ``lr=0``). Otherwise warn once per
            parameter.
        allow_none: ``fnmatch`` patterns of parameter names never reported (optional heads, MoE experts).
        log_every_n_steps: logging cadence in optimizer steps; ``None`` follows ``TrainingArguments(logging_steps)``.
        norm_type: the p of the per-parameter p-norm: a positive float or ``"inf"``.
        nonfinite_check: ``"auto"``, ``"every_step"`` or ``"log_steps"``: when gradient values are read to count
            NaN/Inf.
        log_granularity: ``"auto"``, ``"param"`` or ``"module"``.
        log_module_depth: module depth for per-module aggregates; ``None`` picks one automatically.
        max_logged_series: the most norm series one logging step writes under ``"auto"``.
        histogram_every_n_steps: with TensorBoard in ``report_to``, gradient histograms every n steps (``None``:
            never).
        gradient_flow_every_n_steps: with TensorBoard in ``report_to``, the gradient-flow image every n steps and at
            the first missing gradient (``None``: never); needs matplotlib.
        summary: print the report at the end of ``train()`` (world process zero).
        name: a name for this guard, when several share a Trainer: metrics under ``gradguard/<name>/``, the report
            in ``gradguard-<name>.json``.

    Raises:
        TypeError: an argument has the wrong type (or an unknown keyword was passed).
        ValueError: an argument is out of range, e.g. ``norm_type <= 0`` or ``log_every_n_steps=0``; at the start
            of ``train()``, the Trainer runs DeepSpeed, or its optimizer holds no trainable parameter of the model.

    Example::

        from transformers import Trainer, TrainingArguments
        from lightning_gradguard.hf import GradGuardCallback

        guard = GradGuardCallback(strict=True)
        args = TrainingArguments("out", gradient_accumulation_steps=4, report_to=["tensorboard"])
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[guard])
        trainer.train()
        print(guard.report().missing)   # also in out/gradguard.json

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
        given = locals()
        self.config = GuardConfig.create(**{option: given[option] for option in OPTIONS})
        self.guard: Optional[TrainerGuard] = None  # the guard of the current (or last) train()
        self.report_path: Optional[str] = None  # gradguard.json, once written

    def report(self) -> GradReport:
        """The :class:`~lightning_gradguard.report.GradReport` of the current (or last) ``train()``."""
        return self.guard.report() if self.guard is not None else GradReport()

    # ------------------------------------------------------------------ Trainer events
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Optional[nn.Module] = None,
                       optimizer: Any = None, **kwargs: Any) -> None:
        if self.guard is not None:  # an earlier train() that raised: its hooks come out first
            self.guard.at_exit()
        self.report_path = None
        self.guard = None
        if model is None or optimizer is None:
            raise ValueError("GradGuardCallback needs the Trainer's model and optimizer in on_train_begin; got none")
        _close_abandoned(model, args)
        compiled = compiled_wrapper(calling_trainer(), model)
        self.guard = TrainerGuard(model, optimizer, self.config, args, state, calling_handler(self), compiled)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        guard = self.guard
        if guard is None or guard.closed:
            return
        try:
            guard.before_trainer_step()
        except GradGuardError:  # strict mode: the report is written and the hooks come out before the run stops
            guard.at_exit()
            self.report_path = guard.report_path
            raise

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.guard is not None:
            self.guard.after_trainer_step()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.guard is not None and not self.guard.closed:
            self.guard.zeroed()  # the Trainer has just run model.zero_grad()
            self.guard.publish(args, state, control, kwargs)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        guard = self.guard
        if guard is None or guard.closed:
            return
        try:
            guard.close()  # strict mode raises here for weights that never moved, once the report is written
        finally:
            self.report_path = guard.report_path
            guard.publish(args, state, control, kwargs)  # what the last steps logged
            guard.close_writer()


class TrainerGuard(Watcher):
    """The guard of one ``Trainer.train()`` (built by :class:`GradGuardCallback` in ``on_train_begin``).

    Args:
        model: the Trainer's model (``trainer.model``); its parameter names are the names in the report.
        optimizer: the Trainer's optimizer (accelerate's ``AcceleratedOptimizer`` or a plain one).
        config: the callback's validated options.
        args: the ``TrainingArguments``.
        state: the ``TrainerState``.
        handler: the Trainer's ``CallbackHandler``, if found: its reporting callbacks get the metrics.
        compiled: ``torch.compile(model)``, the module the Trainer calls (``torch_compile=True``): it is watched
            instead, so that the guard's hooks stay out of the compiled code (causes inside it are not guessed).

    """

    def __init__(self, model: nn.Module, optimizer: Any, config: GuardConfig, args: Any, state: Any,
                 handler: Any, compiled: Optional[nn.Module] = None) -> None:
        if getattr(args, "deepspeed", None) or getattr(args, "deepspeed_plugin", None):
            raise ValueError(
                "GradGuardCallback does not support DeepSpeed: ZeRO keeps gradients outside `.grad`, so every "
                "parameter would look like it had none; run a short debugging train() without `deepspeed`"
            )
        raw = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the optimizer
        scaler = getattr(optimizer, "scaler", None)
        enabled = scaler is not None and hasattr(scaler, "_per_optimizer_states") and scaler.is_enabled()
        if config.log_every_n_steps is None:
            every = getattr(state, "logging_steps", None) or getattr(args, "logging_steps", None) or 500
            config = dataclasses.replace(config, log_every_n_steps=max(int(every), 1))
        writes = bool(getattr(state, "is_world_process_zero", True))
        self.logs = TrainerLogs(handler, args, writes)  # log history, report_to's callbacks, TensorBoard
        self.model = model
        self.output_dir = _output_dir(args)
        watched = compiled if compiled is not None else model
        super().__init__(
            watched,
            _optimizer_list([raw]),
            config,
            writes=writes,
            strategy=_strategy(model, args),
            writer=self.logs.writer,
            loggers=[self.logs],
            ddp_fix="TrainingArguments(ddp_find_unused_parameters=True)",
            no_backward_hint="the loss does not depend on the model's output: compute_loss returned a detached loss",
            scale=LossScaleTracker(scaler) if enabled else None,
            report_dir=os.fspath(args.output_dir) if args.output_dir else None,
            late_backward=True,
        )
        self.global_step = int(getattr(state, "global_step", 0) or 0)  # a resumed run keeps the Trainer's numbering
        if self.engine.diagnosis is not None:
            self.engine.diagnosis.checkpoint_fix = _checkpoint_fix(args)
        if handler is None and writes:
            self._warn(
                "GradGuard could not find the Trainer's callbacks, so its metrics reach trainer.state.log_history "
                "only (not the integrations of report_to, nor TensorBoard)"
            )
        self.backward = BackwardBracket(self, watched)
        self._handles.extend(self.backward.handles)
        self.zeroed()  # the Trainer ran model.zero_grad() right before on_train_begin
        close_at_exit(self)

    def _bracket_unseen(self) -> None:
        self.backward.unseen()

    def _warn(self, message: str) -> None:
        """Warnings point at the user's ``trainer.train()`` line, past the Trainer's and accelerate's frames."""
        if not self.writes:
            return
        skip = package_dirs("lightning_gradguard", "torch", "transformers", "accelerate")
        warnings.warn(message, GradGuardWarning, stacklevel=user_stacklevel(2, sys._getframe(1), skip) or 2)

    def zeroed(self) -> None:
        """The Trainer has just set every gradient to None (``model.zero_grad()``): nothing needs to be read."""
        self.backward.zero_grad_ran(self.optimizers[0], set_to_none=True)

    # ------------------------------------------------------------------ steps
    def before_trainer_step(self) -> None:
        """``on_pre_optimizer_step``: check the step (strict mode raises here, before any weight changes)."""
        raw = self.optimizers[0]
        self.backward.stepping(raw)
        # accelerate unscales in the gradient clipping (max_grad_norm > 0); otherwise the gradients still carry the
        # loss scale at this point, and the norms are divided by it
        self.before_step(raw, self.scale.at_step(raw) if self.scale is not None else None)

    def after_trainer_step(self) -> None:
        """``on_optimizer_step``: the optimizer stepped (or the loss scaler skipped the step)."""
        self.backward.stepped()
        self.after_step()

    # ------------------------------------------------------------------ logging
    @feature("log")
    def publish(self, args: Any, state: Any, control: Any, kwargs: Mapping[str, Any]) -> None:
        """Hand the logging steps whose values have landed to the Trainer's log history and reporting callbacks."""
        self.logs.publish(args, state, control, kwargs)

    @feature("log")
    def close_writer(self) -> None:
        self.logs.close()

    def at_exit(self) -> None:
        """``train()`` raised (strict mode, or any error) and the interpreter exits: hooks out, the report file
        written, no collective (another rank may be gone) and no console summary (the exception said it all)."""
        try:
            self.abandon(summary=False)
        except Exception:  # noqa: BLE001 - never replace the exception that stopped the run with one of ours
            pass
        self.close_writer()


def _close_abandoned(model: nn.Module, args: Any) -> None:
    """A ``train()`` begins: the guard of an earlier one that raised (out of memory, a notebook retry with a new
    Trainer and callback) on the same model or output directory is still open, its hooks on the model and its report
    directory claimed. The Trainer calls no callback when ``train()`` raises; it is closed here."""
    output_dir = _output_dir(args)
    for guard in open_guards():
        if not isinstance(guard, TrainerGuard):
            continue
        if guard.model is model or (output_dir is not None and guard.output_dir == output_dir):
            guard.at_exit()


def _output_dir(args: Any) -> Optional[str]:
    return os.path.abspath(os.fspath(args.output_dir)) if getattr(args, "output_dir", None) else None


def _strategy(model: nn.Module, args: Any) -> StrategyInfo:
    """How the Trainer distributes the model: FSDP wraps ``trainer.model`` itself; DDP wraps a copy the callback
    does not see, so it is read from the process group and the arguments."""
    info = describe_module(model)
    if info.name != SINGLE:
        return info
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return info
    return StrategyInfo(DDP, dist.get_world_size(), dist.get_rank(),
                        find_unused_parameters=bool(getattr(args, "ddp_find_unused_parameters", False)))


def _checkpoint_fix(args: Any) -> str:
    """The fix for a reentrant checkpoint segment whose inputs did not require grad, in the Trainer's terms."""
    # transformers 5 renamed gradient_checkpointing_kwargs to activation_checkpointing_kwargs
    option = "activation_checkpointing_kwargs" if hasattr(args, "activation_checkpointing_kwargs") \
        else "gradient_checkpointing_kwargs"
    return (
        f'pass {option}={{"use_reentrant": False}} to TrainingArguments (recommended), or call '
        "model.enable_input_require_grads() before training so that the inputs of the checkpointed layers require "
        "grad (frozen embeddings, LoRA adapters)"
    )


__all__ = ["GradGuardCallback", "TrainerGuard"]
