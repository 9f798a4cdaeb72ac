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
  forward pre-hook and a wrapper around ``optimizer.zero_grad`` (and ``model.zero_grad``) record the gradients the
  pass starts from, so a parameter used only in the loss (a learned temperature) counts as well. While the first
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
the adapter divides out. Steps the scaler skips are not ``optimizer.step()`` calls and are not checked. Setting
``p.grad = None`` by hand between ``backward()`` and ``step()`` is not seen (``zero_grad`` is).

Several processes: a model wrapped in ``DistributedDataParallel`` (``FullyShardedDataParallel``, ``fully_shard``)
gets the Trainer callback's :class:`~lightning_gradguard.training.context.TrainingContext`, so counts, norms and
strict decisions are global (one collective per logging step, one in :meth:`LoopGuard.close`), and global rank zero
alone writes, prints and warns. FSDP1 accumulates into flat parameters that the optimizer never sees: those are
hooked too.
"""

from __future__ import annotations

import atexit
import os
import warnings
import weakref
from collections.abc import Iterable, Sequence
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from lightning_gradguard.adapters.watcher import MethodWrapper, Watcher
from lightning_gradguard.config import GuardConfig
from lightning_gradguard.errors import GradGuardWarning
from lightning_gradguard.isolation import feature
from lightning_gradguard.training.strategies import class_names, describe_module

_MAX_OUTPUTS = 64  # output tensors hooked per forward call (a model returning a long list of tensors)


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
        )
        self._backward_open = False  # inside a backward pass this adapter bracketed (or chose to ignore)
        self._bracketed = False  # the open backward pass was handed to the engine
        self._through_model = False  # the open backward pass reached the model's outputs
        self._forward_since_backward = False
        self._root_forward_seen = False
        self._marked = False  # the gradients the next backward pass starts from are recorded
        self._stepped = False  # an optimizer stepped since the last backward pass ended
        self._restarts: list[torch.optim.Optimizer] = []  # zero_grad since their last step
        self._param_hooks: list[Any] = []  # the per-parameter detector, while it is needed
        self._param_mode = True
        self._all_through_model = True  # every backward pass of the first window reached the model's outputs
        self._seen_params = 0  # registry entries looked at for the per-parameter detector
        self._unhooked: list[Tensor] = []  # parameters frozen when seen: hooked once they require grad
        self._handles.append(_RemoveAll(self._param_hooks))
        self._mark(None)  # the first backward pass starts from the gradients as they are now
        self._install()
        _close_at_exit(self)

    # ------------------------------------------------------------------ hooks
    def _install(self) -> None:
        model = self.model
        self._handles.append(model.register_forward_pre_hook(self._on_forward_start))
        self._handles.append(model.register_forward_hook(self._on_forward_end))
        for optimizer in self.optimizers:
            self._handles.append(optimizer.register_step_pre_hook(self._on_step_pre_hook))
            self._handles.append(optimizer.register_step_post_hook(self._on_step_post_hook))
            self._handles.append(_wrap_zero_grad(optimizer, self._after_zero_grad))
        self._handles.append(_wrap_zero_grad(model, self._after_zero_grad))
        self._hook_new_params()
        for module in model.modules():  # FSDP1 accumulates into flat parameters the optimizer never sees
            flat = getattr(getattr(module, "_handle", None), "flat_param", None)
            if isinstance(flat, Tensor) and flat.requires_grad:
                self._handles.append(flat.register_hook(self._on_param_grad))

    def _on_forward_start(self, module: nn.Module, args: Any) -> None:
        if torch.is_grad_enabled():  # evaluation under no_grad is not a micro-batch
            self._forward_since_backward = True
            self._root_forward_seen = True

    def _on_forward_end(self, module: nn.Module, args: Any, output: Any) -> None:
        if not torch.is_grad_enabled():
            return
        hooked: list[Any] = []
        for tensor in _tensors(output):
            node = tensor.grad_fn
            if node is not None and len(hooked) < _MAX_OUTPUTS and not any(node is n for n in hooked):
                node.register_prehook(self._on_output_grad)  # runs when a backward pass reaches the output
                hooked.append(node)

    def _after_zero_grad(self, owner: Any, set_to_none: bool) -> None:
        if isinstance(owner, torch.optim.Optimizer):
            # cleared without a step: if a backward pass comes before its next step (a GAN's other network, a step
            # the AMP scaler skipped), the window starts there; if its step comes first, it stepped on nothing
            if owner not in self._restarts:
                self._restarts.append(owner)
            self._mark(owner if set_to_none else None)
        else:
            self._mark(None)

    @feature("check")
    def _mark(self, cleared: Optional[torch.optim.Optimizer]) -> None:
        if self._backward_open:
            return
        self.engine.mark_gradients(cleared)
        self._marked = True

    def _hook_new_params(self) -> None:
        """Put the per-parameter detector on every trainable parameter that does not have it yet (first window,
        or for good when the loop does not go through ``model``); frozen ones are looked at again each step."""
        if not self._param_mode:
            return
        params = self.engine.registry.params
        if self._seen_params < len(params):
            self._unhooked.extend(params[self._seen_params :])
            self._seen_params = len(params)
        still_frozen = []
        for param in self._unhooked:
            if param.requires_grad:
                self._param_hooks.append(param.register_hook(self._on_param_grad))
            else:
                still_frozen.append(param)
        self._unhooked = still_frozen

    def _on_output_grad(self, grad_outputs: Any) -> None:
        if not self._backward_open:
            self._on_backward_start(torch._C._current_autograd_node())
        self._through_model = True

    def _on_param_grad(self, grad: Tensor) -> None:
        # called for each parameter's gradient; only the first of a backward pass does anything
        if not self._backward_open:
            self._on_backward_start()

    def _on_backward_start(self, output_node: Any = None) -> None:
        self._backward_open = True
        self._through_model = False
        torch.autograd.Variable._execution_engine.queue_callback(self._on_backward_end)
        if not _accumulates_into_grad(output_node):
            self._bracketed = False  # torch.autograd.grad(): gradients are returned, .grad is untouched
            return
        self._bracketed = True
        for optimizer in self._restarts:
            self.engine.restart_window(optimizer)
        self._restarts.clear()
        if not self._marked:  # no zero_grad since the last backward pass: the baseline is what that one left
            if self._stepped:  # ... unless a step came in between (gradients kept across steps): read them now
                self.engine.mark_gradients()
            else:
                self.engine.keep_baseline()
        new_micro_batch = self._forward_since_backward or not self._root_forward_seen
        self._forward_since_backward = False
        self.backward_started(new_micro_batch=new_micro_batch)

    def _on_backward_end(self) -> None:
        self._backward_open = False
        if self._bracketed:
            self._bracketed = False
            self._all_through_model = self._all_through_model and self._through_model
            self._marked = False
            self._stepped = False
            self.backward_ended()

    def _on_step_pre_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: dict[str, Any]) -> None:
        # optimizers that unscale inside their kernel (fused=True): GradScaler.step leaves the gradients scaled and
        # sets `optimizer.grad_scale` (None when they were unscaled already) for the duration of the step
        if optimizer in self._restarts:
            self._restarts.remove(optimizer)
        scale = getattr(optimizer, "grad_scale", None)
        self.before_step(optimizer, scale if isinstance(scale, Tensor) else None)

    def _on_step_post_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: dict[str, Any]) -> None:
        self._stepped = True
        self.after_step()
        self._after_first_window()

    def _after_first_window(self) -> None:
        """After each step: the per-parameter detector comes off once the model's outputs proved enough."""
        if not self._param_mode:
            return
        if self._root_forward_seen and self._all_through_model:
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
        optimizer: its optimizer, or a list of optimizers.
        log_dir: TensorBoard log directory for scalars, the dashboard and ``gradguard.json``.
        writer: an existing ``SummaryWriter`` instead of ``log_dir``.
        strict: raise :class:`~lightning_gradguard.GradGuardError` from ``optimizer.step()`` at the first missing
            gradient, before the weights change.
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


