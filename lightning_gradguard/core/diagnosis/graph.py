"""Which parameters an autograd graph reaches: a walk over ``grad_fn.next_functions`` to ``AccumulateGrad`` nodes.

The walk still works after ``backward()`` has freed the graph's saved tensors: only the node structure and
``AccumulateGrad.variable`` are read. A shared ``seen`` set lets several walks (one per root) cost, together, one
visit per node.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Optional

import torch
from torch import Tensor


def _accumulate_grad_type() -> type:
    leaf = torch.zeros(1, requires_grad=True)
    return type(leaf.expand(1).grad_fn.next_functions[0][0])  # type: ignore[union-attr]


ACCUMULATE_GRAD = _accumulate_grad_type()


def reachable(roots: Iterable[Any], seen: set[Any], param_index: dict[int, int]) -> list[int]:
    """Registry indices of the parameters reachable from ``roots`` (``grad_fn`` nodes) through unseen nodes.

    Args:
        roots: graph nodes to start from (``None`` entries are skipped).
        seen: nodes already visited by earlier walks; updated in place.
        param_index: ``id(parameter) -> registry index`` for the parameters of interest.

    Example::

        seen = set()
        reachable([loss.grad_fn], seen, {id(p): i for i, p in enumerate(model.parameters())})

    """
    found: list[int] = []
    stack = []
    for root in roots:
        if root is not None and root not in seen:
            seen.add(root)
            stack.append(root)
    accumulate_grad = ACCUMULATE_GRAD
    while stack:
        node = stack.pop()
        if type(node) is accumulate_grad:
            index = param_index.get(id(node.variable))
            if index is not None:
                found.append(index)
            continue
        if type(node).__name__ == _REENTRANT_CHECKPOINT:  # the segment's parameters are not in the graph
            found.extend(i for i in map(param_index.get, map(id, segment_parameters(node))) if i is not None)
        for parent, _ in node.next_functions:
            if parent is not None and parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return found


_REENTRANT_CHECKPOINT = "CheckpointFunctionBackward"


def segment_parameters(node: Any) -> list[Tensor]:
    """The parameters of the module a reentrant ``torch.utils.checkpoint`` segment runs (its backward node keeps
    the segment's function: a module, a bound method of one, or a ``functools.partial`` of either or of a method with
    the module as its first argument); [] when the function is not a module's."""
    function = getattr(node, "run_function", None)
    for _ in range(3):
        bound = getattr(function, "args", ())  # functools.partial(Layer.forward, layer, ...): Hugging Face's layers
        for owner in (function, getattr(function, "__self__", None), bound[0] if bound else None):
            if isinstance(owner, torch.nn.Module):
                return list(owner.parameters())
        function = getattr(function, "func", None)  # functools.partial
    return []


def consumers(root: Any, wanted: set[int], limit: int = 1 << 20) -> dict[int, Any]:
    """``id(parameter) -> the node that consumes it`` for the parameters in ``wanted`` that a backward pass from
    ``root`` (a ``grad_fn`` node) reaches: the node whose ``next_functions`` hold the parameter's ``AccumulateGrad``.

    ``limit``: the most graph nodes visited (a huge graph is cut short rather than walked whole).
    """
    found: dict[int, Any] = {}
    if root is None or not wanted:
        return found
    seen = {root}
    stack = [root]
    accumulate_grad = ACCUMULATE_GRAD
    while stack and len(seen) < limit:
        node = stack.pop()
        for parent, _ in node.next_functions:
            if parent is None or parent in seen:
                continue
            if type(parent) is accumulate_grad:
                key = id(parent.variable)
                if key in wanted:
                    found.setdefault(key, node)
                    if len(found) == len(wanted):
                        return found
                continue  # several consumers of one parameter: each still sees it
            seen.add(parent)
            stack.append(parent)
    return found


def leaf_tensors(tensor: Tensor, limit: Optional[int] = None) -> list[Tensor]:
    """The leaf tensors (parameters, inputs that require grad) a backward pass from ``tensor`` accumulates into.

    ``limit``: the most graph nodes visited (a huge graph is cut short rather than walked whole).
    """
    if tensor.grad_fn is None:
        return [tensor] if tensor.requires_grad else []
    leaves: list[Tensor] = []
    seen: set[Any] = set()
    stack = [tensor.grad_fn]
    while stack and (limit is None or len(seen) < limit):
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node) is ACCUMULATE_GRAD:
            leaves.append(node.variable)
        else:
            stack.extend(parent for parent, _ in node.next_functions)
    return leaves
