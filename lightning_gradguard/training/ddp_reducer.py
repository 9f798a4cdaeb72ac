"""The parameters behind DDP's "Expected to have finished reduction" error, which names them by index only.

With ``find_unused_parameters=False``, a parameter that gets no gradient keeps DDP's reducer from finishing, and the
next forward pass fails with that error. It lists the parameters by their index in the reducer's own order, and
Lightning replaces the message with one that drops the list; the training context
(:mod:`lightning_gradguard.training.context`) turns the indices back into names and adds them to the error.

Example::

    rank, params = unreduced_parameters(str(error), trainer.strategy.model)

"""

from __future__ import annotations

import re
from typing import Optional

import torch
from torch import Tensor

DDP_UNFINISHED_REDUCTION = "Expected to have finished reduction in the prior iteration"
_UNREDUCED = re.compile(r"Parameter indices which did not receive grad for rank (\d+):\s*([\d ]+)")


def ddp_reducer_parameters(ddp_module: torch.nn.Module, trainable: Optional[dict[int, bool]] = None) -> list[Tensor]:
    """The parameters in the order DDP's reducer numbers them (``DistributedDataParallel._build_params_for_reducer``).

    DDP's error names unreduced parameters by these indices only. DDP numbered the parameters that required grad
    when it was built: ``trainable`` (``id(parameter) -> requires_grad``, taken before the model was wrapped) gives
    that state for the parameters it knows, since a layer frozen since (``BaseFinetuning``, ``toggle_optimizer``)
    would shift every index after it.
    """
    trainable = trainable or {}
    module = getattr(ddp_module, "module", ddp_module)
    ignore = set(getattr(ddp_module, "parameters_to_ignore", ()) or ())
    seen: set[int] = set()
    params: list[Tensor] = []
    for module_name, sub in module.named_modules():
        for param_name, param in sub.named_parameters(recurse=False):
            if not trainable.get(id(param), param.requires_grad) or f"{module_name}.{param_name}" in ignore:
                continue
            if id(param) in seen:
                continue
            seen.add(id(param))
            params.append(param)
    return params


def unreduced_parameters(
    message: str, ddp_module: torch.nn.Module, trainable: Optional[dict[int, bool]] = None
) -> tuple[Optional[int], list[Tensor]]:
    """The rank and the parameters that DDP's "Expected to have finished reduction" error lists by index."""
    match = _UNREDUCED.search(message)
    if match is None:
        return None, []
    params = ddp_reducer_parameters(ddp_module, trainable)
    indices = [int(i) for i in match.group(2).split()]
    return int(match.group(1)), [params[i] for i in indices if 0 <= i < len(params)]
