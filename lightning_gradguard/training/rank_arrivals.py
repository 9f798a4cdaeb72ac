"""DDP: which parameters each rank's backward passes reached, per micro-batch, made global at a reduction.

Under DDP the micro-batches that only accumulate (``no_sync``) show each rank's own gradients, and on the
micro-batch that synchronizes, DDP's reducer writes the averaged gradient of the whole window back into ``.grad``
of every parameter that any rank used anywhere in the window, which the engine's version counters cannot tell from
a new gradient. So :class:`RankArrivals` watches autograd itself (a post-accumulate-grad hook per parameter, about
1 us per parameter per backward pass, which the reducer's write-back does not trigger) and keeps one **column** per
(micro-batch, accumulation window): the parameters this rank's backward passes did not reach, and those the engine
saw no gradient for. The ledger's reduction carries one bit per rank per (column, parameter); from the sums,
:meth:`RankArrivals.apply` corrects the engine's micro-batch counts (a micro-batch is "no gradient" only where no
rank reached the parameter) and keeps the parameters some ranks reached and others did not (``rank_dependent``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import Tensor

from lightning_gradguard.core.observer import StepCheck
from lightning_gradguard.hooks import user_hook
from lightning_gradguard.training.collective import pack_flags, ranks_in, slot_bits, unpack_flags

if TYPE_CHECKING:
    from lightning_gradguard.core.engine import GradGuardEngine

Column = tuple[set[int], set[int], list[int]]  # (autograd missed, engine missed, the parameters checked at its step)


class RankArrivals:
    """This rank's per-micro-batch arrivals under DDP, waiting for the ledger's next reduction.

    Args:
        engine: the rank's engine (its registry numbers the parameters; its state takes the corrections).
        world_size: the number of ranks.
        rank: this rank.

    """

    def __init__(self, engine: GradGuardEngine, world_size: int, rank: int) -> None:
        self.engine = engine
        self.world_size = world_size
        self.rank = rank
        self._hooks: list[Any] = []
        self._hooked: set[int] = set()
        self._seen: list[bool] = []  # the current column: parameters autograd reached on this rank
        self._reached = 0  # how many entries of _seen are True
        self._engine_missed: Optional[set[int]] = None  # the current column: what the engine saw no gradient for
        self._open: list[tuple[set[int], set[int]]] = []  # this window's columns: (autograd missed, engine missed)
        self.closed: list[Column] = []  # complete windows' columns, until the next reduction
        self._partial: dict[int, list[int]] = {}  # parameter -> [micro-batches, bitmask of ranks without it]
        self._hook_parameters()
        self._new_column()

    # ------------------------------------------------------------------ recording (no communication)
    def start_micro_batch(self) -> None:
        self._end_column()
        self._hook_parameters()  # parameters that became trainable since (an unfrozen layer)
        self._new_column()

    def after_backward(self, missed: Sequence[int]) -> None:
        # the engine's view of this backward pass: a parameter counts as arrived if any backward of the column
        # changed its .grad, so what it missed is what every backward of the column missed
        if not self._seen:
            return
        if self._engine_missed is None:
            self._engine_missed = set(missed)
        else:
            self._engine_missed &= set(missed)

    def close_window(self, check: StepCheck) -> None:
        """The window is complete: its columns belong to the parameters ``check`` checked."""
        if not self._seen:
            return
        self._end_column()
        self.closed.extend((autograd, engine, check.checked) for autograd, engine in self._open)
        self._open = []
        self._new_column()

    def missed_last(self, missing: Sequence[int]) -> bool:
        """Whether a parameter of ``missing`` got nothing from this rank's backward passes in the current column."""
        seen = self._seen
        return any(i < len(seen) and not seen[i] for i in missing)

    def release(self) -> None:
        """Take the per-parameter autograd hooks off; what was learned stays readable."""
        for handle in self._hooks:
            handle.remove()
        self._hooks, self._hooked = [], set()
        self._seen = []

    def drop(self) -> None:
        """Stop recording and forget what waits for a reduction (the ranks' columns no longer line up)."""
        self.release()
        self._open, self.closed = [], []

    def _hook_parameters(self) -> None:
        for index, param in enumerate(self.engine.registry.params):
            if index in self._hooked or not param.requires_grad:
                continue
            self._hooked.add(index)
            self._hooks.append(param.register_post_accumulate_grad_hook(user_hook(self._arrival_hook(index))))

    def _arrival_hook(self, index: int) -> Any:
        def arrived(_: Tensor) -> None:
            seen = self._seen
            if index < len(seen) and not seen[index]:
                seen[index] = True
                self._reached += 1

        return arrived

    def _new_column(self) -> None:
        self._seen = [False] * len(self.engine.registry)
        self._reached = 0
        self._engine_missed = None

    def _end_column(self) -> None:
        if self._engine_missed is None:  # no backward pass in this column: nothing to correct
            return
        if self._reached == len(self._hooked) == len(self._seen):  # the common case: every parameter arrived
            missed: set[int] = set()
        else:
            missed = {i for i, reached in enumerate(self._seen) if not reached}
        missed.update(range(len(self._seen), len(self.engine.registry)))
        self._open.append((missed, self._engine_missed))
        self._engine_missed = None

    # ------------------------------------------------------------------ the reduction
    def segment(self, size: int) -> tuple[Tensor, Tensor]:
        """The closed columns as ``(packed words for the all-reduce, this rank's [C, size] arrivals)``."""
        arrived = torch.ones(len(self.closed), size, dtype=torch.bool)
        for c, (missed, _, _) in enumerate(self.closed):
            if missed:
                arrived[c, list(missed)] = False
        return pack_flags(arrived, self.rank, self.world_size), arrived

    def apply(self, words: Tensor, arrived: Tensor, checks: Sequence[StepCheck] = ()) -> None:
        """Correct the engine's counts from the reduced ``words`` (see :meth:`segment`); ``checks``: this logging
        step's checks, whose ``intermittent`` lists become global."""
        columns = self.closed
        cells = unpack_flags(words, len(columns), self.world_size)  # [C, P]: ranks whose backward reached it
        checked = torch.zeros_like(arrived)
        engine_none = torch.zeros_like(arrived)
        rows: dict[int, Tensor] = {}  # the checked lists repeat (one per optimizer): build each mask once
        for c, (_, engine_missed, indices) in enumerate(columns):
            row = rows.get(id(indices))
            if row is None:
                row = rows[id(indices)] = torch.zeros(arrived.shape[1], dtype=torch.bool)
                row[indices] = True
            checked[c] = row
            if engine_missed:
                engine_none[c, list(engine_missed)] = True
        anywhere = cells != 0
        _, per_rank = slot_bits(self.world_size)
        everywhere = cells == ((1 << self.world_size) - 1 if per_rank else self.world_size)
        # the engine counted what this rank's .grad showed; a micro-batch is "no gradient" only where no rank's
        # backward pass reached the parameter
        delta = ((engine_none.to(torch.int64) - (~anywhere).to(torch.int64)) * checked).sum(0)
        state = self.engine.state
        state.add("none_micro_batches", torch.arange(delta.numel()), -delta)
        for index in (delta < 0).nonzero().flatten().tolist():
            # .grad showed DDP's averaged window gradient, so the step check saw nothing amiss; the cause is not
            # known here, only the fact
            state.explain(
                index, None, "in some micro-batches no rank's backward pass reached it; under DDP .grad then holds "
                "the averaged gradient of the window's other micro-batches (found by GradGuard's cross-rank count)"
            )
        # this logging step's checks: intermittent where no rank reached the parameter in some micro-batch of the
        # step's window (the logged intermittent_params is then the global count, as the report's)
        nowhere = ~anywhere & checked
        for check in checks:
            own = [c for c, (_, _, indices) in enumerate(columns) if indices is check.checked][-check.window :]
            if own and check.window:
                missing = set(check.missing)
                missed = nowhere[own].any(0).nonzero().flatten().tolist()
                check.intermittent = [i for i in missed if i not in missing]
        partial = anywhere & ~everywhere & checked
        for index in partial.any(0).nonzero().flatten().tolist():
            rows = partial[:, index]
            mask = 0
            if per_rank:
                full = (1 << self.world_size) - 1
                for value in cells[rows, index].tolist():
                    mask |= full ^ value
            entry = self._partial.setdefault(index, [0, 0])
            entry[0] += int(rows.sum())
            entry[1] |= mask
        self.closed = []

    # ------------------------------------------------------------------ reading out
    def rank_dependent(self) -> dict[str, dict[str, Any]]:
        """Parameters some ranks gave a gradient in a micro-batch and others did not, by name."""
        names = self.engine.registry.names
        _, per_rank = slot_bits(self.world_size)
        out: dict[str, dict[str, Any]] = {}
        for index, (count, mask) in sorted(self._partial.items()):
            if self.engine.registry.allowed[index]:
                continue
            out[names[index]] = {"ranks": ranks_in(mask) if per_rank else None, "micro_batches": count}
        return out
