"""The process group GradGuard reduces over, and how per-rank flags travel through one all-reduce.

Packing: a float64 holds integers exactly up to 2**53, so up to 52 bits of each word carry flags; an all-reduce SUM
of words in which every rank sets only its own bits is a bitwise OR. Beyond 52 ranks a cell holds a count of
ranks instead of their bits (exact counts, no rank list).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

_WORD_BITS = 52  # integer-exact bits of a float64 mantissa


class Collective:
    """The process group the guard reduces over, and the device its tensors must be on (CUDA for NCCL).

    Args:
        group: a process group; None is the default group.
        device: where reduced tensors live; None picks CUDA for NCCL and the CPU otherwise.

    Raises:
        RuntimeError: ``torch.distributed`` is not initialized.

    """

    def __init__(self, group: Any = None, device: Optional[torch.device] = None) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("GradGuard's Collective needs an initialized torch.distributed process group")
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        backend = str(dist.get_backend(group)).lower()
        if device is None or (backend == "nccl" and device.type != "cuda"):
            device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        self.device = device

    @staticmethod
    def available() -> bool:
        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def sum(self, tensor: Tensor) -> Tensor:
        """All-reduce SUM of ``tensor`` over the group; returns the result on the host."""
        work = tensor.to(self.device)
        dist.all_reduce(work, op=dist.ReduceOp.SUM, group=self.group)
        return work.cpu()

    def max(self, tensor: Tensor) -> Tensor:
        """All-reduce MAX of ``tensor`` over the group; returns the result on the host."""
        work = tensor.to(self.device)
        dist.all_reduce(work, op=dist.ReduceOp.MAX, group=self.group)
        return work.cpu()


# ---------------------------------------------------------------------- bit packing
def slot_bits(world_size: int) -> tuple[int, bool]:
    """Bits per (column, parameter) cell, and whether a cell holds one bit per rank (else a count of ranks)."""
    if world_size <= _WORD_BITS:
        return world_size, True
    return world_size.bit_length(), False


def pack_flags(flags: Tensor, rank: int, world_size: int) -> Tensor:
    """Pack a ``[columns, params]`` bool matrix into float64 words whose all-reduce SUM merges every rank's flags.

    Args:
        flags: this rank's flags, ``[C, P]``.
        rank: this rank (it sets bit ``rank`` of each cell's slot; beyond 52 ranks it adds 1 to a count).
        world_size: the number of ranks.

    Returns:
        ``[W, P]`` float64, ``W = ceil(C / slots_per_word)``.

    """
    bits, per_rank = slot_bits(world_size)
    per_word = _WORD_BITS // bits
    columns, params = flags.shape
    words = -(-columns // per_word)
    padded = torch.zeros(words * per_word, params, dtype=torch.float64, device=flags.device)
    padded[:columns] = flags.to(torch.float64)
    shifts = torch.arange(per_word, dtype=torch.float64, device=flags.device) * bits + (rank if per_rank else 0)
    weights = torch.pow(2.0, shifts).view(1, per_word, 1)
    return (padded.view(words, per_word, params) * weights).sum(1)


def unpack_flags(words: Tensor, columns: int, world_size: int) -> Tensor:
    """Inverse of :func:`pack_flags` after the SUM: ``[C, P]`` int64, each cell the bitmask of ranks that set it
    (beyond 52 ranks: how many ranks set it)."""
    bits, _ = slot_bits(world_size)
    per_word = _WORD_BITS // bits
    slots = [
        torch.remainder(torch.floor(words / float(2 ** (s * bits))), float(2**bits)) for s in range(per_word)
    ]
    cells = torch.stack(slots, 1).reshape(-1, words.shape[-1])[:columns]
    return cells.to(torch.int64)


def ranks_in(mask: int) -> list[int]:
    return [r for r in range(mask.bit_length()) if mask >> r & 1]
