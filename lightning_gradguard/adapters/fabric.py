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

``Fabric(callbacks=[...])`` calls no hook around the backward pass or before the optimizer step, so the adapter
wraps the two calls every Fabric loop makes, and translates them into the
:class:`~lightning_gradguard.adapters.watcher.Watcher`'s calls, as the plain PyTorch adapter does with its hooks:

* ``fabric.backward(loss)`` brackets each backward pass exactly (no per-parameter hook), with the loss, so the
  diagnosis walks the graph from it; a forward call of the model since the previous backward pass starts a new
  micro-batch;
* each ``_FabricOptimizer.step`` it is given is checked before Fabric's precision plugin runs it (strict mode
  raises there, before any weight changes), including the steps the AMP gradient scaler then skips;
* ``zero_grad`` of the optimizers: gradients cleared between the backward pass and the step are ``cleared`` (as
  are those ``model.zero_grad()`` or ``p.grad = None`` drop, which the step reads), and an optimizer cleared before
  a backward pass that is not its own (a GAN's other network) starts its accumulation window there.

**AMP scaling**: under ``precision="16-mixed"`` the gradients stay multiplied by the loss scale until ``scaler.step``
(unless ``fabric.clip_gradients`` unscaled them first); the adapter divides its norms by the scaler's ``_scale``
tensor on the device, without a host synchronization, and counts the steps the scaler skipped
(:class:`~lightning_gradguard.training.precision.LossScaleTracker`, shared with the Trainer callback).

Several models and optimizers under one guard: ``watch_fabric(fabric, [generator, discriminator], [opt_g, opt_d])``
(parameter names get the model's class name in front, or the keys of a dict of models). Logging goes through the
Fabric's loggers (``Fabric(loggers=...)``: scalars to every logger, the dashboard to a ``TensorBoardLogger``), or to
``log_dir``/``writer``; only global rank zero writes and prints. Under DDP and FSDP the counts, norms and strict
decisions are global, as with the Trainer callback. DeepSpeed keeps gradients outside ``.grad``, so the adapter
refuses it with a clear error.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import torch
from torch import nn

from lightning_gradguard.adapters.backward import WindowRestarts
from lightning_gradguard.adapters.optimizer_steps import check_step_call
from lightning_gradguard.adapters.patching import MethodWrapper, close_at_exit
from lightning_gradguard.adapters.watcher import Watcher
from lightning_gradguard.config import GuardConfig
from lightning_gradguard.hooks import ignore, user_hook
from lightning_gradguard.isolation import feature
from lightning_gradguard.training.precision import LossScaleTracker
from lightning_gradguard.training.strategies import class_names, describe_strategy

Models = Union[nn.Module, Sequence[nn.Module], Mapping[str, nn.Module]]


class FabricGuard(Watcher):
    r"""GradGuard for a Lightning Fabric training loop (see :func:`watch_fabric`, which builds one).

    Args:
        fabric: the ``lightning.fabric.Fabric`` the model and optimizers were set up with.
        model: the module ``fabric.setup`` returned (a ``_FabricModule``), the module itself, or several of them
            (a list, or a dict whose keys prefix the parameter names).
        optimizers: the optimizer(s) ``fabric.setup`` returned; their ``step`` is checked before Fabric's
            precision plugin runs it.
        log_dir, writer: where TensorBoard output goes; by default the Fabric's loggers.
        \**options: every :class:`~lightning_gradguard.config.GuardConfig` option (``strict``, ``allow_none``,
            ``log_every_n_steps``, ``name``, ...).

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
        model: Models,
        optimizers: Union[torch.optim.Optimizer, Sequence[torch.optim.Optimizer]],
        *,
        log_dir: Optional[Union[str, os.PathLike]] = None,
        writer: Optional[Any] = None,
        **options: Any,
    ) -> None:
        from lightning.fabric import Fabric

        from lightning_gradguard.adapters.loop import _check_destination, _optimizer_list, _wrap_zero_grad

        config = GuardConfig.create(**options)
        if not isinstance(fabric, Fabric):
            raise TypeError(f"`fabric` must be a lightning.fabric.Fabric, got {type(fabric).__name__}")
        if type(fabric.strategy).__name__.startswith("DeepSpeed"):
            raise ValueError(
                "GradGuard's Fabric adapter does not support DeepSpeed: ZeRO keeps gradients outside `.grad`, so "
                "every parameter would look like it had none"
            )
        _check_destination(log_dir, writer)
        self.fabric = fabric
        wrapped = _optimizer_list([opt.optimizer if _is_fabric_optimizer(opt) else opt for opt in _flat(optimizers)])
        fabric_optimizers = [opt for opt in _flat(optimizers) if _is_fabric_optimizer(opt)]
        self._called, named = _models(model)
        scaler = getattr(fabric.strategy.precision, "scaler", None)
        enabled = scaler is not None and hasattr(scaler, "_per_optimizer_states") and scaler.is_enabled()
        loggers = list(fabric.loggers) if log_dir is None and writer is None else []
        super().__init__(
            named,
            wrapped,
            config,
            writes=bool(fabric.is_global_zero),
            strategy=describe_strategy(fabric),  # Fabric's strategies share the Trainer's names and settings
            log_dir=os.fspath(log_dir) if log_dir is not None else None,
            writer=writer,
            loggers=loggers,
            ddp_fix="Fabric(strategy='ddp_find_unused_parameters_true')",
            no_backward_hint="fabric.backward(loss) was not called before optimizer.step()",
            scale=LossScaleTracker(scaler) if enabled else None,
        )
        self._forward_since_backward = False
        self._forward_seen = False
        self.restarts = WindowRestarts(self.engine, self.optimizers)
        for module in self._called:  # a forward call since the previous backward pass starts a micro-batch
            self._handles.append(module.register_forward_pre_hook(user_hook(self._on_forward)))
        self._handles.append(MethodWrapper(fabric, "backward", self._backward))
        stepped = {id(opt.optimizer) for opt in fabric_optimizers}
        for fabric_optimizer in fabric_optimizers:
            raw = fabric_optimizer.optimizer
            self._handles.append(MethodWrapper(fabric_optimizer, "step", self._fabric_step(raw)))
            # the wrapper's zero_grad is torch's, run on the wrapper: it does not go through the raw optimizer's
            self._handles.append(_wrap_zero_grad(fabric_optimizer, self._after_zero_grad, reported=raw))
        for optimizer in self.optimizers:
            self._handles.append(_wrap_zero_grad(optimizer, self._after_zero_grad))
            if id(optimizer) not in stepped:  # a raw optimizer: checked from inside its own step
                self._handles.append(optimizer.register_step_pre_hook(self._on_step_pre_hook))
                self._handles.append(optimizer.register_step_post_hook(self._on_step_post_hook))
        # one set up later (fabric.setup_optimizers for a second stage) is checked from inside its own step too
        self._handles.extend(self.steps.follow_new_optimizers(self._on_step_pre_hook, self._on_step_post_hook))
        self._hook_flat_params()
        close_at_exit(self)

    def _hook_flat_params(self) -> None:
        for root in self._called:  # the wrapped modules: FSDP's root unit included
            for module in root.modules():
                flat = getattr(getattr(module, "_handle", None), "flat_param", None)
                if isinstance(flat, torch.Tensor) and flat.requires_grad:
                    self._handles.append(flat.register_hook(user_hook(ignore)))

    # ------------------------------------------------------------------ Fabric's calls
    def _on_forward(self, module: nn.Module, args: Any) -> None:
        if torch.is_grad_enabled():  # evaluation under no_grad is not a micro-batch
            self._forward_since_backward = True
            self._forward_seen = True

    @feature("check")
    def _after_zero_grad(self, optimizer: torch.optim.Optimizer, set_to_none: bool) -> None:
        if self._closed or self.engine.in_backward:
            return
        if not set_to_none:
            self.gradients_zeroed(optimizer)
        self.restarts.cleared(optimizer)
        # what a backward pass left is no longer what the step will see
        self.engine.mark_gradients(optimizer if set_to_none else None)

    def _bracket_unseen(self) -> None:  # a loss.backward() called instead of fabric.backward(loss)
        self.restarts.apply()
        self.unseen_backward()

    def _backward(self, original: Any, tensor: Any, *args: Any, **kwargs: Any) -> Any:
        if self._closed:
            return original(tensor, *args, **kwargs)
        new_micro_batch = self._forward_since_backward or not self._forward_seen
        self._forward_since_backward = False
        self.restarts.apply()
        self.backward_started(tensor if isinstance(tensor, torch.Tensor) else None, new_micro_batch=new_micro_batch)
        output = original(tensor, *args, **kwargs)
        self.backward_ended()
        return output

    def _fabric_step(self, raw: torch.optim.Optimizer) -> Any:
        def step(original: Any, *args: Any, **kwargs: Any) -> Any:
            if not self._closed:
                # None when there is no scaler or fabric.clip_gradients() already unscaled the gradients
                self.restarts.stepping(raw)
                scale = self.scale.at_step(raw) if self.scale is not None else None
                args, kwargs = check_step_call(args, kwargs, lambda: self.before_step(raw, scale), position=0)
            output = original(*args, **kwargs)
            self.after_step()
            return output

        return step

    def _on_step_pre_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: dict[str, Any]) -> Any:
        self.restarts.stepping(optimizer)
        scale = getattr(optimizer, "grad_scale", None)
        return self.steps.pre_hook(optimizer, args, kwargs, scale if isinstance(scale, torch.Tensor) else None)

    def _on_step_post_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: dict[str, Any]) -> None:
        self.steps.post_hook(optimizer)


def watch_fabric(fabric: Any, model: Models, *optimizers: Any, **options: Any) -> FabricGuard:
    """Guard a Fabric training loop with one line, after ``fabric.setup``; returns the :class:`FabricGuard`.

    Args:
        fabric: the ``Fabric``.
        model: the module ``fabric.setup`` returned, or several (a list, or a dict of name -> module).
        *optimizers: the optimizer(s) ``fabric.setup`` returned (each may also be a list of them).
        **options: any :class:`FabricGuard` argument (``log_dir``, ``writer``) or
            :class:`~lightning_gradguard.config.GuardConfig` option (``strict``, ``allow_none``,
            ``log_every_n_steps``, ``name``, ...).

    Raises:
        TypeError, ValueError: as :class:`FabricGuard`; no optimizer given raises ``ValueError``.

    Example::

        model, optimizer = fabric.setup(model, optimizer)
        guard = watch_fabric(fabric, model, optimizer, strict=True)

        # a GAN, one guard for both networks
        guard = watch_fabric(fabric, [generator, discriminator], [opt_g, opt_d])

    """
    if not optimizers:
        raise ValueError("watch_fabric(fabric, model, *optimizers) needs at least one optimizer")
    return FabricGuard(fabric, model, _flat(optimizers), **options)


def _flat(optimizers: Any) -> list[Any]:
    if isinstance(optimizers, (list, tuple)):
        return [opt for item in optimizers for opt in _flat(item)]
    return [optimizers]


def _models(model: Models) -> tuple[list[nn.Module], nn.Module]:
    """The modules the loop calls, and the one module whose parameter names the report uses."""
    if isinstance(model, nn.Module):
        return [model], _unwrap(model)
    if isinstance(model, Mapping):
        items = list(model.items())
    elif isinstance(model, (list, tuple)):
        items = _class_keys(model)
    else:
        raise TypeError(f"`model` must be a module, a list of modules or a dict of them, got {type(model).__name__}")
    for key, module in items:
        if not isinstance(module, nn.Module) or not isinstance(key, str):
            raise TypeError(f"`model` must hold modules under string names, got {key!r}: {type(module).__name__}")
    if len(items) == 1:
        return [items[0][1]], _unwrap(items[0][1])
    return [m for _, m in items], nn.ModuleDict({key: _unwrap(m) for key, m in items})


def _class_keys(models: Sequence[Any]) -> list[tuple[str, Any]]:
    """``[generator, discriminator]`` -> ``generator``/``discriminator`` from the class names; repeats numbered."""
    keys: list[tuple[str, Any]] = []
    for module in models:
        name = type(_unwrap(module)).__name__ if isinstance(module, nn.Module) else "model"
        base = re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()  # Generator -> generator, MyNet -> my_net
        key, n = base, 1
        while any(key == k for k, _ in keys):
            n += 1
            key = f"{base}{n}"
        keys.append((key, module))
    return keys


def _unwrap(module: nn.Module) -> nn.Module:
    return getattr(module, "module", module) if _is_fabric_module(module) else module


def _is_fabric_optimizer(optimizer: Any) -> bool:
    return "_FabricOptimizer" in class_names(optimizer)


def _is_fabric_module(module: Any) -> bool:
    return "_FabricModule" in class_names(module)


__all__ = ["FabricGuard", "watch_fabric"]
