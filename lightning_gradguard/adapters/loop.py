"""The plain PyTorch adapter: one added line in a hand-written training loop.

::

    guard = watch(model, optimizer, log_dir="runs/exp1")      # the one added line
    for x, y in loader:
        loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

A plain loop calls nothing GradGuard could hook into, so the adapter installs hooks that translate the loop's own
events into the engine's calls (:mod:`lightning_gradguard.core.engine`):

* **step check**: ``optimizer.register_step_pre_hook`` runs :meth:`~GradGuardEngine.check_step` right before
  each ``optimizer.step()``, before any weight changes (strict mode raises from there);
* **backward passes**: a gradient hook on each trainable parameter notices the first gradient of a backward pass
  (before autograd accumulates any of them into ``.grad``) and brackets the pass with
  :meth:`~GradGuardEngine.before_backward` and, through ``queue_callback``, :meth:`~GradGuardEngine.after_backward`
  at its end. The hook costs 1-1.5 us per parameter tensor per backward pass; ``torch.autograd.grad`` calls,
  which do not write ``.grad``, are not counted;
* **micro-batches** (gradient accumulation in a hand-written loop): the backward passes between two steps of an
  optimizer form its accumulation window. A backward pass that follows a forward call of ``model`` starts a new
  micro-batch; further backward passes without a new forward call (several losses from one forward) belong to
  the same micro-batch. If ``model`` itself is never called (the loop calls its submodules), each backward pass is
  a micro-batch. When all of an optimizer's gradients are None as a backward pass starts, ``zero_grad`` cleared
  them, and its window starts there (a GAN loop's other optimizer, a step skipped by the AMP scaler).

Under ``torch.amp.GradScaler`` the pre-step hook runs inside ``scaler.step`` after unscaling, so norms are
unscaled; for optimizers that unscale themselves (``fused=True``) the scaler sets ``optimizer.grad_scale``, which
the adapter divides out. Steps the scaler skips are not ``optimizer.step()`` calls and are not checked.

Causes (``unused``, ``no_grad``, ``detached`` with the user's source line) come from the engine's diagnosis, which
watches the forward passes since the previous backward pass; it needs no loss tensor, which a plain loop never
shows (there is no hook before ``loss.backward()``).

Several processes: a model wrapped in ``DistributedDataParallel`` (``FullyShardedDataParallel``, ``fully_shard``)
gets the Trainer callback's :class:`~lightning_gradguard.training.context.TrainingContext`, so counts, norms and strict
decisions are global (one collective per logging step, one in :meth:`LoopGuard.close`), and global rank zero alone
writes, prints and warns. FSDP1 accumulates into flat parameters that the optimizer never sees: those are hooked
too, so that backward passes are noticed.
"""

from __future__ import annotations

import atexit
import os
import sys
import warnings
import weakref
from collections.abc import Iterable, Sequence
from itertools import repeat
from operator import attrgetter, is_not
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from lightning_gradguard.config import GuardConfig
from lightning_gradguard.core.engine import GradGuardEngine, StepCheck
from lightning_gradguard.errors import GradGuardError, GradGuardWarning
from lightning_gradguard.isolation import feature
from lightning_gradguard.output.metrics import StagedMetrics, stage_metrics
from lightning_gradguard.output.sinks import print_summary, write_report
from lightning_gradguard.output.sinks.tensorboard import TensorBoardDashboard
from lightning_gradguard.report import GradReport
from lightning_gradguard.training.context import TrainingContext
from lightning_gradguard.training.distributed import Collective
from lightning_gradguard.training.strategies import DDP, FSDP, FSDP2, StrategyInfo, class_names, describe_module

DEFAULT_LOG_EVERY_N_STEPS = 50  # Lightning's default cadence
_GRAD = attrgetter("grad")




