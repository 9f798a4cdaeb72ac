"""The plain PyTorch adapter: one added line in a hand-written training loop.

::

    guard = watch(model, optimizer, log_dir="runs/exp1")      # the one added line
    for x, y in loader:
        loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

A plain loop calls nothing GradGuard could hook into, so the adapter puts hooks where the loop's own events pass
and translates them into the :class:`~lightning_gradguard.adapters.watcher.Watcher`'s calls:

* **steps**: ``optimizer.register_step_pre_hook`` checks each step before any weight changes (strict mode raises
  from there); ``register_step_post_hook`` logs once it has stepped;
* **backward passes**: a forward hook on ``model`` puts a gradient hook on its outputs, which autograd calls when a
  backward pass reaches the model; the pass is bracketed from there to autograd's end-of-backward callback. A
  wrapper around ``optimizer.zero_grad`` (or, after a step with none, a forward pre-hook) records the gradients the
  pass starts from, so a parameter used only in the loss (a learned temperature) counts as well. The hooks on the
  model are made so that a copy of it (``copy.deepcopy``, ``torch.save(model)``) does not carry them (see
  :mod:`lightning_gradguard.hooks`); ``model.zero_grad`` is not wrapped, for the same reason. While the first
  window runs, a gradient hook on every parameter watches too; when every backward pass of that window went through
  the model's outputs, those hooks come off (they cost about 1.5 us per parameter tensor per backward pass). A loop
  that calls submodules instead of ``model`` keeps them. ``torch.autograd.grad`` calls, which do not write
  ``.grad``, are not counted;
* **micro-batches** (gradient accumulation in a hand-written loop): the backward passes between two steps of an
  optimizer form its accumulation window. A backward pass that follows a forward call of ``model`` starts a new
  micro-batch; further backward passes without a new forward call (several losses from one forward) belong to
  the same micro-batch. If ``model`` itself is never called, each backward pass is a micro-batch. An optimizer's
  ``zero_grad`` between two of its steps (a GAN loop's other optimizer, a step the AMP scaler skipped) starts its
  window again.

Under ``torch.amp.GradScaler`` the pre-step hook runs inside ``scaler.step`` after unscaling, so norms are
unscaled; for optimizers that unscale themselves (``fused=True``) the scaler sets ``optimizer.grad_scale``, which
the adapter divides out. Steps the scaler skips are not ``optimizer.step()`` calls and are not checked. Gradients
dropped between ``backward()`` and ``step()`` are ``cleared``, whether by ``zero_grad`` or by ``p.grad = None``
(beyond 1,024 parameter tensors, the step compares an even sample of about 64 ``.grad`` with what backward left,
so a single ``p.grad = None`` among them may go unseen).

Several processes: a model wrapped in ``DistributedDataParallel`` (``FullyShardedDataParallel``, ``fully_shard``)
gets the Trainer callback's :class:`~lightning_gradguard.training.context.TrainingContext`, so counts, norms and
strict decisions are global (one collective per logging step, one in :meth:`LoopGuard.close`), and global rank zero
alone writes, prints and warns. FSDP1 accumulates into flat parameters that the optimizer never sees: those are
hooked too.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy

from lightning_gradguard.adapters.backward import BackwardBracket
from lightning_gradguard.adapters.patching import MethodWrapper, close_at_exit, open_guards
from lightning_gradguard.adapters.watcher import Watcher
from lightning_gradguard.config import GuardConfig
from lightning_gradguard.errors import GradGuardError, GradGuardWarning
from lightning_gradguard.hooks import user_hook
from lightning_gradguard.training.strategies import class_names, describe_module


class LoopGuard(Watcher):
    r"""GradGuard for a hand-written PyTorch training loop (see :func:`watch`, which builds one).

    Args:
        model: the model being trained; its parameter names are the names in the report.
        optimizers: the optimizer, or several; each one's ``step()`` is checked.
        log_dir: write TensorBoard scalars, the dashboard and ``gradguard.json`` to this directory.
        writer: a ``SummaryWriter`` (``torch.utils.tensorboard`` or tensorboardX) to write to instead; the report
            JSON goes to its log directory. Pass ``log_dir`` or ``writer``, not both.
        \**options: every :class:`~lightning_gradguard.config.GuardConfig` option (``strict``, ``allow_none``,
            ``log_every_n_steps`` (default 50), ``norm_type``, ``summary``, ``name``, ...).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, an optimizer is not a ``torch.optim.Optimizer``, ``writer``
            has no ``add_scalar``, or an option has the wrong type (or is not an option).
        ValueError: an option is out of range, both ``log_dir`` and ``writer`` are given, or the optimizers hold
            no trainable parameter of ``model``.

    Example::

        with watch(model, optimizer, log_dir="runs/exp1", strict=True) as guard:
            for x, y in loader:
                ...
        print(guard.report().missing)

    """

    def __init__(
        self,
        model: nn.Module,
        optimizers: Union[torch.optim.Optimizer, Sequence[torch.optim.Optimizer]],
        *,
        log_dir: Optional[Union[str, os.PathLike]] = None,
        writer: Optional[Any] = None,
        **options: Any,
    ) -> None:
        config = GuardConfig.create(**options)
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
        optimizers = _optimizer_list(optimizers)
        _check_destination(log_dir, writer)
        _replace_earlier_guards(model, optimizers)
        self.model = model
        # names as the user wrote them: without the "module." of a (Distributed)DataParallel wrapper
        super().__init__(
            _unwrap_data_parallel(model),
            optimizers,
            config,
            writes=_rank_zero(),
            strategy=describe_module(model),
            log_dir=os.fspath(log_dir) if log_dir is not None else None,
            writer=writer,
            late_backward=True,
            joinable=model,
            no_backward_hint="loss.backward() was not called before optimizer.step(), or the loss does not depend on "
            "the model's output: it was computed from detached tensors",
        )
        self._param_hooks: list[Any] = []  # the per-parameter detector, while it is needed
        self._param_mode = True
        self._seen_params = 0  # registry entries looked at for the per-parameter detector
        self._unhooked: list[Tensor] = []  # parameters frozen when seen: hooked once they require grad
        try:
            self.backward = BackwardBracket(self, model)
            self._handles.extend(self.backward.handles)
            self._handles.append(_RemoveAll(self._param_hooks))
            self._install()
        except BaseException:
            self.undo()
            raise
        close_at_exit(self)

    # ------------------------------------------------------------------ hooks
    def _install(self) -> None:
        model = self.model
        for optimizer in self.optimizers:
            self._handles.append(optimizer.register_step_pre_hook(self._on_step_pre_hook))
            self._handles.append(optimizer.register_step_post_hook(self._on_step_post_hook))
            self._handles.append(_wrap_zero_grad(optimizer, self._after_zero_grad))
        # model.zero_grad() is not wrapped: an instance attribute on the model would travel with every copy of it
        # (deepcopy, torch.save). Gradients it clears are read at the next forward call or at the step.
        self._hook_new_params()
        for module in model.modules():  # FSDP1 accumulates into flat parameters the optimizer never sees
            flat = getattr(getattr(module, "_handle", None), "flat_param", None)
            if isinstance(flat, Tensor) and flat.requires_grad:
                self._handles.append(flat.register_hook(user_hook(self._on_param_grad)))
        self._handles.extend(self.steps.follow_new_optimizers(self._on_step_pre_hook, self._on_step_post_hook))

    def _bracket_unseen(self) -> None:
        self.backward.unseen()

    def _after_zero_grad(self, optimizer: torch.optim.Optimizer, set_to_none: bool) -> None:
        if not set_to_none:
            self.gradients_zeroed(optimizer)
        self.backward.zero_grad_ran(optimizer, set_to_none)

    def _hook_new_params(self) -> None:
        """Put the per-parameter detector on every trainable parameter that does not have it yet (first window,
        or for good when the loop does not go through ``model``); frozen and not yet materialized ones are looked at
        again each step."""
        if not self._param_mode:
            return
        params = self.engine.registry.params
        if self._seen_params < len(params):
            self._unhooked.extend(params[self._seen_params :])
            self._seen_params = len(params)
        still_frozen = []
        for param in self._unhooked:
            # a lazy module's parameter takes no hook before its first forward call gives it a shape
            if param.requires_grad and not is_lazy(param):
                self._param_hooks.append(param.register_hook(user_hook(self._on_param_grad)))
            else:
                still_frozen.append(param)
        self._unhooked = still_frozen

    def _on_param_grad(self, grad: Tensor) -> None:
        # called for each parameter's gradient; only the first of a backward pass does anything
        if not self.backward.open:
            self.backward.start()

    def _on_step_pre_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: dict[str, Any]) -> Any:
        # optimizers that unscale inside their kernel (fused=True): GradScaler.step leaves the gradients scaled and
        # sets `optimizer.grad_scale` (None when they were unscaled already) for the duration of the step
        self.backward.stepping(optimizer)
        scale = getattr(optimizer, "grad_scale", None)
        return self.steps.pre_hook(optimizer, args, kwargs, scale if isinstance(scale, Tensor) else None)

    def _on_step_post_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: dict[str, Any]) -> None:
        self.backward.stepped()
        self.steps.post_hook(optimizer)
        self._after_first_window()

    def _after_first_window(self) -> None:
        """After each step: the per-parameter detector comes off once the model's outputs proved enough."""
        if not self._param_mode:
            return
        if self.backward.forward_seen and self.backward.all_through_model:
            self._param_mode = False
            for handle in self._param_hooks:
                handle.remove()
            self._param_hooks.clear()
            self._unhooked = []
        else:
            self._hook_new_params()  # parameters that became trainable since (an unfrozen layer)