def _wrap_zero_grad(owner: Any, after: Any) -> MethodWrapper:
    """Call ``after(owner, set_to_none)`` after each ``owner.zero_grad(...)``."""

    def zero_grad(original: Any, *args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        after(owner, bool(kwargs.get("set_to_none", args[0] if args else True)))
        return out

    return MethodWrapper(owner, "zero_grad", zero_grad)


def _tensors(output: Any) -> Iterable[Tensor]:
    """The tensors a forward call returned: the output itself, or those in a tuple, list, dict or dataclass."""
    if isinstance(output, Tensor):
        yield output
        return
    if isinstance(output, dict):
        values: Iterable[Any] = output.values()
    elif isinstance(output, (list, tuple)):
        values = output
    elif hasattr(output, "__dataclass_fields__"):
        values = (getattr(output, name, None) for name in output.__dataclass_fields__)
    else:
        return
    for value in values:
        if isinstance(value, Tensor):
            yield value


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
    items = [optimizers] if isinstance(optimizers, torch.optim.Optimizer) else optimizers
    try:
        items = list(items)
    except TypeError:
        raise TypeError(
            f"`optimizer` must be a torch.optim.Optimizer or a list of them, got {type(optimizers).__name__}"
        ) from None
    if not items:
        raise ValueError("`optimizer` must name at least one torch.optim.Optimizer")
    for item in items:
        if not isinstance(item, torch.optim.Optimizer):
            raise TypeError(
                f"`optimizer` must be a torch.optim.Optimizer or a list of them, got {type(item).__name__}"
            )
    return items


def _rank_zero() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _accumulates_into_grad(output_node: Any = None) -> bool:
    """Whether the running backward pass writes ``.grad`` (``backward()``) or returns gradients (``autograd.grad``).

    The engine says whether it will run a parameter's ``AccumulateGrad`` node: from a parameter's own hook that is
    the current node; from a hook on the model's output, the nearest such node behind the output's ``grad_fn``.
    """
    try:
        node = torch._C._current_autograd_node() if output_node is None else _nearest_accumulate(output_node)
        return node is None or bool(torch._C._will_engine_execute_node(node))
    except RuntimeError:  # "... we are currently running autograd.grad()"
        return False
    except AttributeError:  # private helpers missing in some release: assume the common case
        return True


def _nearest_accumulate(node: Any, budget: int = 64) -> Any:
    """The first ``AccumulateGrad`` node (a parameter's) found breadth-first behind ``node``, within ``budget``."""
    queue, seen = [node], {node}
    while queue and budget > 0:
        current = queue.pop(0)
        budget -= 1
        if type(current).__name__ == "AccumulateGrad":
            return current
        for parent, _ in current.next_functions:
            if parent is not None and parent not in seen:
                seen.add(parent)
                queue.append(parent)
    return None


def _unwrap_data_parallel(model: nn.Module) -> nn.Module:
    inner = getattr(model, "module", None)
    if class_names(model) & {"DistributedDataParallel", "DataParallel"} and isinstance(inner, nn.Module):
        return inner
    return model


_open_guards: weakref.WeakSet = weakref.WeakSet()
_exit_hook: list[bool] = []


def _close_at_exit(guard: LoopGuard) -> None:
    """Close guards the script never closed when the interpreter exits, so the one-line form still reports."""
    if not _exit_hook:
        _exit_hook.append(True)
        atexit.register(_close_open_guards)
    _open_guards.add(guard)


def _replace_earlier_guards(model: nn.Module, optimizers: Sequence[torch.optim.Optimizer]) -> None:
    """Close an open guard on the same model and optimizer (a notebook cell run twice), so hooks do not pile up."""
    ids = {id(o) for o in optimizers}
    for guard in list(_open_guards):
        if guard.closed or guard.model is not model or not ids & {id(o) for o in guard.optimizers}:
            continue
        warnings.warn(
            "GradGuard: watch() was called again for the same model and optimizer; the earlier guard is closed "
            "(its report stays available from that object)",
            GradGuardWarning,
            stacklevel=4,
        )
        guard.close(summary=False)


def _close_open_guards() -> None:
    for guard in list(_open_guards):
        try:
            guard._close(collective=False)
        except Exception:  # noqa: BLE001 - nothing can be done at exit
            pass


__all__ = ["LoopGuard", "watch"]
