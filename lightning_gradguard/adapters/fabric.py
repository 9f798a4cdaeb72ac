"""The Lightning Fabric adapter: one added line after ``fabric.setup``.

::

    model, optimizer = fabric.setup(model, optimizer)
    guard = watch_fabric(fabric, model, optimizer)          # the one added line
    for x, y in loader:
        loss = criterion(model(x), y)
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    guard.close()                                           # optional: the report is also printed at exit

``Fabric(callbacks=[...])`` calls no hook around the backward pass or before the optimizer step
(lightning-internals.md, section 8), so the adapter works like the plain PyTorch one
(:mod:`lightning_gradguard.adapters.loop`: gradient hooks on the parameters find the backward passes, a forward hook on the
Fabric module finds the micro-batches), with two Fabric specifics:

* **the step check runs before Fabric's step**: the adapter wraps the ``step`` of each ``_FabricOptimizer`` it
  is given, so every step is checked before the precision plugin runs it, including the steps the AMP gradient
  scaler then skips;
* **AMP scaling**: under ``precision="16-mixed"`` the gradients stay multiplied by the loss scale until
  ``scaler.step`` (unless ``fabric.clip_gradients`` unscaled them first); the adapter divides its norms by the
  scaler's ``_scale`` tensor on the device, without a host synchronization. It also counts the steps the scaler
  skipped for an overflow (:class:`~lightning_gradguard.training.precision.LossScaleTracker`, shared with the Trainer
  callback), logs them as ``gradguard/amp_skipped_steps`` and puts them in the report.

TensorBoard output goes to the Fabric's ``TensorBoardLogger`` when it has one (``Fabric(loggers=...)``), to
``log_dir``/``writer`` otherwise; only global rank zero writes and prints. Under DDP and FSDP the counts, norms and
strict decisions are global, as with the Trainer callback (:mod:`lightning_gradguard.training.distributed`: one collective
per logging step, and one when the guard is closed, on every rank). DeepSpeed keeps gradients outside ``.grad``,
so the adapter refuses it with a clear error.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from lightning_gradguard.adapters.loop import LoopGuard
from lightning_gradguard.core.engine import StepCheck
from lightning_gradguard.output.sinks.tensorboard import AMP_SKIPPED_TAG, tensorboard_writers
from lightning_gradguard.report import GradReport
from lightning_gradguard.training.precision import LossScaleTracker
from lightning_gradguard.training.strategies import StrategyInfo, class_names, describe_strategy


class FabricGuard(LoopGuard):
    r"""GradGuard for a Lightning Fabric training loop (see :func:`watch_fabric`, which builds one).

    Args:
        fabric: the ``lightning.fabric.Fabric`` the model and optimizers were set up with.
        model: the module ``fabric.setup`` returned (a ``_FabricModule``), or the module itself.
        optimizers: the optimizer(s) ``fabric.setup`` returned; their ``step`` is checked before Fabric's
            precision plugin runs it.
        log_dir, writer: where TensorBoard output goes; by default the ``experiment`` of the Fabric's first
            ``TensorBoardLogger`` (``Fabric(loggers=TensorBoardLogger(...))``), if any.
        \**options: every other :class:`~lightning_gradguard.adapters.loop.LoopGuard` argument (``strict``,
            ``allow_none``, ``log_every_n_steps``, ...).

    Raises:
        TypeError: ``fabric`` is not a Fabric, or an argument has the wrong type.
        ValueError: an argument is out of range, or the strategy is DeepSpeed.

    Example::

        fabric = Fabric(accelerator="cpu", loggers=TensorBoardLogger("logs"))
        model, optimizer = fabric.setup(model, optimizer)
        with watch_fabric(fabric, model, optimizer, strict=True) as guard:
            train(fabric, model, optimizer)

    """

    def __init__(
        self,
        fabric: Any,
        model: nn.Module,
        optimizers: Union[torch.optim.Optimizer, Iterable[torch.optim.Optimizer]],
        *,
        log_dir: Optional[Union[str, os.PathLike]] = None,
        writer: Optional[Any] = None,
        **options: Any,
    ) -> None:
        from lightning.fabric import Fabric

        if not isinstance(fabric, Fabric):
            raise TypeError(f"`fabric` must be a lightning.fabric.Fabric, got {type(fabric).__name__}")
        if type(fabric.strategy).__name__.startswith("DeepSpeed"):
            raise ValueError(
                "GradGuard's Fabric adapter does not support DeepSpeed: ZeRO keeps gradients outside `.grad`, so "
                "every parameter would look like it had none"
            )
        self.fabric = fabric
        wrapped = [optimizers] if isinstance(optimizers, torch.optim.Optimizer) else list(optimizers)
        self._fabric_optimizers = [opt for opt in wrapped if _is_fabric_optimizer(opt)]
        raw = [opt.optimizer if _is_fabric_optimizer(opt) else opt for opt in wrapped]
        self._call_module = model  # the module the loop calls (its forward marks micro-batches)
        module = getattr(model, "module", model) if _is_fabric_module(model) else model
        scaler = getattr(fabric.strategy.precision, "scaler", None)
        enabled = scaler is not None and hasattr(scaler, "_per_optimizer_states") and scaler.is_enabled()
        self._scale_tracker = LossScaleTracker(scaler) if enabled else None
        self._pending_log: Optional[tuple[StepCheck, int]] = None
        if log_dir is None and writer is None and fabric.is_global_zero:
            writers = tensorboard_writers(fabric.loggers)
            writer = writers[0] if writers else None
        super().__init__(module, raw, log_dir=log_dir, writer=writer, **options)

    # ------------------------------------------------------------------ LoopGuard overrides
    def _writes(self) -> bool:
        return bool(self.fabric.is_global_zero)

    def _strategy(self) -> StrategyInfo:
        return describe_strategy(self.fabric)  # Fabric's strategies share the Trainer's names and settings

    def _ddp_fix(self) -> str:
        return "Fabric(strategy='ddp_find_unused_parameters_true')"

    def _amp(self) -> bool:
        return self._scale_tracker is not None

    def _install_hooks(self) -> None:
        self._handles.append(self._call_module.register_forward_pre_hook(self._on_forward))
        wrapped_raw = {id(opt.optimizer) for opt in self._fabric_optimizers}
        for fabric_optimizer in self._fabric_optimizers:
            self._handles.append(_StepWrapper(self, fabric_optimizer))
        for optimizer in self.optimizers:
            if id(optimizer) not in wrapped_raw:  # a raw optimizer: checked from inside its own step
                self._handles.append(optimizer.register_step_pre_hook(self._on_step_pre_hook))
        self._hook_new_params()
        self._hook_flat_params(self._call_module)  # the wrapped module: FSDP's root unit included

    def _device_scalars(self) -> dict[str, Tensor]:
        if self._scale_tracker is None:
            return {}
        skipped = self._scale_tracker.skipped_tensor()
        return {AMP_SKIPPED_TAG: skipped if skipped is not None else torch.zeros((), dtype=torch.int64)}

    def report(self) -> GradReport:
        report = super().report()
        if self._scale_tracker is not None:
            report.amp_skipped_steps = self._scale_tracker.skipped_steps()
        return report

    def _log(self, check: StepCheck, step: int) -> None:
        # written after Fabric's step, so that the skipped-step count includes this step
        self._pending_log = (check, step)

    # ------------------------------------------------------------------ the wrapped step
    def _before_fabric_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Check the step before the precision plugin runs it, with the norms divided by the pending loss scale."""
        # None when there is no scaler or fabric.clip_gradients() already unscaled the gradients
        scale = self._scale_tracker.at_step(optimizer) if self._scale_tracker is not None else None
        self._check(optimizer, scale)

    def _after_fabric_step(self) -> None:
        if self._closed:
            return
        if self._scale_tracker is not None:
            self._scale_tracker.settle()  # scaler.update() ran: count the step if the scaler skipped it
        pending, self._pending_log = self._pending_log, None
        if pending is not None:
            LoopGuard._log(self, *pending)