def watch(
    model: nn.Module,
    optimizer: Union[torch.optim.Optimizer, Sequence[torch.optim.Optimizer]],
    *,
    log_dir: Optional[Union[str, os.PathLike]] = None,
    writer: Optional[Any] = None,
    strict: bool = False,
    allow_none: Union[str, Iterable[str]] = (),
    **options: Any,
) -> LoopGuard:
    """Guard a hand-written training loop with one line; returns the :class:`LoopGuard`.

    Args:
        model: the model being trained.
        optimizer: its optimizer, or a list of optimizers (a wrapper that keeps a torch optimizer in ``.optimizer``,
            such as Lookahead, is watched through that optimizer).
        log_dir: TensorBoard log directory for scalars, the dashboard and ``gradguard.json``.
        writer: an existing ``SummaryWriter`` instead of ``log_dir``.
        strict: raise :class:`~lightning_gradguard.GradGuardError` from ``optimizer.step()`` at the first missing
            gradient, before the weights change, and from ``close()`` for parameters that never moved.
        allow_none: ``fnmatch`` patterns of parameter names never reported.
        **options: any other :class:`~lightning_gradguard.config.GuardConfig` option (``log_every_n_steps``,
            ``norm_type``, ``histogram_every_n_steps``, ``gradient_flow_every_n_steps``, ``summary``, ``name``, ...).

    Raises:
        TypeError, ValueError: as :class:`LoopGuard`; an unknown keyword raises ``TypeError``.

    Example::

        guard = watch(model, optimizer, log_dir="runs/exp1")
        for x, y in loader:
            loss = criterion(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        guard.close()  # or let the interpreter exit: the report is printed then

    """
    return LoopGuard(model, optimizer, log_dir=log_dir, writer=writer, strict=strict, allow_none=allow_none, **options)