class LoopGuard:
    r"""GradGuard for a hand-written PyTorch training loop (see :func:`watch`, which builds one).

    Args:
        model: the model being trained; its parameter names are the names in the report.
        optimizers: the optimizer, or several; each one's ``step()`` is checked.
        log_dir: write TensorBoard scalars, the dashboard and ``gradguard.json`` to this directory.
        writer: a ``SummaryWriter`` (``torch.utils.tensorboard`` or tensorboardX) to write to instead; the report
            JSON goes to its log directory. Pass ``log_dir`` or ``writer``, not both.
        strict: raise :class:`~lightning_gradguard.GradGuardError` from ``optimizer.step()`` at the first step at
            which a checked parameter has no gradient, before any weight changes. Otherwise warn once per parameter.
        allow_none: ``fnmatch`` patterns of parameter names that are never reported.
        log_every_n_steps: write scalars every n optimizer steps (of all optimizers together); ``None``: 50.
        norm_type: the p of the per-parameter p-norm: a positive float or ``"inf"``.
        nonfinite_check, log_granularity, log_module_depth, max_logged_series: as for
            :class:`~lightning_gradguard.GradGuard`.
        histogram_every_n_steps: gradient histograms every n steps (``None``: never).
        gradient_flow_every_n_steps: gradient-flow image every n steps and at the first missing gradient (``None``:
            never); needs matplotlib.
        summary: print the report when the guard is closed.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, an optimizer is not a ``torch.optim.Optimizer``, ``writer``
            has no ``add_scalar``, or another argument has the wrong type.
        ValueError: an argument is out of range, both ``log_dir`` and ``writer`` are given, or the optimizers hold
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
        strict: bool = False,
        allow_none: Union[str, Iterable[str]] = (),
        log_every_n_steps: Optional[int] = None,
        norm_type: Union[float, str] = 2.0,
        nonfinite_check: str = "auto",
        log_granularity: str = "auto",
        log_module_depth: Optional[int] = None,
        max_logged_series: int = 256,
        histogram_every_n_steps: Optional[int] = None,
        gradient_flow_every_n_steps: Optional[int] = None,
        summary: bool = True,
    ) -> None:
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
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
        self.optimizers = _optimizer_list(optimizers)
        if not isinstance(summary, bool):
            raise TypeError(f"`summary` must be True or False, got {summary!r}")
        if log_dir is not None and writer is not None:
            raise ValueError("pass either `log_dir` (GradGuard creates a SummaryWriter) or `writer`, not both")
        if log_dir is not None and not isinstance(log_dir, (str, os.PathLike)):
            raise TypeError(f"`log_dir` must be a path (str or os.PathLike), got {log_dir!r}")
        if writer is not None and not callable(getattr(writer, "add_scalar", None)):
            raise TypeError(
                f"`writer` must be a SummaryWriter (torch.utils.tensorboard or tensorboardX), got {type(writer)!r}"
            )
        _replace_earlier_guards(model, self.optimizers)
        self.model = model
        self.summary = summary
        self.log_every_n_steps = self.config.log_every_n_steps or DEFAULT_LOG_EVERY_N_STEPS
        self.engine = GradGuardEngine(self.config, warn=self._warn)
        self.global_step = 0  # optimizer steps checked, all optimizers together (Lightning's global_step)
        self.report_path: Optional[str] = None
        self._disabled: set[str] = set()
        self._closed = False
        self._handles: list[Any] = []
        self._seen_params = 0  # registry entries looked at for the backward-pass detector
        self._unhooked: list[Tensor] = []  # parameters frozen when seen: hooked once they require grad
        self._backward_open = False  # inside a backward pass this adapter bracketed (or chose to ignore)
        self._bracketed = False  # the open backward pass was handed to the engine
        self._forward_since_backward = False
        self._root_forward_seen = False

        self._bind()
        # several processes (DDP, FSDP): counts, norms and strict decisions become global through one collective per
        # logging step, as in the Trainer callback
        self._context = self._distributed_context()
        self._unwritten: list[tuple[StagedMetrics, int]] = []  # logging steps whose values are still on the device
        self._owned_writer = False
        self._log_dir: Optional[str] = os.fspath(log_dir) if log_dir is not None else None
        self.writer = writer
        if self._writes() and log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=self._log_dir)
            self._owned_writer = True
        if self.writer is not None and self._log_dir is None:
            self._log_dir = _writer_log_dir(self.writer)
        self.dashboard: Optional[TensorBoardDashboard] = None
        if self.writer is not None:
            self.dashboard = TensorBoardDashboard(
                [self.writer], self.engine, self.config.histogram_every_n_steps, self.config.gradient_flow_every_n_steps
            )
            self.dashboard.start(amp=self._amp())
        self._install_hooks()
        _close_at_exit(self)

    # ------------------------------------------------------------------ public
    def _report_internal_error(self, message: str) -> None:
        warnings.warn(message, GradGuardWarning, stacklevel=3)

    def report(self) -> GradReport:
        """The :class:`~lightning_gradguard.report.GradReport` for the steps so far."""
        return self.engine.report()

    def close(self) -> GradReport:
        """Remove every hook, print the summary, write ``gradguard.json`` and the dashboard's final report.

        Safe to call more than once; returns the final report. With several processes (DDP, FSDP) it makes one
        collective, so that the last steps' counts are global: call it on every rank, at the same point (as for
        ``torch.distributed.destroy_process_group``). A guard left open is closed at interpreter exit without a
        collective (its report then holds the counts of the last logging step plus this rank's own since).
        """
        return self._close(at_exit=False)

    def _close(self, at_exit: bool) -> GradReport:
        if self._closed:
            return self.report()
        self._closed = True
        self.engine.end_diagnosis()  # a window still open (the loop raised or ended early): instruments come out
        self._finish_context(collective=not at_exit)
        report = self.report()
        self._write_logs(wait=True)
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._finish(report)
        return report

    def __enter__(self) -> LoopGuard:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ what adapters override
    def _bind(self) -> None:
        # names as the user wrote them: without the "module." of a (Distributed)DataParallel wrapper
        named = _unwrap_data_parallel(self.model)
        self.engine.bind(named.named_parameters(), module=named)
        trainable = set()
        for optimizer in self.optimizers:
            _, params = self.engine.registry.optimizer_params(optimizer)
            trainable.update(id(p) for p in params if p.requires_grad)
        if not trainable:
            self.engine.end_diagnosis()
            raise ValueError("the optimizers hold no trainable parameter: nothing for GradGuard to check")
        self.engine.audit(self.optimizers)  # unregistered tensors, parameters in no optimizer
        self._measure_every_step = self.config.measures_every_step(self.engine.registry.params)

    def _install_hooks(self) -> None:
        self._handles.append(self.model.register_forward_pre_hook(self._on_forward))
        for optimizer in self.optimizers:
            self._handles.append(optimizer.register_step_pre_hook(self._on_step_pre_hook))
        self._hook_new_params()
        self._hook_flat_params(self.model)

    def _hook_flat_params(self, root: nn.Module) -> None:
        """FSDP1 accumulates into its flat parameters, not into the views the optimizer holds: hook those too."""
        for module in root.modules():
            flat = getattr(getattr(module, "_handle", None), "flat_param", None)
            if isinstance(flat, Tensor) and flat.requires_grad:
                self._handles.append(flat.register_hook(self._on_grad))

    def _writes(self) -> bool:
        """Whether this process writes TensorBoard output (global rank zero)."""
        import torch.distributed as dist

        return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0

    def _warn(self, message: str) -> None:
        """Warnings come from the process that writes (global rank zero), pointing at the user's line."""
        if self._writes():
            _warn_at_user_code(message)

    def _strategy(self) -> StrategyInfo:
        """How the model is distributed (plain loops: the torch.distributed wrapper around it)."""
        return describe_module(self.model)

    def _distributed_context(self) -> Optional[TrainingContext]:
        info = self._strategy()
        if not info.distributed or info.name not in (DDP, FSDP, FSDP2) or not Collective.available():
            return None
        device = next((p.device for p in self.engine.registry.params if p.device.type != "meta"), None)
        return TrainingContext(self.engine, info, collective=Collective(device=device), warn=self._warn,
                               ddp_fix=self._ddp_fix())

    def _ddp_fix(self) -> str:
        return "DistributedDataParallel(model, find_unused_parameters=True)"

    @feature("distributed")
    def _finish_context(self, collective: bool) -> None:
        if self._context is None:
            return
        if collective:  # every rank closes its guard at the same point: the last steps' counts become global
            self._context.finish()
        else:  # at interpreter exit another rank may be gone already: no collective, the hooks come off
            self._context.release()

    def _amp(self) -> bool:
        return False

    # ------------------------------------------------------------------ forward and backward passes
    def _on_forward(self, module: nn.Module, args: Any) -> None:
        if torch.is_grad_enabled():  # evaluation under no_grad is not a micro-batch
            self._forward_since_backward = True
            self._root_forward_seen = True

    def _hook_new_params(self) -> None:
        """Put the backward-pass detector on every trainable parameter that does not have it yet.

        Called at every step; costs nothing unless parameters were added (``add_param_group``) or some are frozen,
        which are looked at again each step so that unfreezing them mid-run (fine-tuning) is noticed.
        """
        params = self.engine.registry.params
        if self._seen_params < len(params):
            self._unhooked.extend(params[self._seen_params :])
            self._seen_params = len(params)
        if not self._unhooked:
            return
        still_frozen = []
        for param in self._unhooked:
            if param.requires_grad:
                self._handles.append(param.register_hook(self._on_grad))
            else:
                still_frozen.append(param)
        self._unhooked = still_frozen

    def _on_grad(self, grad: Tensor) -> None:
        # called for each parameter's gradient; only the first of a backward pass does anything
        if not self._backward_open:
            self._on_backward_start()

    @feature("check")
    def _on_backward_start(self) -> None:
        self._backward_open = True
        torch.autograd.Variable._execution_engine.queue_callback(self._on_backward_end)
        if not _accumulates_into_grad():
            self._bracketed = False  # torch.autograd.grad(): gradients are returned, .grad is untouched
            return
        self._bracketed = True
        engine = self.engine
        cleared: list[torch.optim.Optimizer] = []
        for optimizer in self.optimizers:
            _, params = engine.registry.optimizer_params(optimizer)
            if not any(map(is_not, map(_GRAD, params), repeat(None))):  # every .grad None: zero_grad ran
                engine.restart_window(optimizer)
                cleared.append(optimizer)
        if self._forward_since_backward or not self._root_forward_seen:
            if self._context is not None:  # DDP: this micro-batch's own arrivals, per rank
                self._context.start_micro_batch()
            engine.start_micro_batch()
        self._forward_since_backward = False
        # one optimizer whose gradients were all just seen None: the snapshot need not read them again
        engine.before_backward(None, cleared=cleared[0] if len(cleared) == 1 == len(self.optimizers) else None)

    def _on_backward_end(self) -> None:
        self._backward_open = False
        if self._bracketed:
            self._bracketed = False
            self._after_backward()

    @feature("check")
    def _after_backward(self) -> None:
        self.engine.after_backward()

    # ------------------------------------------------------------------ optimizer steps
    def _on_step_pre_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: dict[str, Any]) -> None:
        # optimizers that unscale inside their kernel (fused=True): GradScaler.step leaves the gradients scaled and
        # sets `optimizer.grad_scale` (None when they were unscaled already) for the duration of the step
        scale = getattr(optimizer, "grad_scale", None)
        self._check(optimizer, scale if isinstance(scale, Tensor) else None)

    def _check(self, optimizer: torch.optim.Optimizer, grad_scale: Optional[Tensor] = None) -> None:
        if self._closed:
            return
        try:
            self._check_step(optimizer, grad_scale)
        except GradGuardError as err:  # strict mode: the report reaches TensorBoard before the raise
            self._dashboard_report(err.report, f"GradGuard stopped training at step {err.step}")
            raise

    @feature("check")
    def _check_step(self, optimizer: torch.optim.Optimizer, grad_scale: Optional[Tensor]) -> None:
        self._hook_new_params()
        step = self.global_step
        self.global_step += 1
        due = (step + 1) % self.log_every_n_steps == 0
        log = self.writer is not None and "log" not in self._disabled and due
        # with several ranks every rank measures on the same steps (rank zero alone logs): shard norms add up
        measure = self._measure_every_step or (due and (log or self._context is not None))
        # the scale only when there is one: plain fp32 loops use the engine's basic signature
        scaled = {"grad_scale": grad_scale} if grad_scale is not None else {}
        check = self.engine.check_step(optimizer, step=step, measure=measure, **scaled)
        if self._context is not None:
            self._distributed_step(check, step, measure)
        if self._unwritten:  # earlier logging steps whose copies have landed by now
            self._write_logs()
        if log:
            self._log(check, step)
        self._dashboard_check(check, step)

    @feature("distributed")
    def _distributed_step(self, check: StepCheck, step: int, measured: bool) -> None:
        context = self._context
        if context.reduce_due(step, self.log_every_n_steps):  # every rank, same step: the one collective
            context.reduce([check])

    @feature("log")
    def _log(self, check: StepCheck, step: int) -> None:
        # the copy to the host starts now and is written once it has landed (on the CPU: right away), so the
        # device never waits for logging
        self._unwritten.append((stage_metrics(self.engine, [check], scalars=self._device_scalars()), step))
        self._write_logs()

    @feature("log")
    def _write_logs(self, wait: bool = False) -> None:
        while self._unwritten and (wait or self._unwritten[0][0].ready()):
            staged, step = self._unwritten.pop(0)
            for tag, value in staged.result().items():
                self.writer.add_scalar(tag, value, step)

    def _device_scalars(self) -> dict[str, Tensor]:
        """Further 0-dim device tensors to log; they share the logging step's one host copy."""
        return {}

    # ------------------------------------------------------------------ dashboard and report
    @feature("dashboard")
    def _dashboard_check(self, check: StepCheck, step: int) -> None:
        if self.dashboard is not None:
            self.dashboard.after_check(check, step)

    @feature("dashboard")
    def _dashboard_report(self, report: Optional[GradReport], title: str) -> None:
        if self.dashboard is not None and report is not None:
            self.dashboard.write_report(report, max(self.global_step - 1, 0), title)
            self.dashboard.flush()

    def _finish(self, report: GradReport) -> None:
        if not self._writes():
            return
        if self.summary:
            print_summary(report)
        try:
            if self._log_dir is not None:
                self.report_path = write_report(report, self._log_dir)
            if self.dashboard is not None:
                self.dashboard.finish(report, self.global_step)
            if self._owned_writer:
                self.writer.close()
        except Exception as err:  # noqa: BLE001 - the report was printed; a full disk must not raise at exit
            warnings.warn(
                f"GradGuard: could not write the report ({type(err).__name__}: {err})", GradGuardWarning, stacklevel=2
            )


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
        **options: any other :class:`LoopGuard` argument (``log_every_n_steps``, ``norm_type``,
            ``histogram_every_n_steps``, ``gradient_flow_every_n_steps``, ``summary``, ...).

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


