"""Static findings: trainable tensors nothing will ever train.

Two set-up mistakes leave weights untrained without any ``None`` gradient to notice, because the weights are not
where GradGuard (or the optimizer) looks:

* ``unregistered``: a module attribute holds a trainable tensor that ``model.parameters()`` does not list. A
  tensor with ``requires_grad=True`` assigned as a plain attribute, modules or parameters kept in a plain Python
  ``list``/``tuple``/``dict``, or an ``nn.Parameter`` turned into a plain tensor by ``.to()``/``.cuda()``/a dtype
  cast (or any other operation) after wrapping. No optimizer built from ``model.parameters()`` updates them. Always
  a warning.
* ``not_in_optimizer``: a registered parameter with ``requires_grad=True`` that no optimizer's param groups
  contain. What that means depends on whether gradients reach it, which :class:`OptimizerAudit` watches during
  the run:

  - a gradient reached it: the backward pass computes gradients that nothing applies (a layer left out of
    ``configure_optimizers``; BatchNorm layers that ``BaseFinetuning`` made trainable with ``train_bn=False``
    but left out of the new param group). A **warning**: ``GradReport.ok`` is False.
  - no gradient reached it: nothing trains it and nothing differentiates it, so it changes nothing in training,
    like a frozen tensor. Often deliberate (a DQN target network, an EMA teacher, kept with ``requires_grad=True``
    and used under ``torch.no_grad()``), so it is a **note** (``severity="note"``): in the report, not in
    ``ok``, and never a Python warning. ``requires_grad_(False)`` on it silences the note.

The optimizer audit follows the run (:class:`OptimizerAudit`): it is taken again when an optimizer's param groups
change (the registry's layout version, compared at each step) and when a backward pass reaches a parameter that no
backward pass of the run reached before (the number of parameters a backward pass missed drops to a new low),
which is how an unfrozen layer shows. A one-shot autograd hook on each parameter of a note tells when a gradient
first reaches it, so a note turns into a warning at the next step. Between those events nothing is walked.

Frozen tensors (``requires_grad=False``) and buffers are never findings.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Collection, Iterable, Sequence
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from lightning_gradguard.core.diagnosis.graph import leaf_tensors
from lightning_gradguard.core.registry import ParamRegistry, clean_name
from lightning_gradguard.hooks import user_hook
from lightning_gradguard.report import NOTE, Finding

UNREGISTERED = "unregistered"
NOT_IN_OPTIMIZER = "not_in_optimizer"
AUDIT_KINDS = (UNREGISTERED, NOT_IN_OPTIMIZER)

_MODULE_INTERNALS = frozenset(vars(nn.Module()))
_NOT_TRAINED = (
    "model.parameters() does not list {them}, so no optimizer built from it updates {them} and GradGuard cannot "
    "check {them}"
)


class OptimizerAudit:
    """The ``not_in_optimizer`` check, kept true while the run changes (see the module docstring).

    The engine calls :meth:`start` with the optimizers at the start of training (and sets :attr:`following`),
    :meth:`saw_backward` after each backward pass whose arrivals it knows, and :meth:`follow` at a step when
    :attr:`due` is set or the registry's layout version moved (three attribute reads per step otherwise).
    :meth:`close` takes the hooks off.

    Args:
        registry: the engine's registry.

    Example::

        audit = OptimizerAudit(engine.registry)
        findings = audit.start([optimizer])
        ...  # backward passes, steps
        if audit.due or audit.version != engine.registry.layout_version:
            findings = audit.follow(optimizer)

    """

    def __init__(self, registry: ParamRegistry) -> None:
        self.registry = registry
        self.following = False  # started with optimizers: the step check keeps the findings true
        self.due = False  # something the findings depend on may have changed: follow() at the next step
        self.version = -1  # the registry layout version the findings were taken at
        self.fewest_missed = _NEVER  # the fewest parameters one backward pass of this run missed
        self.reached: set[int] = set()  # registry indices a gradient reached while the guard watched
        self._optimizers: list[weakref.ref] = []
        self._hooks: dict[int, Any] = {}  # registry index -> the one-shot hook waiting for its first gradient
        self._arrived: list[int] = []  # written by the hooks (inside backward), read at the next step
        self._closed = False  # the run ended: no hook goes on again until the next start

    def start(self, optimizers: Iterable[torch.optim.Optimizer]) -> list[Finding]:
        """Take the check for ``optimizers`` (the start of training); returns the ``not_in_optimizer`` findings."""
        self._optimizers = [weakref.ref(opt) for opt in optimizers]
        self._closed = False
        return self._take()

    def start_run(self) -> None:
        """A new run: its first backward pass brings the next check (the lowest count of misses restarts)."""
        self.fewest_missed = _NEVER
        self._closed = False

    def saw_backward(self, missed: int) -> None:
        """A backward pass missed ``missed`` parameters, fewer than any before it in this run: some parameter got
        its first gradient of the run (an unfrozen layer, perhaps one no optimizer holds)."""
        self.fewest_missed = missed
        self.due = True

    def follow(self, optimizer: Optional[torch.optim.Optimizer] = None) -> list[Finding]:
        """Take the check again (``optimizer``: the one about to step, added when it is new); returns the findings."""
        if optimizer is not None and not any(ref() is optimizer for ref in self._optimizers):
            self._optimizers.append(weakref.ref(optimizer))
        return self._take()

    def _take(self) -> list[Finding]:
        # the diagnosis's TorchFunctionMode may be active (the first steps): every attribute read of a tensor would
        # go through it, three times slower, for nothing
        with torch._C.DisableTorchFunction():
            return self._take_now()

    def _take_now(self) -> list[Finding]:
        self.due = False
        self.version = self.registry.layout_version
        arrived, self._arrived = self._arrived, []
        for index in arrived:
            self.reached.add(index)
            handle = self._hooks.pop(index, None)
            if handle is not None:
                handle.remove()
        optimizers = [opt for opt in (ref() for ref in self._optimizers) if opt is not None]
        if not optimizers:
            return []
        params = self.registry.params
        held = {id(p) for opt in optimizers for group in opt.param_groups for p in group["params"]}
        for index in range(len(params)):  # a gradient present now reached it (nothing clears a gradient no
            param = params[index]  # optimizer holds, except model.zero_grad(), which the hooks outlive)
            if id(param) not in held and index not in self.reached and param.grad is not None:
                self.reached.add(index)
        findings = find_not_in_optimizer(self.registry, optimizers, self.reached, held)
        self._watch(findings, held)
        return findings

    def _watch(self, findings: list[Finding], held: set[int]) -> None:
        """A one-shot hook on each parameter of a note: the first gradient that reaches it makes a warning of it."""
        if self._closed or not any(f.severity == NOTE for f in findings):
            return
        params = self.registry.params
        for index, param in enumerate(params):
            if index in self._hooks or index in self.reached or id(param) in held or not param.requires_grad:
                continue
            if self.registry.allowed[index]:
                continue
            self._hooks[index] = param.register_post_accumulate_grad_hook(user_hook(self._arrival(index)))

    def _arrival(self, index: int) -> Callable[[Tensor], None]:
        def arrived(_: Tensor) -> None:  # autograd's hot path: note it, the step check does the rest
            if index in self._hooks:
                self._arrived.append(index)
                self.due = True

        return arrived

    def close(self) -> None:
        """Take every hook off (the run ended); what was learned stays, and :meth:`follow` still reads ``.grad``."""
        self._closed = True
        for index in self._arrived:
            self.reached.add(index)
        self._arrived = []
        for handle in self._hooks.values():
            handle.remove()
        self._hooks = {}


_NEVER = 1 << 62


# ---------------------------------------------------------------------- unregistered
def find_unregistered(module: nn.Module) -> list[Finding]:
    """Trainable tensors held on module attributes where ``module.parameters()`` cannot see them."""
    registered = {id(p) for p in module.parameters()}
    for submodule in module.modules():  # FSDP1: the flat parameters its units keep (use_orig_params=True hides them)
        flat = getattr(getattr(submodule, "_handle", None), "flat_param", None)
        if isinstance(flat, Tensor):
            registered.add(id(flat))
    findings = []
    for module_name, submodule in module.named_modules():
        for attr, value in vars(submodule).items():
            if attr in _MODULE_INTERNALS:
                continue
            path = clean_name(f"{module_name}.{attr}" if module_name else attr)
            finding = _inspect_attribute(path, attr, value, registered)
            if finding is not None:
                findings.append(finding)
    return findings


def _inspect_attribute(path: str, attr: str, value: Any, registered: set[int]) -> Optional[Finding]:
    if isinstance(value, Tensor):
        return _tensor_finding(path, attr, value, registered)
    if isinstance(value, nn.Module):  # set with object.__setattr__, around nn.Module's registration
        hidden = _hidden_params(value, registered)
        if not hidden:
            return None
        return Finding(UNREGISTERED, path, (
            f"`{path}` holds a {type(value).__name__} outside the module tree (it bypassed nn.Module's attribute "
            f"registration), with {_count(len(hidden), 'trainable parameter tensor')}: "
            f"{_NOT_TRAINED.format(them='them')}. Fix: assign it normally (self.{attr} = module), or freeze it "
            "with requires_grad_(False) if it is deliberately kept out of training."
        ))
    if isinstance(value, (list, tuple, dict)):
        return _container_finding(path, attr, value, registered)
    return None


def _is_registered(value: Tensor, registered: set[int]) -> bool:
    """A registered tensor, or a view of one (FSDP1 keeps each original parameter as a view into a flat one)."""
    base = value._base
    return id(value) in registered or (base is not None and id(base) in registered)


def _tensor_finding(path: str, attr: str, value: Tensor, registered: set[int]) -> Optional[Finding]:
    if not value.requires_grad or _is_registered(value, registered):
        return None
    shape = tuple(value.shape)
    try:
        grad_fn = value.grad_fn
    except RuntimeError:  # a view whose base was changed in place (a framework's own views): not the user's tensor
        return None
    if grad_fn is None:
        return Finding(UNREGISTERED, path, (
            f"`{path}` is a plain tensor {shape} with requires_grad=True; only nn.Parameter attributes are "
            f"registered, so {_NOT_TRAINED.format(them='it')}. Fix: self.{attr} = nn.Parameter(...) (or "
            "register_buffer(...) if it should not train)."
        ))
    leaves = leaf_tensors(value, limit=10_000)
    if any(id(leaf) in registered for leaf in leaves):
        return None  # a value computed from registered parameters, not a parameter that went missing
    if any(isinstance(leaf, nn.Parameter) for leaf in leaves):
        op = type(grad_fn).__name__
        if op.lstrip("_").startswith(("ToCopyBackward", "CopyBackwards")):  # .to(), .cuda(), .double(), ...
            return Finding(UNREGISTERED, path, (
                f"`{path}` was an nn.Parameter, but .to()/.cuda()/a dtype cast after wrapping turned it into a plain "
                f"tensor {shape} (grad_fn {op}), so {_NOT_TRAINED.format(them='it')}. Fix: wrap after moving, "
                f"self.{attr} = nn.Parameter(tensor.to(device)), or move the whole model with model.to(device)."
            ))
        return Finding(UNREGISTERED, path, (
            f"`{path}` was an nn.Parameter, but an operation on it after wrapping (grad_fn {op}) returned a plain "
            f"tensor {shape}, so {_NOT_TRAINED.format(them='it')}. Fix: compute the value first and wrap the "
            f"result, self.{attr} = nn.Parameter(value), or apply the operation in forward."
        ))
    return Finding(UNREGISTERED, path, (
        f"`{path}` is a tensor {shape} with requires_grad=True computed from tensors that are not parameters, so "
        f"{_NOT_TRAINED.format(them='it')}. Fix: make the trainable tensor an nn.Parameter (or register_buffer(...) "
        "if it should not train)."
    ))


def _container_finding(path: str, attr: str, value: Any, registered: set[int]) -> Optional[Finding]:
    modules: list[nn.Module] = []
    tensors: list[Tensor] = []
    _collect(value, modules, tensors, depth=0)
    hidden_params = [p for m in modules for p in _hidden_params(m, registered)]
    hidden_tensors = [t for t in tensors if t.requires_grad and not _is_registered(t, registered)]
    if not hidden_params and not hidden_tensors:
        return None
    kind = "dict" if isinstance(value, dict) else type(value).__name__
    held = []
    fixes = []
    if hidden_params:
        n_modules = sum(1 for m in modules if _hidden_params(m, registered))
        held.append(f"{_count(n_modules, 'module')} with {_count(len(hidden_params), 'trainable parameter tensor')}")
        fixes.append("nn.ModuleDict(...)" if kind == "dict" else "nn.ModuleList(...)")
    if hidden_tensors:
        held.append(_count(len(hidden_tensors), "trainable tensor"))
        fixes.append("nn.ParameterDict(...)" if kind == "dict" else "nn.ParameterList(...)")
    them = "them"
    return Finding(UNREGISTERED, path, (
        f"`{path}` is a plain Python {kind} holding {' and '.join(held)}; nn.Module does not look inside plain "
        f"containers, so {_NOT_TRAINED.format(them=them)}. Fix: self.{attr} = {' / '.join(fixes)}, or freeze them "
        "with requires_grad_(False) if they are deliberately kept out of training."
    ))


def _collect(value: Any, modules: list[nn.Module], tensors: list[Tensor], depth: int) -> None:
    if depth > 2:
        return
    items: Iterable[Any] = value.values() if isinstance(value, dict) else value
    for item in items:
        if isinstance(item, nn.Module):
            modules.append(item)
        elif isinstance(item, Tensor):
            tensors.append(item)
        elif isinstance(item, (list, tuple, dict)):
            _collect(item, modules, tensors, depth + 1)


def _hidden_params(module: nn.Module, registered: set[int]) -> list[Tensor]:
    return [p for p in module.parameters() if p.requires_grad and id(p) not in registered]


# ---------------------------------------------------------------------- not in any optimizer
def find_not_in_optimizer(
    registry: ParamRegistry,
    optimizers: Sequence[torch.optim.Optimizer],
    reached: Collection[int] = (),
    held: Optional[set[int]] = None,
) -> list[Finding]:
    """Trainable registered parameters that no optimizer's param groups contain, grouped by module.

    Args:
        registry: the engine's registry (names, tensors, ``allow_none``).
        optimizers: every optimizer of the run.
        reached: registry indices that a gradient reached: their findings are warnings (gradients nothing applies);
            the others are notes (nothing trains them, nothing differentiates them).
        held: ``id()`` of every tensor in the optimizers' param groups, when the caller has it already.

    When not one registered parameter is in any optimizer, the optimizers hold copies (a strategy that flattens
    or shards parameters) and nothing can be concluded: no finding.
    """
    in_optimizer = held if held is not None else {
        id(p) for opt in optimizers for group in opt.param_groups for p in group["params"]
    }
    trainable = [
        (index, name)
        for index, (name, p, allowed) in enumerate(zip(registry.names, registry.params, registry.allowed))
        if p.requires_grad and not allowed and not name.startswith("<")
    ]
    params = registry.params
    if not any(id(params[i]) in in_optimizer for i, _ in trainable):
        return []
    outside = [(i, name) for i, name in trainable if id(params[i]) not in in_optimizer]
    if not outside:
        return []
    findings = []
    carried = [(i, name) for i, name in outside if params[i].grad_fn is not None]
    if carried:  # updated with autograd on (an EMA update outside torch.no_grad()): no longer leaf tensors
        findings.append(_history_finding([name for _, name in carried], params[carried[0][0]]))
        outside = [(i, name) for i, name in outside if params[i].grad_fn is None]
    status = {name: i in reached for i, name in outside}  # name -> a gradient reached it
    under: dict[str, list[str]] = {}  # module prefix -> trainable parameter names below it
    for _, name in trainable:
        parts = name.split(".")
        for k in range(1, len(parts)):
            under.setdefault(".".join(parts[:k]), []).append(name)
    grouped: set[str] = set()
    for _, name in outside:
        if name in grouped:
            continue
        got = status[name]
        parts = name.split(".")
        group = None
        for k in range(1, len(parts)):  # the highest module all of whose trainable parameters are alike here
            prefix = ".".join(parts[:k])
            if all(status.get(n) is got for n in under[prefix]):
                group = prefix
                break
        if group is not None and len(under[group]) > 1:
            members = under[group]
            grouped.update(members)
            findings.append(_module_finding(group, members, got))
        else:
            grouped.add(name)
            findings.append(_param_finding(name, got))
    return findings


def _module_finding(group: str, members: list[str], reached: bool) -> Finding:
    shown = ", ".join(f"`{m}`" for m in members[:3]) + (", ..." if len(members) > 3 else "")
    lead = (
        f"none of the {len(members)} trainable parameter tensors of module `{group}` ({shown}) is in any "
        "optimizer's param groups"
    )
    if reached:
        return Finding(NOT_IN_OPTIMIZER, group, (
            f"{lead}: they receive gradients, but nothing applies them. Fix: pass them to the optimizer (e.g. "
            "model.parameters(); in a LightningModule, self.parameters() in configure_optimizers), or freeze them "
            "with requires_grad_(False)."
        ))
    return Finding(NOT_IN_OPTIMIZER, group, (
        f"{lead}, and no gradient has reached them: they require grad, but nothing trains them. For a target "
        f"network or an EMA copy (updated by hand, used under torch.no_grad()) that is right: "
        f"`{group}.requires_grad_(False)` silences this note. If they should train, pass them to the optimizer and "
        "make them take part in the loss."
    ), severity=NOTE)


def _history_finding(names: list[str], first: torch.Tensor) -> Finding:
    shown = ", ".join(f"`{n}`" for n in names[:3]) + (", ..." if len(names) > 3 else "")
    group = os.path.commonprefix([n + "." for n in names]).rpartition(".")[0] or names[0]
    return Finding(NOT_IN_OPTIMIZER, group, (
        f"{_count(len(names), 'parameter tensor')} in no optimizer's param groups ({shown}) carry autograd history "
        f"(grad_fn {type(first.grad_fn).__name__}): they were updated with autograd on, as an EMA or target-network "
        "update outside torch.no_grad() is, so each update keeps the graph of the step that made it alive, and the "
        "graphs chain from step to step. Fix: run the update under torch.no_grad() (or on .detach()ed values)."
    ))


def _param_finding(name: str, reached: bool) -> Finding:
    if reached:
        return Finding(NOT_IN_OPTIMIZER, name, (
            f"`{name}` requires grad but is in no optimizer's param groups: it receives gradients, but nothing "
            "applies them. Fix: pass it to the optimizer (e.g. model.parameters(); in a LightningModule, "
            "self.parameters() in configure_optimizers), or freeze it with requires_grad_(False)."
        ))
    return Finding(NOT_IN_OPTIMIZER, name, (
        f"`{name}` requires grad but is in no optimizer's param groups, and no gradient has reached it: nothing "
        "trains it. For a target network or an EMA copy (updated by hand, used under torch.no_grad()) that is "
        "right: requires_grad_(False) silences this note. If it should train, pass it to the optimizer and make it "
        "take part in the loss."
    ), severity=NOTE)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' if n != 1 else ''}"
