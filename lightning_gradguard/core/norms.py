"""Per-parameter gradient norms in fused per-(device, dtype) kernels, kept on the device.

As in ``torch.nn.utils.clip_grad``: one ``torch._foreach_norm`` launch per (device, dtype) group and no host
synchronization; the results stay on their device until a logging step copies them to the host in one go.

Grouping the gradients is done once per parameter layout (:class:`NormPlan`): a gradient has its parameter's
device, dtype, layout and shape, so the plan built for one step serves every later step with the same parameters,
and a step only gathers the tensors and launches the kernels.

Special cases take their own, correct paths:

* sparse gradients (``nn.Embedding(sparse=True)``) are split out, because foreach kernels reject them, and
  coalesced first, because an uncoalesced tensor's ``_values().norm()`` counts duplicate indices wrongly;
* DTensor gradients (FSDP2, tensor parallel) contribute the norm of their local shard, in groups flagged
  ``local=True``: :mod:`lightning_gradguard.training.distributed` turns those into global norms;
* on the CPU, where a foreach kernel is a loop of one dispatch (about 1 us) per tensor, tensors of at most
  ``SMALL_NUMEL`` elements that share a shape are stacked (one copy) and reduced one row per tensor: several
  times faster than ``_foreach_norm`` for models made of many small tensors;
* on accelerators, tensors of at least ``LARGE_NUMEL`` elements (an LLM's embedding and output head) get one
  plain reduction kernel each, which reads memory faster than the fused kernel's fixed 64K-element chunks; the
  rest share the fused kernel. No gradient is ever copied on an accelerator.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor


def _dtensor_type() -> Optional[type]:
    """DTensor's class, when the program uses DTensors: a DTensor exists only once its module was imported, and
    importing it here would cost a second of start-up for everyone else."""
    for name in ("torch.distributed.tensor", "torch.distributed._tensor"):
        module = sys.modules.get(name)
        dtensor = getattr(module, "DTensor", None) if module is not None else None
        if dtensor is not None:
            return dtensor
    return None


SMALL_NUMEL = 4096  # CPU tensors up to this size are reduced from stacked copies instead of one dispatch each
STACK_MIN_TENSORS = 8  # ... when at least this many share a shape and dtype (4 biases of an LSTM: slower stacked)
LARGE_NUMEL = 1 << 22  # accelerator tensors from this size (16 MB in float32) get a reduction kernel of their own
_HALF = (torch.float16, torch.bfloat16)

# a kernel computes the float32 norms of its tensors, into ``out`` when given (a slice of a measurement buffer)
Kernel = Callable[..., Tensor]


@dataclass
class NormGroup:
    """Norms of one (device, dtype) group: ``norms[j]`` belongs to the parameter at position ``positions[j]``."""

    positions: list[int]
    norms: Tensor  # float32, on the gradients' device
    local: bool = False  # True for shard-local norms (DTensor) that still need a global reduction


def local_tensor(grad: Tensor) -> Tensor:
    """The part of a gradient that lives on this process (the local shard of a DTensor)."""
    if type(grad) is Tensor:
        return grad
    dtensor = _dtensor_type()
    return grad.to_local() if dtensor is not None and isinstance(grad, dtensor) else grad


class _Part:
    """Positions whose norms one kernel computes, in the order of its result."""

    __slots__ = ("positions", "kernel", "local", "all", "device", "take")

    def __init__(self, positions: list[int], kernel: Kernel, local: bool, all_positions: bool = False) -> None:
        self.positions = positions
        self.kernel = kernel
        self.local = local
        self.all = all_positions  # the part covers every position in order: the gradient list is used as it is
        self.device: torch.device = torch.device("cpu")
        self.take = _slice_of(positions)  # evenly spaced positions (weights, biases): a slice, not a list comprehension

    def tensors(self, grads: Sequence[Tensor]) -> Sequence[Tensor]:
        """This part's gradients, out of the whole list."""
        if self.all:
            return grads
        if self.take is not None:
            return grads[self.take]
        return [grads[i] for i in self.positions]


