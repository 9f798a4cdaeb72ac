"""How the adapters of loops GradGuard does not own see optimizer steps: torch's step pre- and post-hooks.

An optimizer step is checked right before any weight moves, once per ``step()`` call, whatever shape the call has:

* ``step(closure)`` (LBFGS calls the closure several times per step): the gradients do not exist before the closure
  ran, so the check waits for its first call;
* a subclass whose ``step()`` calls ``super().step()`` runs the hooks twice once torch has wrapped both classes'
  ``step``: only the outer call is checked;
* an optimizer created after the guard (a second training stage, a new one each epoch) is found through torch's
  global step hooks the first time it steps the model's parameters.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

if TYPE_CHECKING:
    from lightning_gradguard.adapters.watcher import Watcher

StepHook = Callable[[torch.optim.Optimizer, Any, dict[str, Any]], Any]  # an optimizer step pre- or post-hook


class OptimizerSteps:
    """The step hooks of one guard (a :class:`~lightning_gradguard.adapters.watcher.Watcher`)."""

    def __init__(self, watcher: Watcher) -> None:
        self.watcher = watcher
        self._stepping: set[int] = set()  # optimizers inside step(), between their step pre- and post-hooks
        self._nested: set[int] = set()  # optimizers stepped inside another's step(): part of that step

    def follow_new_optimizers(self, pre_hook: StepHook, post_hook: StepHook) -> list[Any]:
        """Check optimizers created after the guard (a second training stage, a new one each epoch) too: torch's
        global step hooks see every optimizer step; the first time one steps the model's parameters, ``pre_hook``
        and ``post_hook`` (the adapter's own per-optimizer hooks) take its steps from then on. Optimizers of other
        models are left alone, and none is kept alive. Returns the two hooks' handles."""
        given = {id(optimizer) for optimizer in self.watcher.optimizers}  # alive: self.watcher.optimizers holds them
        adopted: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # -> the watched one its steps count as
        unrelated: weakref.WeakSet = weakref.WeakSet()

        def any_pre_hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: dict[str, Any]) -> Any:
            if self.watcher.closed or id(optimizer) in given or optimizer in unrelated:
                return None
            if optimizer not in adopted:
                registry = self.watcher.engine.registry
                if not any(registry.find(p) is not None for group in optimizer.param_groups for p in group["params"]):
                    unrelated.add(optimizer)
                    return None
                # a wrapper's inner optimizer that shares the watched one's param groups (SAM's base optimizer,
                # stepped by its second_step()): its steps are the watched optimizer's
                alias = next((o for o in self.watcher.optimizers if o.param_groups is optimizer.param_groups), None)
                adopted[optimizer] = alias  # (never the optimizer itself: the value would keep the key alive)
                if alias is None:
                    self.watcher.engine.optimizer_joined(optimizer)
            return pre_hook(adopted[optimizer] or optimizer, args, kwargs)

        def any_post_hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: dict[str, Any]) -> None:
            if not self.watcher.closed and optimizer in adopted:
                post_hook(adopted[optimizer] or optimizer, args, kwargs)

        return [register_optimizer_step_pre_hook(any_pre_hook), register_optimizer_step_post_hook(any_post_hook)]

    def pre_hook(
        self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict[str, Any], grad_scale: Optional[Tensor]
    ) -> Any:
        """What the adapters' optimizer step pre-hook does: check the step (after the closure's first call for
        ``step(closure)``). A ``step()`` called inside ``step()`` (a subclass calling ``super().step()``, once torch
        has wrapped both classes) runs the hooks again: only the outer call is checked. Call :meth:`post_hook`
        from the post-hook."""
        if id(optimizer) in self._stepping:
            return None
        if self._stepping:  # inside another optimizer's step() (SAM's step calls its base optimizer's): that step's
            self._nested.add(id(optimizer))
            return None
        self._stepping.add(id(optimizer))
        return check_step_call(args, kwargs, lambda: self._check(optimizer, grad_scale), position=1)

    def _check(self, optimizer: torch.optim.Optimizer, grad_scale: Optional[Tensor]) -> None:
        try:
            self.watcher.before_step(optimizer, grad_scale)
        except BaseException:  # strict mode: the step does not happen, and a loop that catches the error steps again
            self._stepping.discard(id(optimizer))
            raise

    def post_hook(self, optimizer: torch.optim.Optimizer) -> None:
        """``optimizer.step()`` returned (after a step that raised for another reason than the guard's error, such as
        a pre-hook of the user's, the next one alone goes unchecked)."""
        if id(optimizer) in self._nested:
            self._nested.discard(id(optimizer))
            return
        self._stepping.discard(id(optimizer))
        self.watcher.after_step()


def check_after_first_call(closure: Callable[..., Any], check: Callable[[], None]) -> Callable[..., Any]:
    """``closure``, calling ``check()`` right after its first call.

    ``optimizer.step(closure)`` computes the gradients by calling the closure inside the step (LBFGS: several times
    per step): the step is checked once, as soon as they exist and before any weight moves.
    """
    checked: list[bool] = []

    def closure_then_check(*args: Any, **kwargs: Any) -> Any:
        loss = closure(*args, **kwargs)
        if not checked:
            checked.append(True)
            check()
        return loss

    return closure_then_check


def check_step_call(
    args: tuple, kwargs: dict[str, Any], check: Callable[[], None], position: int
) -> tuple[tuple, dict[str, Any]]:
    """Check the step of an ``optimizer.step(...)`` call: ``check()`` now, or, for ``step(closure)``, right after the
    closure's first call (see :func:`check_after_first_call`). Returns the call's arguments, the closure wrapped
    (``position``: where a positional closure sits in ``args``; a step pre-hook's ``args`` start with the optimizer).
    An argument that is not callable is a custom optimizer's own and passes untouched."""
    closure = kwargs.get("closure", args[position] if len(args) > position else None)
    if not callable(closure):
        check()
        return args, kwargs
    wrapped = check_after_first_call(closure, check)
    if "closure" in kwargs:
        return args, {**kwargs, "closure": wrapped}
    return (*args[:position], wrapped, *args[position + 1 :]), kwargs
