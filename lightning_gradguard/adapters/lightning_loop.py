"""What the Trainer callback reads of Lightning's training loop: which batches started, whether a batch may be skipped,
what ``zero_grad`` will do, and whether any user code can run between the backward pass and the optimizer step.

Lightning's hooks say when things happen; these say what the loop around them will do, from the loop's progress
counters and from which hooks the user's classes override (both namespaces: ``lightning.pytorch`` and
``pytorch_lightning``).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from lightning.pytorch import LightningModule

# where Lightning's Callback / LightningModule hook stubs live (lightning.pytorch and pytorch_lightning)
_FRAMEWORK_BASES = ("lightning.pytorch.core.", "lightning.pytorch.callbacks.callback", "pytorch_lightning.core.",
                    "pytorch_lightning.callbacks.callback")


def batches_started(trainer: Any) -> Optional[int]:
    """Training batches Lightning has started in this fit (None if this Lightning version does not say)."""
    progress = getattr(getattr(trainer.fit_loop.epoch_loop, "batch_progress", None), "total", None)
    return getattr(progress, "started", None)


def pl_module_skips_batches(trainer: Any) -> bool:
    """Whether Lightning skips a batch whose ``training_step`` returns None: automatic optimization, in one process
    (the only setting where Lightning supports it; elsewhere the ranks would disagree on which steps to check)."""
    module = trainer.lightning_module
    return module is not None and module.automatic_optimization and trainer.world_size == 1


def backward_skipped(trainer: Any) -> bool:
    """Whether Lightning skips the backward pass of this epoch's batches on purpose (``StochasticWeightAveraging``'s
    extra epoch, which recomputes batch-norm statistics with forward passes only)."""
    return getattr(trainer.fit_loop, "_skip_backward", False) is True


def zero_grad_sets_none(pl_module: LightningModule, optimizer: torch.optim.Optimizer) -> bool:
    """Whether the ``zero_grad`` Lightning is about to run leaves every gradient of ``optimizer`` None: neither the
    LightningModule's ``optimizer_zero_grad`` nor the optimizer's ``zero_grad`` is overridden, and torch's
    ``zero_grad`` sets gradients to None by default."""
    return (
        type(pl_module).optimizer_zero_grad is LightningModule.optimizer_zero_grad
        and type(optimizer).zero_grad is torch.optim.Optimizer.zero_grad
    )


def nothing_between_backward_and_step(callback: Any, trainer: Any, pl_module: Any) -> bool:
    """Whether no code can change a ``.grad`` between ``callback``'s ``on_after_backward`` and its
    ``on_before_optimizer_step``.

    Under automatic optimization Lightning runs, in between, only the ``on_after_backward`` of the callbacks after
    this one and of the LightningModule, and the ``on_before_optimizer_step`` of the callbacks before this one
    (gradient clipping comes after them). When none of them is overridden, the gradients read right after backward
    are still those at the step.
    """
    if not pl_module.automatic_optimization or overrides(pl_module, "on_after_backward"):
        return False
    callbacks = list(trainer.callbacks)
    position = next((i for i, other in enumerate(callbacks) if other is callback), None)
    if position is None:
        return False
    after = callbacks[position + 1 :]
    before = callbacks[:position]
    return not any(overrides(c, "on_after_backward") for c in after) and not any(
        overrides(c, "on_before_optimizer_step") for c in before
    )


def overrides(obj: Any, method: str) -> bool:
    """Whether ``obj`` or its class defines ``method`` anywhere below Lightning's own base classes."""
    if method in getattr(obj, "__dict__", {}):  # a hook assigned to the instance
        return True
    for cls in type(obj).__mro__:
        if method in vars(cls):
            return not (cls.__module__ or "").startswith(_FRAMEWORK_BASES)
    return False
