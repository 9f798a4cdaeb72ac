"""Per-parameter gradient norms in fused per-(device, dtype) kernels, kept on the device.

As in ``torch.nn.utils.clip_grad``: one ``torch._foreach_norm`` launch per (device, dtype) group and no host
synchronization; the results stay on their device until a logging step copies them to the host in one go.
Sparse gradients (``nn.Embedding(sparse=True)``) are split out, because foreach kernels reject them, and
coalesced first, because an uncoalesced tensor's ``_values().norm()`` counts duplicate indices wrongly.
DTensor gradients (FSDP2) contribute their local shard; :mod:`lightning_gradguard.distributed` turns those into
global norms.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

try:  # DTensor moved between releases; the guard works without it
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch builds without distributed
    DTensor = None  # type: ignore[assignment,misc]


@dataclass
class NormGroup:
    """Norms of one (device, dtype) group: ``norms[j]`` belongs to the parameter at position ``positions[j]``."""

    positions: list[int]
    norms: Tensor  # float32, on the gradients' device
    local: bool = False  # True for shard-local norms (DTensor) that still need a global reduction


def local_tensor(grad: Tensor) -> Tensor:
    """The part of a gradient that lives on this process (the local shard of a DTensor)."""
    if DTensor is not None and isinstance(grad, DTensor):
        return grad.to_local()
    return grad


def per_param_norms(grads: Sequence[Tensor], norm_type: float) -> list[NormGroup]:
    """The ``norm_type``-norm of each gradient, grouped by (device, dtype); no host synchronization.

    Args:
        grads: gradients, none of them ``None``.
        norm_type: a positive float, or ``math.inf``.

    """
    dense: dict[tuple[torch.device, torch.dtype, bool], list[int]] = defaultdict(list)
    sparse: list[int] = []
    for position, grad in enumerate(grads):
        is_dtensor = DTensor is not None and isinstance(grad, DTensor)
        if grad.layout != torch.strided:
            sparse.append(position)
        else:
            dense[(grad.device, grad.dtype, is_dtensor)].append(position)

    groups: list[NormGroup] = []
    for (_, _, is_dtensor), positions in dense.items():
        tensors = [local_tensor(grads[i]) for i in positions]
        groups.append(NormGroup(positions, _dense_norms(tensors, norm_type), local=is_dtensor))
    for position in sparse:
        grad = local_tensor(grads[position])
        values = grad.coalesce().values() if grad.is_sparse else grad.values()
        norm = torch.linalg.vector_norm(values.to(torch.float32), norm_type).reshape(1)
        groups.append(NormGroup([position], norm))
    return groups


def _dense_norms(tensors: list[Tensor], norm_type: float) -> Tensor:
    # each result keeps its input's dtype; norms of half-precision grads are accumulated in float32 by the kernel
    device = tensors[0].device
    if _has_foreach_support(tensors, device):
        norms = torch._foreach_norm(tensors, norm_type)
    else:
        norms = [torch.linalg.vector_norm(t, norm_type) for t in tensors]
    return torch.stack(norms).to(torch.float32)


def _has_foreach_support(tensors: list[Tensor], device: torch.device) -> bool:
    try:
        from torch.utils._foreach_utils import _has_foreach_support

        return bool(_has_foreach_support(tensors, device))
    except Exception:  # pragma: no cover - private helper missing in some release
        return device.type in ("cpu", "cuda")


def total_norm(norms: Tensor, norm_type: float) -> Tensor:
    """The norm of all gradients together, from the per-parameter norms (no second read of the gradients)."""
    if norms.numel() == 0:
        return norms.new_zeros(())
    if math.isinf(norm_type):
        return norms.max()
    return torch.linalg.vector_norm(norms, norm_type)