# ---------------------------------------------------------------------------------------------- helpers
class _RemoveAll:
    """A handle that removes every handle in a list that may still change."""

    def __init__(self, handles: list[Any]) -> None:
        self._handles = handles

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _wrap_zero_grad(owner: Any, after: Any, reported: Any = None) -> MethodWrapper:
    """Call ``after(reported or owner, set_to_none)`` after each ``owner.zero_grad(...)``."""
    reported = owner if reported is None else reported

    def zero_grad(original: Any, *args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        after(reported, bool(kwargs.get("set_to_none", args[0] if args else True)))
        return out

    return MethodWrapper(owner, "zero_grad", zero_grad)


def _check_destination(log_dir: Any, writer: Any) -> None:
    if log_dir is not None and writer is not None:
        raise ValueError("pass either `log_dir` (GradGuard creates a SummaryWriter) or `writer`, not both")
    if log_dir is not None and not isinstance(log_dir, (str, os.PathLike)):
        raise TypeError(f"`log_dir` must be a path (str or os.PathLike), got {log_dir!r}")
    if writer is not None and not callable(getattr(writer, "add_scalar", None)):
        raise TypeError(
            f"`writer` must be a SummaryWriter (torch.utils.tensorboard or tensorboardX), got {type(writer)!r}"
        )


def _optimizer_list(optimizers: Any) -> list[torch.optim.Optimizer]:
    single = _unwrap_optimizer(optimizers)
    items = [single] if single is not None else optimizers
    try:
        items = list(items)
    except TypeError:
        raise TypeError(
            f"`optimizer` must be a torch.optim.Optimizer or a list of them, got {type(optimizers).__name__} (a "
            "wrapper that keeps the torch optimizer elsewhere than in `.optimizer`: pass that optimizer)"
        ) from None
    if not items:
        raise ValueError("`optimizer` must name at least one torch.optim.Optimizer")
    unwrapped = []
    for item in items:
        optimizer = _unwrap_optimizer(item)
        if optimizer is None:
            raise TypeError(
                f"`optimizer` must be a torch.optim.Optimizer or a list of them, got {type(item).__name__}"
            )
        unwrapped.append(optimizer)
    return unwrapped


def _unwrap_optimizer(obj: Any) -> Optional[torch.optim.Optimizer]:
    """``obj`` if it is a torch optimizer, else the one a wrapper keeps in ``.optimizer``, ``._optimizer`` or
    ``._base_optimizer`` (Lookahead-style wrappers, Lightning's and Fabric's optimizers): its step hooks fire when the
    wrapper steps. A wrapper that subclasses ``Optimizer`` without calling its ``__init__`` has no step hooks of its
    own: the optimizer inside it is watched."""
    for _ in range(4):
        if isinstance(obj, torch.optim.Optimizer) and hasattr(obj, "_optimizer_step_pre_hooks"):
            return obj
        inner = next((getattr(obj, name) for name in ("optimizer", "_optimizer", "_base_optimizer")
                      if getattr(obj, name, None) is not None), None)
        if inner is None:
            return obj if isinstance(obj, torch.optim.Optimizer) else None
        obj = inner
    return None


def _rank_zero() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _unwrap_data_parallel(model: nn.Module) -> nn.Module:
    inner = getattr(model, "module", None)
    if class_names(model) & {"DistributedDataParallel", "DataParallel"} and isinstance(inner, nn.Module):
        return inner
    return model


def _replace_earlier_guards(model: nn.Module, optimizers: Sequence[torch.optim.Optimizer]) -> None:
    """Close an open guard on the same model and optimizer (a notebook cell run twice), so hooks do not pile up."""
    ids = {id(o) for o in optimizers}
    for guard in open_guards():
        if getattr(guard, "model", None) is not model or not ids & {id(o) for o in guard.optimizers}:
            continue
        warnings.warn(
            "GradGuard: watch() was called again for the same model and optimizer; the earlier guard is closed "
            "(its report stays available from that object)",
            GradGuardWarning,
            stacklevel=4,
        )
        try:
            guard.close(summary=False)
        except GradGuardError:  # strict mode's verdict on the earlier run: its report holds it
            pass


__all__ = ["LoopGuard", "watch"]