class NormPlan:
    """How the norms of one list of gradients are computed, built once for a parameter layout.

    Example::

        plan = NormPlan.build(grads, 2.0)
        for group in plan.compute(grads):   # every later step with gradients of the same parameters
            ...

    """

    def __init__(self, parts: list[_Part], size: int) -> None:
        self.parts = parts
        self.size = size

    @classmethod
    def build(cls, grads: Sequence[Tensor], norm_type: float) -> NormPlan:
        """Group ``grads`` (none of them ``None``) by device, dtype, layout and shape."""
        dense: list[int] = []
        parts: list[_Part] = []
        local_dense: list[int] = []
        dtensor = _dtensor_type()
        for position, grad in enumerate(grads):
            # `type(...) is Tensor` is one pointer compare; only the rare others pay for isinstance/layout checks
            if type(grad) is Tensor and grad.layout == torch.strided:
                dense.append(position)
                continue
            is_dtensor = dtensor is not None and isinstance(grad, dtensor)
            tensor = grad.to_local() if is_dtensor else grad
            if tensor.layout != torch.strided:
                parts.append(_Part([position], _sparse_kernel(norm_type, is_dtensor), is_dtensor))
            elif is_dtensor:
                local_dense.append(position)
            else:  # a dense tensor subclass: its own dispatch may not support foreach, so one kernel each
                parts.append(_Part([position], _single_kernel(norm_type), False))
        if dense:
            parts[:0] = _dense_parts([grads[i] for i in dense], dense, norm_type, local=False)
            if len(parts) == 1 and len(dense) == len(grads) and parts[0].positions == dense:
                parts[0].all = True
        if local_dense:
            locals_ = [grads[i].to_local() for i in local_dense]  # type: ignore[union-attr]
            for part in _dense_parts(locals_, local_dense, norm_type, local=True):
                part.kernel = _on_local(part.kernel)
                parts.append(part)
        for part in parts:
            part.device = local_tensor(grads[part.positions[0]]).device
        return cls(parts, len(grads))

    def compute(self, grads: Sequence[Tensor]) -> list[NormGroup]:
        """The norms of ``grads`` (the same parameters as when the plan was built), no host synchronization."""
        return [NormGroup(part.positions, part.kernel(part.tensors(grads)), part.local) for part in self.parts]

    def compute_into(self, grads: Sequence[Tensor], out: Sequence[Tensor]) -> None:
        """Write the norms of ``grads`` into ``out``: one float32 tensor per part, in :attr:`parts` order (the
        measurement's ring buffer rows, whose groups are built once: a step creates no Python object here)."""
        for part, into in zip(self.parts, out):
            part.kernel(part.tensors(grads), into)


def per_param_norms(grads: Sequence[Tensor], norm_type: float) -> list[NormGroup]:
    """The ``norm_type``-norm of each gradient, grouped by (device, dtype); no host synchronization.

    Args:
        grads: gradients, none of them ``None``: dense, sparse (COO, CSR, ...) or DTensor, on any mix of devices
            and floating dtypes.
        norm_type: a positive float, or ``math.inf``.

    Returns:
        Groups that together cover every position of ``grads`` exactly once. Half-precision gradients are
        reduced with float32 accumulation; every ``norms`` tensor is float32.

    Example::

        groups = per_param_norms([p.grad for p in model.parameters()], 2.0)
        norms = {pos: value for g in groups for pos, value in zip(g.positions, g.norms.tolist())}

    """
    return NormPlan.build(grads, norm_type).compute(grads)