class _StepWrapper:
    """Wraps one ``_FabricOptimizer.step`` (as an instance attribute); ``remove()`` restores the original."""

    def __init__(self, guard: FabricGuard, fabric_optimizer: Any) -> None:
        self._target = fabric_optimizer
        original = fabric_optimizer.step  # the bound method of the wrapper class
        raw = fabric_optimizer.optimizer

        def step(*args: Any, **kwargs: Any) -> Any:
            if not guard._closed:
                guard._before_fabric_step(raw)
            output = original(*args, **kwargs)
            guard._after_fabric_step()
            return output

        step.__wrapped__ = original  # type: ignore[attr-defined]
        fabric_optimizer.step = step

    def remove(self) -> None:
        if "step" in vars(self._target):
            del self._target.step


def watch_fabric(
    fabric: Any,
    model: nn.Module,
    *optimizers: torch.optim.Optimizer,
    **options: Any,
) -> FabricGuard:
    """Guard a Fabric training loop with one line, after ``fabric.setup``; returns the :class:`FabricGuard`.

    Args:
        fabric: the ``Fabric``.
        model: the module ``fabric.setup`` returned.
        *optimizers: the optimizer(s) ``fabric.setup`` returned.
        **options: any :class:`FabricGuard` / :class:`~lightning_gradguard.adapters.loop.LoopGuard` argument (``strict``,
            ``allow_none``, ``log_dir``, ``writer``, ``log_every_n_steps``, ...).

    Raises:
        TypeError, ValueError: as :class:`FabricGuard`; no optimizer given raises ``ValueError``.

    Example::

        model, optimizer = fabric.setup(model, optimizer)
        guard = watch_fabric(fabric, model, optimizer, strict=True)

    """
    if not optimizers:
        raise ValueError("watch_fabric(fabric, model, *optimizers) needs at least one optimizer")
    return FabricGuard(fabric, model, list(optimizers), **options)


def _is_fabric_optimizer(optimizer: Any) -> bool:
    return "_FabricOptimizer" in class_names(optimizer)


def _is_fabric_module(module: Any) -> bool:
    return "_FabricModule" in class_names(module)


__all__ = ["FabricGuard", "watch_fabric"]
