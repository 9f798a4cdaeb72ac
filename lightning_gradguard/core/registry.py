"""Stable indices and names for the parameters the guard watches.

Every counter in the guard is a vector indexed by a parameter's registry index, so that per-step bookkeeping
is a handful of tensor operations rather than a Python loop over dictionaries.
"""

from __future__ import annotations

import fnmatch
import weakref
from collections.abc import Iterable, Sequence
from typing import Any, Optional

import torch
from torch import Tensor

# Prefixes that wrappers add to parameter names and that users never wrote themselves.
_WRAPPER_PREFIXES = ("_orig_mod.", "_forward_module.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def clean_name(name: str) -> str:
    """The user's own name for a parameter: without ``torch.compile``/FSDP/checkpoint wrapper components."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


class ParamRegistry:
    """Gives each distinct parameter (by identity; tied weights are one) an index and a name."""

    def __init__(self, allow_none: Sequence[str] = ()) -> None:
        self._allow_none = tuple(allow_none)
        self.module: Optional[torch.nn.Module] = None  # the bound model: names for parameters added to it later
        self.names: list[str] = []
        self.params: list[Tensor] = []
        self.allowed: list[bool] = []
        self._index: dict[int, int] = {}
        self._by_name: dict[str, int] = {}
        self._aliases: dict[int, list[str]] = {}  # id(parameter) -> its other names in the model (tied weights)
        # per optimizer, held weakly (optimizers re-created run after run drop out; a loop may keep one optimizer per
        # parameter, so no count limit): (layout, indices, tensors) and its param-group layout when last seen
        self._checked_cache: Any = weakref.WeakKeyDictionary()
        self._all: tuple[Any, int, bool] = (None, 0, False)
        self._layouts: Any = weakref.WeakKeyDictionary()
        # bumped whenever an optimizer shows a param-group layout not seen before (a new optimizer, a group added,
        # a group's list grown or replaced): the optimizer audit compares it instead of walking the groups
        self.layout_version = 0

    def __len__(self) -> int:
        return len(self.params)

    def bind(self, named_parameters: Iterable[tuple[str, Tensor]]) -> None:
        """Register parameters under their names; a parameter seen before keeps its first name (tied weights).

        A name already bound to another tensor that this call does not also bind (a new model instance, a re-created
        module) moves to the new tensor: its counts continue under the name.
        """
        named = [(clean_name(name), param) for name, param in named_parameters]
        ids = {id(param) for _, param in named}
        if self.module is not None and self._allow_none:  # allow_none may name a tied weight by its other name
            self._aliases = {}
            for name, param in self.module.named_parameters(remove_duplicate=False):
                self._aliases.setdefault(id(param), []).append(clean_name(name))
        for name, param in named:
            index = self._by_name.get(name)
            if index is not None and id(param) not in self._index and id(self.params[index]) not in ids:
                del self._index[id(self.params[index])]
                self.params[index] = param
                self._index[id(param)] = index
                self._checked_cache.clear()
                continue
            self.add(param, name)

    def _module_names(self) -> dict[int, str]:
        """``id(parameter) -> name`` in the bound model as it is now."""
        if self.module is None:
            return {}
        return {id(param): clean_name(name) for name, param in self.module.named_parameters()}

    def add(self, param: Tensor, name: str) -> int:
        key = id(param)
        if key in self._index:
            return self._index[key]
        if name in self._by_name:  # two distinct tensors under one name (a re-created module): keep both
            name = f"{name}#{len(self.params)}"
        index = len(self.params)
        self._index[key] = index
        self._by_name[name] = index
        self.names.append(name)
        self.params.append(param)
        names = [name, *self._aliases.get(key, ())]
        self.allowed.append(any(fnmatch.fnmatchcase(n, pattern) for pattern in self._allow_none for n in names))
        self._checked_cache.clear()
        return index

    def unmatched_patterns(self) -> list[str]:
        """The ``allow_none`` patterns that match no registered name, nor another name of a tied weight (a typo
        silences nothing)."""
        names = [*self.names, *(alias for aliases in self._aliases.values() for alias in aliases)]
        return [p for p in self._allow_none if not any(fnmatch.fnmatchcase(name, p) for name in names)]

    def is_all(self, indices: list[int]) -> bool:
        """Whether ``indices`` is every registered parameter in registry order (one optimizer over the model)."""
        known = self._all
        if known[0] is not indices or known[1] != len(self.params):  # the same list comes back every step
            known = self._all = (indices, len(self.params), indices == list(range(len(self.params))))
        return known[2]

    def find(self, param: Tensor) -> Optional[int]:
        """The registry index of ``param``, or None when it is not registered."""
        return self._index.get(id(param))

    def index_of(self, name: str) -> int:
        return self._by_name[name]

    def optimizer_params(self, optimizer: torch.optim.Optimizer) -> tuple[list[int], list[Tensor]]:
        """Indices and tensors of the optimizer's parameters, minus ``allow_none``; cached per param-group layout.

        Parameters the optimizer holds but no module registered get a synthetic name, so they are still checked.
        """
        groups = optimizer.param_groups
        key = tuple((id(g["params"]), len(g["params"])) for g in groups)
        cached = self._checked_cache.get(optimizer)
        if cached is not None and cached[0] == key:
            return cached[1], cached[2]
        if self._layouts.get(optimizer) != key:
            self._layouts[optimizer] = key
            self.layout_version += 1
        indices: list[int] = []
        tensors: list[Tensor] = []
        seen: set[int] = set()
        module_names: Optional[dict[int, str]] = None
        for group_index, group in enumerate(groups):
            for position, param in enumerate(group["params"]):
                if id(param) in seen:
                    continue
                seen.add(id(param))
                index = self._index.get(id(param))
                if index is None:  # joined after bind: a layer added to the model since, or a tensor it does not have
                    if module_names is None:
                        module_names = self._module_names()
                    name = module_names.get(id(param))
                    if name is None:
                        name = f"<{type(optimizer).__name__}.param_groups[{group_index}][{position}]>"
                    index = self.add(param, name)
                if not self.allowed[index]:
                    indices.append(index)
                    tensors.append(param)
        self._checked_cache[optimizer] = (key, indices, tensors)
        return indices, tensors
