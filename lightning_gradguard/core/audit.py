"""Static findings, checked once when training starts: trainable tensors nothing will ever train.

Two set-up mistakes leave weights untrained without any ``None`` gradient to notice, because the weights are not
where GradGuard (or the optimizer) looks:

* ``unregistered``: a module attribute holds a trainable tensor that ``model.parameters()`` does not list. A
  tensor with ``requires_grad=True`` assigned as a plain attribute, modules or parameters kept in a plain Python
  ``list``/``tuple``/``dict``, or an ``nn.Parameter`` turned into a plain tensor by ``.to()``/``.cuda()``/a dtype
  cast after wrapping. No optimizer built from ``model.parameters()`` updates them.
* ``not_in_optimizer``: a registered parameter with ``requires_grad=True`` that no optimizer's param groups
  contain. It may receive gradients, but nothing applies them.

Frozen tensors (``requires_grad=False``) and buffers are never findings.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Optional

import torch
from torch import Tensor, nn

from lightning_gradguard.core.diagnosis.graph import leaf_tensors
from lightning_gradguard.core.registry import ParamRegistry, clean_name
from lightning_gradguard.report import Finding

UNREGISTERED = "unregistered"
NOT_IN_OPTIMIZER = "not_in_optimizer"
AUDIT_KINDS = (UNREGISTERED, NOT_IN_OPTIMIZER)

_MODULE_INTERNALS = frozenset(vars(nn.Module()))
_NOT_TRAINED = (
    "model.parameters() does not list {them}, so no optimizer built from it updates {them} and GradGuard cannot "
    "check {them}"
)


def audit_model(
    module: Optional[nn.Module], optimizers: Sequence[torch.optim.Optimizer], registry: ParamRegistry
) -> list[Finding]:
    """Every static finding for ``module`` and ``optimizers`` (see the module docstring).

    Args:
        module: the root model (``None``: only the optimizer check runs, over ``registry``).
        optimizers: the optimizers that will train it; an empty sequence skips the optimizer check.
        registry: the engine's registry, bound to ``module``'s parameters (names and ``allow_none``).

    Example::

        for finding in audit_model(model, [optimizer], engine.registry):
            print(finding.kind, finding.name, finding.detail)

    """
    findings: list[Finding] = []
    if module is not None:
        findings.extend(find_unregistered(module))
    if optimizers:
        findings.extend(find_not_in_optimizer(registry, optimizers))
    return findings


# ---------------------------------------------------------------------- unregistered
def find_unregistered(module: nn.Module) -> list[Finding]:
    """Trainable tensors held on module attributes where ``module.parameters()`` cannot see them."""
    registered = {id(p) for p in module.parameters()}
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


def _tensor_finding(path: str, attr: str, value: Tensor, registered: set[int]) -> Optional[Finding]:
    if not value.requires_grad or id(value) in registered:
        return None
    shape = tuple(value.shape)
    if value.grad_fn is None:
        return Finding(UNREGISTERED, path, (
            f"`{path}` is a plain tensor {shape} with requires_grad=True; only nn.Parameter attributes are "
            f"registered, so {_NOT_TRAINED.format(them='it')}. Fix: self.{attr} = nn.Parameter(...) (or "
            "register_buffer(...) if it should not train)."
        ))
    leaves = leaf_tensors(value, limit=10_000)
    if any(id(leaf) in registered for leaf in leaves):
        return None  # a value computed from registered parameters, not a parameter that went missing
    if any(isinstance(leaf, nn.Parameter) for leaf in leaves):
        return Finding(UNREGISTERED, path, (
            f"`{path}` was an nn.Parameter, but .to()/.cuda()/a dtype cast after wrapping turned it into a plain "
            f"tensor {shape} (grad_fn {type(value.grad_fn).__name__}), so {_NOT_TRAINED.format(them='it')}. Fix: "
            f"wrap after moving, self.{attr} = nn.Parameter(tensor.to(device)), or move the whole model with "
            "model.to(device)."
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
    hidden_tensors = [t for t in tensors if t.requires_grad and id(t) not in registered]
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
def find_not_in_optimizer(registry: ParamRegistry, optimizers: Sequence[torch.optim.Optimizer]) -> list[Finding]:
    """Trainable registered parameters that no optimizer's param groups contain, grouped by module.

    When not one registered parameter is in any optimizer, the optimizers hold copies (a strategy that flattens
    or shards parameters) and nothing can be concluded: no finding.
    """
    in_optimizer = {id(p) for opt in optimizers for group in opt.param_groups for p in group["params"]}
    trainable = [
        (name, p)
        for name, p, allowed in zip(registry.names, registry.params, registry.allowed)
        if p.requires_grad and not allowed and not name.startswith("<")
    ]
    if not any(id(p) in in_optimizer for _, p in trainable):
        return []
    missing = {name for name, p in trainable if id(p) not in in_optimizer}
    if not missing:
        return []
    under: dict[str, list[str]] = {}  # module prefix -> trainable parameter names below it
    for name, _ in trainable:
        parts = name.split(".")
        for k in range(1, len(parts)):
            under.setdefault(".".join(parts[:k]), []).append(name)
    findings = []
    grouped: set[str] = set()
    for name, _ in trainable:
        if name not in missing or name in grouped:
            continue
        parts = name.split(".")
        group = None
        for k in range(1, len(parts)):  # the highest module all of whose trainable parameters are missing
            prefix = ".".join(parts[:k])
            if all(n in missing for n in under[prefix]):
                group = prefix
                break
        if group is not None and len(under[group]) > 1:
            members = under[group]
            grouped.update(members)
            shown = ", ".join(f"`{m}`" for m in members[:3]) + (", ..." if len(members) > 3 else "")
            findings.append(Finding(NOT_IN_OPTIMIZER, group, (
                f"none of the {len(members)} trainable parameter tensors of module `{group}` ({shown}) is in any "
                "optimizer's param groups: they require grad, so they get gradients, but nothing applies them. "
                "Fix: pass them to the optimizer (e.g. self.parameters() in configure_optimizers), or freeze them "
                "with requires_grad_(False)."
            )))
        else:
            grouped.add(name)
            findings.append(Finding(NOT_IN_OPTIMIZER, name, (
                f"`{name}` requires grad but is in no optimizer's param groups: it gets gradients, but nothing "
                "applies them. Fix: pass it to the optimizer (e.g. self.parameters() in configure_optimizers), or "
                "freeze it with requires_grad_(False)."
            )))
    return findings


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' if n != 1 else ''}"