# ---------------------------------------------------------------------------------------------- grouping
def _dense_parts(tensors: Sequence[Tensor], positions: list[int], norm_type: float, local: bool) -> list[_Part]:
    parts: list[_Part] = []
    if math.isinf(norm_type):  # the kernels refuse the inf-norm of an empty tensor; a 0-element gradient has norm 0
        empty = [i for i, t in enumerate(tensors) if t.numel() == 0]
        if empty:
            parts.extend(_Part([positions[i]], _empty_kernel, local) for i in empty)
            keep = [i for i in range(len(tensors)) if tensors[i].numel() != 0]
            tensors, positions = [tensors[i] for i in keep], [positions[i] for i in keep]
            if not tensors:
                return parts
    # the C++ grouping clip_grad_norm_ uses: one pass, no Python attribute reads per tensor
    for (device, _), ([members], member_index) in torch._C._group_tensors_by_device_and_dtype(
        [list(tensors)], True
    ).items():
        member_positions = [positions[i] for i in member_index]
        if device.type == "cpu":
            parts.extend(_cpu_parts(members, member_positions, norm_type, local))
        else:
            parts.extend(_accelerator_parts(members, member_positions, norm_type, local))
    return parts


def _cpu_parts(tensors: list[Tensor], positions: list[int], norm_type: float, local: bool) -> list[_Part]:
    by_shape: dict[torch.Size, list[int]] = {}
    for i, tensor in enumerate(tensors):
        if tensor.numel() <= SMALL_NUMEL:
            by_shape.setdefault(tensor.shape, []).append(i)
    parts = []
    stacked: set[int] = set()
    for members in by_shape.values():
        if len(members) >= STACK_MIN_TENSORS:  # fewer: their dispatches cost less than a copy and a reduction
            parts.append(_Part([positions[i] for i in members], _stacked_kernel(norm_type, tensors[members[0]]), local))
            stacked.update(members)
    rest = [i for i in range(len(tensors)) if i not in stacked]
    if rest:
        parts.append(_Part([positions[i] for i in rest], _fused_kernel(norm_type, tensors[0]), local))
    return parts


def _accelerator_parts(tensors: list[Tensor], positions: list[int], norm_type: float, local: bool) -> list[_Part]:
    # the fused kernel splits every tensor into 64K-element chunks launched 320 blocks at a time, which tops out
    # near 2 TB/s on an H100; a tensor of tens of megabytes reads faster through one plain reduction kernel
    large = [i for i, t in enumerate(tensors) if t.numel() >= LARGE_NUMEL]
    parts = []
    if large:
        parts.append(_Part([positions[i] for i in large], _each_kernel(norm_type, tensors[0].dtype), local))
    large_set = set(large)
    rest = [i for i in range(len(tensors)) if i not in large_set]
    if rest:
        parts.append(_Part([positions[i] for i in rest], _fused_kernel(norm_type, tensors[rest[0]]), local))
    return parts


def _slice_of(positions: list[int]) -> Optional[slice]:
    """``positions`` as a slice when they are evenly spaced and increasing, else None."""
    if len(positions) < 2:
        return slice(positions[0], positions[0] + 1) if positions else None
    step = positions[1] - positions[0]
    if step <= 0 or any(b - a != step for a, b in zip(positions, positions[1:])):
        return None
    return slice(positions[0], positions[-1] + 1, step)


def _accelerator_groups(tensors: list[Tensor], positions: list[int], norm_type: float, local: bool) -> list[NormGroup]:
    """The accelerator grouping applied right away (the large-tensor split, testable on any device)."""
    order = {p: i for i, p in enumerate(positions)}
    return [
        NormGroup(part.positions, part.kernel([tensors[order[p]] for p in part.positions]), local)
        for part in _accelerator_parts(tensors, positions, norm_type, local)
    ]


# ---------------------------------------------------------------------------------------------- kernels
def _upcast(dtype: torch.dtype) -> dict:
    # half-precision norms are returned in float32: rounding a norm to bfloat16 would cost it 3 digits
    return {"dtype": torch.float32} if dtype in _HALF else {}


def _into(norms: Tensor, out: Optional[Tensor]) -> Tensor:
    """``norms`` as float32, written into ``out`` when given."""
    if out is not None:
        return out.copy_(norms)
    return norms if norms.dtype == torch.float32 else norms.to(torch.float32)