def _accumulates_into_grad() -> bool:
    """Whether the running backward pass writes ``.grad`` (``backward()``) or returns gradients (``autograd.grad``)."""
    try:
        node = torch._C._current_autograd_node()
        return node is None or bool(torch._C._will_engine_execute_node(node))
    except RuntimeError:  # "... we are currently running autograd.grad()"
        return False
    except AttributeError:  # private helpers missing in some release: assume the common case
        return True


def _warn_at_user_code(message: str) -> None:
    """Warn with the location of the user's line (``optimizer.step()``), not of a hook inside torch or GradGuard."""
    internal = (os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(os.path.abspath(torch.__file__)))
    level, frame = 2, sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(internal):
        frame = frame.f_back
        level += 1
    warnings.warn(message, GradGuardWarning, stacklevel=level)


def _writer_log_dir(writer: Any) -> Optional[str]:
    get = getattr(writer, "get_logdir", None)
    if callable(get):
        return get()
    return getattr(writer, "log_dir", None) or getattr(writer, "logdir", None)


_open_guards: weakref.WeakSet = weakref.WeakSet()
_exit_hook: list[bool] = []


def _close_at_exit(guard: LoopGuard) -> None:
    """Close guards the script never closed when the interpreter exits, so the one-line form still reports."""
    if not _exit_hook:
        _exit_hook.append(True)
        atexit.register(_close_open_guards)
    _open_guards.add(guard)


def _unwrap_data_parallel(model: nn.Module) -> nn.Module:
    inner = getattr(model, "module", None)
    if class_names(model) & {"DistributedDataParallel", "DataParallel"} and isinstance(inner, nn.Module):
        return inner
    return model


def _replace_earlier_guards(model: nn.Module, optimizers: Sequence[torch.optim.Optimizer]) -> None:
    """Close an open guard on the same model and optimizer (a notebook cell run twice), so hooks do not pile up."""
    ids = {id(o) for o in optimizers}
    for guard in list(_open_guards):
        if guard._closed or guard.model is not model or not ids & {id(o) for o in guard.optimizers}:
            continue
        warnings.warn(
            "GradGuard: watch() was called again for the same model and optimizer; the earlier guard is closed "
            "(its report stays available from that object)",
            GradGuardWarning,
            stacklevel=4,
        )
        guard.summary = False
        guard.close()


def _close_open_guards() -> None:
    for guard in list(_open_guards):
        try:
            guard._close(at_exit=True)
        except Exception:  # noqa: BLE001 - nothing can be done at exit
            pass


__all__ = ["DEFAULT_LOG_EVERY_N_STEPS", "LoopGuard", "watch"]
