"""A check before training, for unit tests and notebooks: does every trainable parameter receive a gradient?

One forward and one backward pass under GradGuard's engine, with the diagnosis on, and no optimizer step; the model
is left as it was found (gradients, training modes, ``requires_grad``, buffers, grad mode, random generators). A
``LightningModule``'s ``training_step`` runs without a Trainer through Lightning's own route for that, a ``fabric``
attribute: for the duration of the call it is a stand-in that observes ``backward``, drops ``log`` and answers
``self.trainer.global_step``/``current_epoch``/``optimizers``; manual optimization's optimizers check their
``step()`` instead of taking it.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import fields, is_dataclass
from types import SimpleNamespace
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy

from lightning_gradguard.config import GuardConfig
from lightning_gradguard.core.diagnosis.graph import leaf_tensors
from lightning_gradguard.core.engine import GradGuardEngine
from lightning_gradguard.errors import GradGuardWarning
from lightning_gradguard.report import GradReport

Optimizers = Union[torch.optim.Optimizer, Sequence[torch.optim.Optimizer], None]


def check_gradients(
    model: nn.Module,
    batch: Any,
    loss_fn: Optional[Callable[[Any], Any]] = None,
    optimizer: Optimizers = None,
    allow_none: Union[str, Iterable[str]] = (),
) -> GradReport:
    """Run one forward and backward pass and report every trainable parameter that received no gradient, and why.

    Args:
        model: an ``nn.Module``, or a ``LightningModule``: then ``training_step(batch, 0)`` gives the loss, and under
            manual optimization its ``manual_backward`` calls are observed and each ``optimizer.step()`` is checked,
            not taken.
        batch: what an ``nn.Module`` is called with, as Lightning calls a model on its ``example_input_array``: a
            tuple or list is unpacked, ``model(*batch)``; a dict gives keyword arguments, ``model(**batch)``;
            anything else is passed as it is. ``(batch,)`` passes a list or dict whole. A ``LightningModule`` gets
            it as it is.
        loss_fn: the loss of an ``nn.Module`` is ``loss_fn(output)``; without it, the output when it is a scalar,
            else its ``loss`` field when it has one that is not None (a dict, a dataclass: a Hugging Face
            ``ModelOutput``), else the sum of every floating-point tensor in it (nested tuples, lists, dicts and
            dataclasses too).
        optimizer: the optimizer (or a list of them) that will train the model: parameters it leaves out are
            ``not_in_optimizer`` findings. Manual optimization gets them from ``self.optimizers()``; without them,
            the model's ``configure_optimizers()`` is called.
        allow_none: ``fnmatch`` patterns of parameters that may go without a gradient, as in ``GradGuard``.

    Returns:
        The report (``ok``, ``missing``, ``params[name].cause`` and ``.detail``, ``findings``). A loss without
        autograd history is no error: every parameter is reported, with the line that cut the graph.

    Raises:
        TypeError, ValueError: an argument is not one the function accepts (an ``optimizer`` that holds none of
            the model's trainable parameters included); the message names it.

    Example::

        report = check_gradients(model, torch.randn(8, 16), loss_fn=lambda logits: logits.logsumexp(-1).mean())
        assert report.ok, report.summary()

    """
    return _Preflight(model, loss_fn, optimizer, allow_none).run(batch)[0]


def assert_gradients_flow(
    model: nn.Module,
    batch: Any,
    loss_fn: Optional[Callable[[Any], Any]] = None,
    optimizer: Optimizers = None,
    allow_none: Union[str, Iterable[str]] = (),
) -> GradReport:
    """:func:`check_gradients`, raising ``AssertionError`` when a parameter gets no gradient or something is found.

    The message is the one ``GradGuard(strict=True)`` raises in training (every parameter without a gradient,
    grouped by module, with its cause, source line and fix), followed by the static findings and any non-finite
    gradient. Arguments as in :func:`check_gradients`.

    Returns:
        The report, when every checked parameter received a finite gradient and nothing was found.

    Example::

        def test_every_parameter_learns():
            assert_gradients_flow(Classifier(), torch.randn(8, 16))

    """
    __tracebackhide__ = True  # pytest shows the user's test line, not this function
    report, failures = _Preflight(model, loss_fn, optimizer, allow_none).run(batch)
    if not report.ok:
        if report.warnings:  # notes (a target network no gradient reaches) are not failures
            n = len(report.warnings)
            failures.append(f"GradGuard found {n} problem{'s' if n != 1 else ''} in the training set-up:")
            failures.extend(f"  [{f.kind}] {f.name}: {f.detail}" for f in report.warnings)
        if report.nonfinite:
            failures.append(f"GradGuard: non-finite (NaN or Inf) gradients in {', '.join(report.nonfinite)}")
        raise AssertionError("\n".join(failures))
    return report


class _Preflight:
    """One check: the engine, what it changes in the model while it runs, and how it puts it back."""

    def __init__(self, model: Any, loss_fn: Any, optimizer: Any, allow_none: Any) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module or a LightningModule, got {type(model).__name__}")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"`loss_fn` must be a callable that takes the model's output and returns the loss, got "
                            f"{loss_fn!r}")
        self.lightning = _lightning_package(model)
        if self.lightning is not None and loss_fn is not None:
            raise ValueError("`loss_fn` applies to an nn.Module; a LightningModule's loss comes from its "
                             "training_step (leave loss_fn out)")
        items = list(optimizer) if isinstance(optimizer, (list, tuple)) else [] if optimizer is None else [optimizer]
        for item in items:
            if not isinstance(item, torch.optim.Optimizer):
                raise TypeError(f"`optimizer` must be a torch.optim.Optimizer or a list of them, got {item!r}")
        config = GuardConfig.create(allow_none=allow_none)  # names `allow_none` when it is wrong
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        if not self.trainable:
            raise ValueError("`model` has no parameter with requires_grad=True: there is no gradient to check")
        ids = {id(p) for p in self.trainable}
        if items and not any(id(p) in ids for opt in items for group in opt.param_groups for p in group["params"]):
            raise ValueError("`optimizer` holds no trainable parameter of `model` (built for another instance of "
                             "it, or before its parameters were replaced?): pass the optimizer that will train it")
        self.model, self.loss_fn, self.optimizers = model, loss_fn, items
        self.engine = GradGuardEngine(config, warn=self._warn)
        self.failures: list[str] = []  # GradGuard's message for each check that found parameters without gradient
        self.checks = 0
        self._muted = False
        self._in_backward = False
        self._grads: dict[int, tuple[Tensor, Optional[Tensor]]] = {}  # id -> (tensor, its .grad before the call)

    def run(self, batch: Any) -> tuple[GradReport, list[str]]:
        model = self.model
        modes = [(m, m.training) for m in model.modules()]
        flags = [(p, p.requires_grad) for p in model.parameters()]
        buffers = [(m, name, b, b.detach().clone())
                   for m in model.modules() for name, b in m.named_buffers(recurse=False) if not is_lazy(b)]
        # a lazy batch norm's statistics take their shape in the check's forward: reset to their initial values then
        lazy_stats = [m for m in model.modules()
                      if hasattr(m, "reset_running_stats") and any(is_lazy(b) for b in m.buffers(recurse=False))]
        devices = sorted({p.device.index or 0 for p in self.trainable if p.device.type == "cuda"})
        self._stash(model.parameters())
        standin = _LightningStandIn(self) if self.lightning is not None else None
        try:
            with torch.inference_mode(False), torch.enable_grad(), torch.random.fork_rng(devices=devices):
                if standin is not None:
                    standin.install()
                self.engine.bind(model.named_parameters(), module=model)  # opens a diagnosis window
                self._muted = True  # the report carries the findings, including those the audit finds later
                self.engine.audit(self.optimizers)
                model.train()
                self.engine.start_micro_batch()
                self._step(batch)
                if not self.checks:  # a throwaway optimizer over the trainable parameters, never stepped
                    self.check(torch.optim.SGD(self.trainable, lr=0.0))
        finally:
            self.engine.end_diagnosis()
            self._muted = False
            if standin is not None:
                standin.remove()
            for module, training in modes:
                module.training = training
            for param, requires_grad in flags:
                if param.requires_grad != requires_grad:  # a lazy parameter never called refuses any call
                    param.requires_grad_(requires_grad)
            for tensor, grad in self._grads.values():
                tensor.grad = grad
            with torch.no_grad():
                for module, name, buffer, saved in buffers:  # batch_norm updates its statistics without a version bump
                    if getattr(module, name, None) is not buffer:
                        setattr(module, name, buffer)
                    buffer.copy_(saved)
                for module in lazy_stats:
                    if not any(is_lazy(b) for b in module.buffers(recurse=False)):
                        module.reset_running_stats()
        self._muted = True  # the report says what the findings are; no warning besides
        try:
            return self.engine.report(), self.failures
        finally:
            self._muted = False

    def _step(self, batch: Any) -> None:
        model = self.model
        if self.lightning is None:
            unpacked = isinstance(batch, (tuple, list))
            output = model(*batch) if unpacked else model(**batch) if isinstance(batch, Mapping) else model(batch)
            loss = _loss_of(output) if self.loss_fn is None else _as_loss(self.loss_fn(output), "`loss_fn`")
            self.backward(loss, loss.backward)
            return
        output = model.training_step(batch, 0)
        if not model.automatic_optimization:
            return  # its manual_backward calls and optimizer steps were observed while it ran
        if output is None:
            raise ValueError("training_step returned None (Lightning skips such a batch): there is no loss to check; "
                             "pass a batch for which it returns the loss")
        if isinstance(output, Mapping):
            if "loss" not in output:
                raise ValueError(f"training_step returned a dict without a 'loss' key (keys: {list(output)})")
            output = output["loss"]
        loss = _as_loss(output, "training_step")
        self.backward(loss, lambda: model.backward(loss))  # the model's own backward hook, if it overrides it

    def backward(self, loss: Tensor, run: Callable[[], Any]) -> None:
        """Observe one backward pass from ``loss``; ``run`` performs it."""
        if self._in_backward:  # LightningModule.backward calling the stand-in Fabric's backward
            run()
            return
        self.engine.before_backward(loss)
        self._stash(leaf_tensors(loss))  # inputs of the batch that require grad get theirs back too
        self._in_backward = True
        try:
            if loss.requires_grad:  # a loss without history: nothing arrives, and the diagnosis says why
                run()
        finally:
            self._in_backward = False
        self.engine.after_backward()

    def check(self, optimizer: torch.optim.Optimizer) -> None:
        """Check the parameters ``optimizer`` would update now (it is never stepped)."""
        muted, self._muted = self._muted, True  # the report carries what the warning would say
        try:
            result = self.engine.check_step(optimizer, step=self.checks, measure=True)
        finally:
            self._muted = muted
        self.checks += 1
        if result.missing:
            self.failures.append(self.engine.describe_missing(result))

    def _stash(self, tensors: Iterable[Tensor]) -> None:
        """Keep each tensor's ``.grad`` aside (put back at the end) and start it from None."""
        for tensor in tensors:
            if id(tensor) not in self._grads:
                self._grads[id(tensor)] = (tensor, tensor.grad)
                if tensor.grad is not None:
                    tensor.grad = None

    def _warn(self, message: str) -> None:
        if not self._muted:  # an internal error of the diagnosis
            warnings.warn(message, GradGuardWarning, stacklevel=3)


class _LightningStandIn:
    """The Trainer-less context a LightningModule's ``training_step`` runs in (see the module docstring)."""

    global_step = current_epoch = global_rank = local_rank = node_rank = 0
    world_size, is_global_zero, training, sanity_checking = 1, True, True, False
    logger = progress_bar_callback = None

    def __init__(self, preflight: _Preflight) -> None:
        self._preflight = preflight
        self.loggers: list[Any] = []
        self.optimizers: list[torch.optim.Optimizer] = list(preflight.optimizers)
        self.lr_scheduler_configs: list[Any] = []
        self._saved: list[tuple[Any, Any, Any]] = []

    def install(self) -> None:
        model, preflight = self._preflight.model, self._preflight
        if not model.automatic_optimization and not self.optimizers:
            try:
                configured = model.configure_optimizers()
            except Exception as err:
                raise RuntimeError(
                    f"check_gradients called {type(model).__name__}.configure_optimizers() to get the optimizers "
                    f"of its manual optimization, and it raised {type(err).__name__}: {err}. Pass them instead: "
                    "check_gradients(model, batch, optimizer=[...])"
                ) from err
            parse = importlib.import_module(f"{preflight.lightning}.core.optimizer")._configure_optimizers
            self.optimizers, schedulers, _ = parse(configured)
            self.lr_scheduler_configs = [
                SimpleNamespace(scheduler=_Held(s["scheduler"] if isinstance(s, Mapping) else s)) for s in schedulers
            ]
        lightning_module = sys.modules[preflight.lightning].LightningModule
        self._saved = [(m, m._fabric, m._fabric_optimizers) for m in model.modules() if isinstance(m, lightning_module)]
        model.fabric = self  # LightningModule's own route for running without a Trainer (it sets the children too)
        model._fabric_optimizers = [_Held(opt, preflight.check) for opt in self.optimizers]

    def remove(self) -> None:
        for module, fabric, optimizers in self._saved:
            object.__setattr__(module, "_fabric", fabric)
            object.__setattr__(module, "_fabric_optimizers", optimizers)

    # what the LightningModule calls on its fabric
    def backward(self, tensor: Tensor, *args: Any, **kwargs: Any) -> None:
        self._preflight.backward(tensor, lambda: tensor.backward(*args, **kwargs))

    def _ignore(self, *args: Any, **kwargs: Any) -> None:
        """Metrics go nowhere; clipping does not matter to gradients that are thrown away."""

    log = log_dict = clip_gradients = _ignore

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(f"check_gradients runs training_step without a Trainer: `self.trainer.{name}` is not "
                             "available (global_step, current_epoch and optimizers are)")


class _Held:
    """An optimizer (or LR scheduler) as a manual ``training_step`` sees it: the real one, except that ``step()``
    runs the closure and is checked, never taken."""

    def __init__(self, wrapped: Any, on_step: Optional[Callable[[Any], None]] = None) -> None:
        self._wrapped = wrapped
        self._on_step = on_step
        try:  # an instance of the wrapped class too: LightningModule.optimizers() returns a single one unwrapped
            self.__class__ = type(type(wrapped).__name__, (_Held, type(wrapped)), {})
        except TypeError:  # a class that cannot be subclassed so (a C extension): the stand-in as it is
            pass

    @property
    def optimizer(self) -> Any:  # a LightningOptimizer's wrapped optimizer; a scheduler's own optimizer
        return getattr(self._wrapped, "optimizer", self._wrapped)

    def step(self, closure: Any = None, *args: Any, **kwargs: Any) -> Any:
        result = closure() if callable(closure) else None
        if self._on_step is not None:
            self._on_step(self._wrapped)
        return result

    def __getattr__(self, name: str) -> Any:
        if name == "_wrapped":  # not set yet (copying, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self._wrapped, name)


def _lightning_package(model: nn.Module) -> Optional[str]:
    """``"lightning.pytorch"`` or ``"pytorch_lightning"`` for a LightningModule (neither is imported for others)."""
    for package in ("lightning.pytorch", "pytorch_lightning"):
        module = sys.modules.get(package)
        if module is not None and isinstance(model, module.LightningModule):
            return package
    return None


def _loss_of(output: Any) -> Tensor:
    """The loss of an ``nn.Module``'s output when no ``loss_fn`` is given (see :func:`check_gradients`)."""
    if isinstance(output, Tensor) and output.dim() == 0:
        return output
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if isinstance(loss, Tensor):
        return _as_loss(loss, "the model's `loss` output")
    tensors = _tensors(output)
    if not tensors:
        raise TypeError(f"the model's output ({type(output).__name__}) holds no tensor to take the loss from: pass "
                        "loss_fn=... (it receives the output and returns the loss)")
    # integer outputs (argmax, a comparison) carry no gradient: left out, and the diagnosis names the line
    return sum((t.sum() for t in tensors if t.is_floating_point()), torch.zeros((), device=tensors[0].device))


def _tensors(value: Any, depth: int = 0) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, Mapping):
        items: Iterable[Any] = value.values()
    elif isinstance(value, (tuple, list)):
        items = value
    elif is_dataclass(value) and not isinstance(value, type):
        items = [getattr(value, f.name) for f in fields(value)]
    else:
        return []
    return [t for item in items for t in _tensors(item, depth + 1)] if depth < 4 else []


def _as_loss(value: Any, source: str) -> Tensor:
    if isinstance(value, Tensor):
        return value if value.dim() == 0 else value.sum()
    if isinstance(value, (int, float)) and not isinstance(value, bool):  # e.g. loss.item(): a cut graph, diagnosed
        return torch.tensor(float(value))
    raise TypeError(f"{source} must give the loss as a tensor, got {type(value).__name__}")