def _fused_kernel(norm_type: float, sample: Tensor) -> Kernel:
    upcast = sample.dtype in _HALF
    if _has_foreach_support([sample], sample.device):
        float32 = upcast or sample.dtype == torch.float32

        def fused(tensors: Sequence[Tensor], out: Optional[Tensor] = None) -> Tensor:
            norms = _foreach_norm(list(tensors), norm_type, upcast)
            if out is not None and float32:
                return torch.stack(norms, out=out)
            return _into(torch.stack(norms), out)

        return fused
    return _each_kernel(norm_type, sample.dtype)


def _each_kernel(norm_type: float, dtype: torch.dtype) -> Kernel:
    kwargs = _upcast(dtype)

    def each(tensors: Sequence[Tensor], out: Optional[Tensor] = None) -> Tensor:
        return _into(torch.stack([torch.linalg.vector_norm(t, norm_type, **kwargs) for t in tensors]), out)

    return each


def _stacked_kernel(norm_type: float, sample: Tensor) -> Kernel:
    kwargs = _upcast(sample.dtype)
    float32 = bool(kwargs) or sample.dtype == torch.float32
    dims = tuple(range(1, sample.dim() + 1))  # every dimension of a stacked tensor but the first

    def stacked(tensors: Sequence[Tensor], out: Optional[Tensor] = None) -> Tensor:
        rows = torch.stack(tensors)
        if out is not None and float32:
            return torch.linalg.vector_norm(rows, norm_type, dim=dims, out=out, **kwargs)
        return _into(torch.linalg.vector_norm(rows, norm_type, dim=dims, **kwargs), out)

    return stacked


def _single_kernel(norm_type: float) -> Kernel:
    def single(tensors: Sequence[Tensor], out: Optional[Tensor] = None) -> Tensor:
        return _into(torch.linalg.vector_norm(tensors[0], norm_type).reshape(1), out)

    return single


def _empty_kernel(tensors: Sequence[Tensor], out: Optional[Tensor] = None) -> Tensor:
    return _into(local_tensor(tensors[0]).new_zeros(1, dtype=torch.float32), out)


def _sparse_kernel(norm_type: float, is_dtensor: bool) -> Kernel:
    def sparse(tensors: Sequence[Tensor], out: Optional[Tensor] = None) -> Tensor:
        return _into(_sparse_norm(tensors[0].to_local() if is_dtensor else tensors[0], norm_type), out)

    return sparse


def _on_local(kernel: Kernel) -> Kernel:
    def local(tensors: Sequence[Tensor], out: Optional[Tensor] = None) -> Tensor:
        return kernel([t.to_local() for t in tensors], out)

    return local


_foreach_dtype_supported = True


def _foreach_norm(tensors: list[Tensor], norm_type: float, upcast: bool) -> Sequence[Tensor]:
    global _foreach_dtype_supported
    if upcast and _foreach_dtype_supported:
        try:
            return torch._foreach_norm(tensors, norm_type, dtype=torch.float32)
        except TypeError:  # torch < 2.4: no dtype argument; the kernel still accumulates in float32
            _foreach_dtype_supported = False
    return torch._foreach_norm(tensors, norm_type)


def _sparse_norm(grad: Tensor, norm_type: float) -> Tensor:
    # duplicate indices of an uncoalesced COO tensor must be summed before the norm: coalesce (a copy of the
    # gradient's values, as torch's own Tensor.norm does for sparse tensors)
    if grad.layout == torch.sparse_coo:
        values = grad.coalesce().values()
    elif grad.layout in (torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr, torch.sparse_bsc):
        values = grad.values()  # compressed layouts cannot hold duplicates
    else:  # an unknown layout: let torch densify it rather than guess
        values = grad.to_dense()
    if values.dtype in _HALF:
        values = values.to(torch.float32)
    return torch.linalg.vector_norm(values, norm_type).to(torch.float32).reshape(1)


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


__all__ = ["NormGroup", "NormPlan", "local_tensor", "per_param_norms", "total_norm"]
