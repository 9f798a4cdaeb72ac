"""The bound model as the diagnosis sees it: which registry index a parameter has, and which modules own it.

Built from the engine's registry and root module when a window installs its instruments, and rebuilt only when
the registry grew or the root changed. Modules inside ``torch.compile``'d code are marked *opaque*: a hook there
sees nothing and costs a recompile, and the TorchFunctionMode is not installed at all while any part of the model
is compiled (an active mode would make Dynamo recompile once it is gone).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from lightning_gradguard.core.registry import clean_name

if TYPE_CHECKING:
    from lightning_gradguard.core.engine import GradGuardEngine


class Owner:
    """A module that owns a parameter, as a cause names it."""

    __slots__ = ("name", "module_id", "type_name", "opaque")

    def __init__(self, name: str, module: torch.nn.Module, opaque: bool) -> None:
        self.name = name
        self.module_id = id(module)
        self.type_name = type(module).__name__
        self.opaque = opaque

    def __str__(self) -> str:
        return f"module `{self.name}` ({self.type_name})" if self.name else f"the model ({self.type_name})"


def _is_compiled(module: torch.nn.Module) -> bool:
    """torch.compile'd, or TorchScript (which takes no hooks at all)."""
    if isinstance(module, torch.jit.ScriptModule):
        return True
    return type(module).__name__ == "OptimizedModule" or getattr(module, "_compiled_call_impl", None) is not None


_CONTAINERS = (torch.nn.ParameterList, torch.nn.ParameterDict)


def _caller(name: str, module: torch.nn.Module, modules: dict[str, torch.nn.Module]) -> tuple[str, torch.nn.Module]:
    """The module whose forward call uses ``module``'s parameters: itself, or for a ``ParameterList`` or
    ``ParameterDict`` (never called, only indexed) the module that holds it."""
    while isinstance(module, _CONTAINERS) and name:
        parent_name = name.rpartition(".")[0]
        parent = modules.get(parent_name)
        if parent is None:  # held under another name too (a shared container): keep the container itself
            break
        name, module = parent_name, parent
    return name, module


class ModelMap:
    """Parameter and module lookups for the engine's bound model.

    Attributes:
        root: the model (``engine.module``) the lookups were built for.
        param_index: ``id(parameter) -> registry index``.
        owners: ``registry index -> the modules that own that parameter``.
        owner_modules: the modules that get a forward hook (they own a registered parameter and are not opaque).
        trace_cuts: whether the TorchFunctionMode may be installed (no part of the model is compiled).

    Example::

        model_map = ModelMap(engine)
        model_map.refresh()
        owners = model_map.owners.get(model_map.param_index[id(model.fc.weight)], [])

    """

    def __init__(self, engine: GradGuardEngine) -> None:
        self.engine = engine
        self.root: Optional[torch.nn.Module] = None
        self.param_index: dict[int, int] = {}
        self.owners: dict[int, list[Owner]] = {}
        self.owner_modules: list[torch.nn.Module] = []
        self.trace_cuts = True
        self.grad_forward = False  # inside a forward call of the root that began with autograd on
        self._size = -1

    def refresh(self) -> None:
        """Rebuild the lookups if the registry grew or the engine's module changed since the last call."""
        registry = self.engine.registry
        root = self.engine.module
        if self._size == len(registry) and self.root is root:
            return
        self._size = len(registry)
        self.root = root
        self.param_index = {id(p): i for i, p in enumerate(registry.params)}
        self.owners = {}
        self.owner_modules = []
        if root is None:
            return
        opaque: set[int] = set()
        if getattr(root, "_compiler_ctx", None):  # a LightningModule passed to fit() as torch.compile(model)
            opaque.update(id(m) for m in root.modules())
        for module in root.modules():
            if _is_compiled(module):
                opaque.update(id(m) for m in module.modules())
        self.trace_cuts = not opaque
        modules = dict(root.named_modules())
        hooked: set[int] = set()
        for name, module in modules.items():
            owner_name, owner = _caller(name, module, modules)
            owns = False
            for _, param in module.named_parameters(recurse=False):
                index = self.param_index.get(id(param))
                if index is None:
                    continue
                owns = True
                self.owners.setdefault(index, []).append(Owner(clean_name(owner_name), owner, id(owner) in opaque))
            # a hook inside compiled code sees nothing, and costs a recompile
            if owns and id(owner) not in opaque and id(owner) not in hooked:
                hooked.add(id(owner))
                self.owner_modules.append(owner)

    def evaluating(self) -> bool:
        """Whether this is an evaluation pass between steps (not recorded): the model in eval mode with autograd
        off. A model trained in eval mode (frozen batch norm, a forgotten ``model.train()``) runs with autograd on,
        and what its forward pass does is recorded like any other, a ``torch.no_grad()`` block inside a forward call
        of the model that began with autograd on included."""
        root = self.root
        return root is not None and not root.training and not torch.is_grad_enabled() and not self.grad_forward
