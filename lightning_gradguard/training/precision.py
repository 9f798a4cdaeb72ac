"""Mixed precision: the loss scale that gradients still carry at the step, and the steps the scaler skipped.

Under ``16-mixed`` a :class:`torch.amp.GradScaler` multiplies the loss, so every gradient is multiplied too. Lightning
unscales before ``on_before_optimizer_step`` (``scaler.unscale_``), except for optimizers that unscale inside their
own kernel (``Adam(fused=True)``, where ``_step_supports_amp_scaling`` is set): there the gradients the guard reads
are still scaled, so their norms are divided by the scale here. Reading ``scaler._scale`` (a tensor) instead of
``scaler.get_scale()`` keeps that free of host synchronization.

When a gradient overflows, the scaler skips ``optimizer.step()`` and halves the scale, yet ``trainer.global_step``
still goes up. The scaler records the overflow in the optimizer's per-step state (``found_inf_per_device``), which
non-fused optimizers fill in ``unscale_`` (before the hook) and fused ones inside ``scaler.step`` (after it). So the
guard keeps a reference to that state at the hook and reads it once ``scaler.update()`` has retired it: the count of
skipped steps accumulates on the device, without a synchronization, and reaches the host at logging steps.

An overflow is a non-finite gradient, never a missing one: the gradient exists, it is Inf or NaN.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

try:
    from torch.amp.grad_scaler import OptState
except ImportError:  # pragma: no cover - torch < 2.3 keeps it under torch.cuda.amp
    from torch.cuda.amp.grad_scaler import OptState  # type: ignore[no-redef]


def precision_name(trainer: Any) -> str:
    """The Trainer's precision setting as Lightning spells it (``"16-mixed"``, ``"bf16-true"``, ``"32-true"``...)."""
    plugin = getattr(trainer, "precision_plugin", None)
    return str(getattr(plugin, "precision", getattr(trainer, "precision", "32-true")))


def find_scaler(trainer: Any) -> Optional[Any]:
    """The enabled ``GradScaler`` of the Trainer's precision plugin, or None (bf16, 32/64-bit, DeepSpeed...)."""
    scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
    if scaler is None or not hasattr(scaler, "_per_optimizer_states"):
        return None
    is_enabled = getattr(scaler, "is_enabled", None)
    return scaler if is_enabled is None or is_enabled() else None


class LossScaleTracker:
    """Follows one ``GradScaler``: the scale still carried by the gradients, and the optimizer steps it skipped.

    Call :meth:`at_step` in ``on_before_optimizer_step`` (for the optimizer about to step) and :meth:`settle` at
    any later point of the training loop (``on_train_batch_end``, the next step, the end of fit).

    Args:
        scaler: a ``torch.amp.GradScaler`` (or ``torch.cuda.amp.GradScaler``) that is enabled.

    Example::

        tracker = LossScaleTracker(trainer.precision_plugin.scaler)
        scale = tracker.at_step(optimizer)  # None: gradients are unscaled; else a 0-dim tensor to divide norms by
        ...
        tracker.settle()
        tracker.skipped_steps()  # host copy: call at logging steps only

    """

    def __init__(self, scaler: Any) -> None:
        self.scaler = scaler
        # (optimizer id, the scaler's per-optimizer state dict for that step) not yet settled
        self._pending: list[tuple[int, dict[str, Any]]] = []
        self._skipped: Optional[Tensor] = None  # on the scale's device
        self._restored = 0  # skipped steps carried over from a checkpoint

    def at_step(self, optimizer: torch.optim.Optimizer) -> Optional[Tensor]:
        """Note the step ``optimizer`` is about to take; returns the scale its gradients still carry, if any.

        Returns:
            None when the gradients were unscaled (``scaler.unscale_`` ran), otherwise the scale as a 0-dim
            tensor on the scaler's device (fused optimizers; no synchronization).

        """
        self.settle()
        # the same default entry scaler.step() would create; Lightning's unscale_ has usually created it already
        state = self.scaler._per_optimizer_states[id(optimizer)]
        self._pending.append((id(optimizer), state))
        if state.get("stage") is OptState.UNSCALED:
            return None
        return self.scaler._scale

    def settle(self) -> None:
        """Count the noted steps that the scaler has finished (``update()`` ran): those with an overflow skipped."""
        if not self._pending:
            return
        current = self.scaler._per_optimizer_states
        for key, state in self._pending:
            found = state.get("found_inf_per_device") or {}
            if current.get(key) is state or not found:
                # update() has not retired this state: the scaler never stepped (training_step returned None)
                continue
            scale = self.scaler._scale
            total = sum(t.to(scale.device, non_blocking=True) for t in found.values())
            skipped = (total > 0).to(torch.int64)
            self._skipped = skipped if self._skipped is None else self._skipped + skipped
        self._pending = []

    def skipped_tensor(self) -> Optional[Tensor]:
        """The device-side count of skipped steps in this run (None before the first skip could be known)."""
        return self._skipped

    def skipped_steps(self) -> int:
        """Optimizer steps the scaler skipped because a gradient overflowed (one host copy)."""
        self.settle()
        live = 0 if self._skipped is None else int(self._skipped.item())
        return self._restored + live

    # ------------------------------------------------------------------ resumable state
    def state_dict(self) -> dict[str, int]:
        return {"amp_skipped_steps": self.skipped_steps()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._restored = int(state.get("amp_skipped_steps", 0))
        self._skipped = None


class FusedStepSkips:
    """The steps a ``GradScaler`` skipped inside optimizers that unscale in their own kernel (``fused=True``), seen
    from the optimizer alone: in a hand-written loop the guard does not know the scaler.

    ``scaler.step`` calls such an optimizer's ``step()`` even when a gradient overflowed, with ``optimizer.found_inf``
    set for the duration of the call; the kernel then changes nothing. Call :meth:`at_step` from inside the step (a
    step pre-hook). The count stays on the device until it is read.
    """

    def __init__(self) -> None:
        self._skipped: Optional[Tensor] = None

    def at_step(self, optimizer: torch.optim.Optimizer) -> None:
        found = getattr(optimizer, "found_inf", None)
        if isinstance(found, Tensor):
            skipped = (found > 0).sum().to(torch.int64)
            self._skipped = skipped if self._skipped is None else self._skipped + skipped

    def skipped_tensor(self) -> Optional[Tensor]:
        """The device-side count, or None when no step ran under a scaler."""
        return self._skipped

    def skipped_steps(self) -> Optional[int]:
        """Optimizer steps skipped for an overflow (one host copy), or None when no step ran under a scaler."""
        return None if self._skipped is None else int(self._skipped.item())
