"""Accumulation windows: which micro-batches an optimizer step covers, and which of them gave each parameter a
gradient.

With ``accumulate_grad_batches=k`` an optimizer step applies the gradients of the k micro-batches since that
optimizer's previous step: its *window*. :class:`Windows` counts micro-batches and backward passes and tells each
step its window. :class:`ArrivalCounts` keeps, per parameter, how many micro-batches of its current window gave it
a gradient; a step compares that with the window's length to tell "no gradient in all k micro-batches" from "in
some".

Per-parameter vectors cost a few tensor operations per backward pass and per step, which a small model notices
(each is a few microseconds). So the healthy case is kept as two scalars instead: as long as every backward pass
misses the same parameters (usually none; sometimes an unused layer or a frozen backbone), "every other parameter
received a gradient in ``n`` micro-batches" is all there is to know, and a step of the only optimizer reads it in
constant time. The vectors come into play when the pattern changes (a branch taken in some micro-batches) or
several optimizers share the model (a GAN), and leave again at the next step that covers every parameter.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

# index lists converted to tensors and kept: one per optimizer (a loop may keep one optimizer per parameter)
_MAX_INDEX_LISTS = 1024


class Windows:
    """Counts micro-batches and backward passes, and where each optimizer's current window began."""

    def __init__(self) -> None:
        self.micro_batch = 0  # micro-batches started in this run
        self.backwards = 0  # backward passes in this run
        self._start = (0, 0)  # (micro-batch, backward) where this run's windows begin
        self._latest = (0, 0)  # where the latest step of any optimizer ended
        self._last: Any = weakref.WeakKeyDictionary()  # optimizer -> (micro-batch, backward) at its last step
        self.optimizers = 0  # distinct optimizers that stepped in this run
        self.running = False  # a training run started (not a one-off check)
        self.backward_micro_batch = 0  # the micro-batch of the latest backward pass
        self._expected: list[weakref.ref] = []  # the run's optimizers, as the adapter named them
        self._unstepped: set[int] = set()  # ids of the expected optimizers that have not stepped in this run
        self._zeroed: dict[int, int] = {}  # optimizer id -> backward passes when zero_grad(set_to_none=False) ran

    def start_run(self) -> None:
        """A new run: windows restart (optimizers are new objects in a new run)."""
        self.micro_batch = self.backward_micro_batch = 0
        self._start = self._latest = (0, self.backwards)
        self._last = weakref.WeakKeyDictionary()
        self.optimizers = 0
        self.running = True
        self._expected = []
        self._unstepped = set()
        self._zeroed = {}

    def never_stepped(self) -> list[tuple[int, Any]]:
        """``(position among the run's optimizers, optimizer)`` of each that has not stepped in this run."""
        if not self.running:
            return []
        optimizers = enumerate(ref() for ref in self._expected)
        return [(k, o) for k, o in optimizers if o is not None and id(o) in self._unstepped]

    def restart_counts(self) -> None:
        """Counts restored from a checkpoint belong to no window of this run."""
        self._start = (self.micro_batch, self.backwards)

    def close(self, optimizer: Any, running: bool = False) -> tuple[int, int]:
        """``optimizer`` steps now: its window's micro-batches and backward passes (a new window begins).

        ``running``: it steps from inside a backward pass that has not ended (a gradient hook): that pass belongs to
        this window, not the next.
        """
        last = self._last.get(optimizer)
        if last is None:
            last = self._start
            self.optimizers += 1
        last_mb, last_bw = last
        backwards = self.backwards + running
        # a step in the same micro-batch as the previous one (a WGAN critic's several steps per batch) covers the
        # backward passes in between: a window of one micro-batch
        window = max(self.micro_batch - last_mb, 1 if backwards > last_bw else 0)
        self._last[optimizer] = self._latest = (self.micro_batch, backwards)
        self._unstepped.discard(id(optimizer))
        return window, backwards - last_bw

    def zeroed(self, optimizer: Any) -> None:
        """``optimizer.zero_grad(set_to_none=False)`` (or the model's) ran: its gradients are zeros now."""
        self._zeroed[id(optimizer)] = self.backwards

    def zeroed_after_backward(self, optimizer: Any) -> bool:
        """At ``optimizer``'s step, before :meth:`close`: whether its gradients were zeroed after the last backward
        pass of its window (the step applies zeros, and nothing a backward pass computed)."""
        at = self._zeroed.pop(id(optimizer), None)
        return at is not None and at == self.backwards and self.backwards_since_step(optimizer) > 0

    def backwards_since_step(self, optimizer: Any) -> int:
        """Backward passes since ``optimizer``'s last step (or the start of the run), without ending its window."""
        last = self._last.get(optimizer)
        return self.backwards - (last if last is not None else self._start)[1]

    @property
    def run_backwards(self) -> int:
        """Backward passes in this run."""
        return self.backwards - self._start[1]

    def drop_empty(self) -> bool:
        """Take back the micro-batch in progress if no backward pass ran in it, in a run that has run one (before
        that, a batch without backward is a bug to report); returns whether it did."""
        if self.micro_batch <= self.backward_micro_batch or not self.run_backwards:
            return False
        self.micro_batch -= 1
        return True

    def expect(self, optimizers: Sequence[Any]) -> None:
        """The run's optimizers, known before any steps: their windows begin at the start of the run, and a step
        of one of several does not end the others' windows (a parameter two of them share) from the first step."""
        for optimizer in optimizers:
            if optimizer in self._last:  # seen in this run already
                continue
            self._last[optimizer] = self._start
            self.optimizers += 1
            self._expected.append(weakref.ref(optimizer))
            self._unstepped.add(id(optimizer))

    def join(self, optimizer: Any) -> None:
        """``optimizer``, created after the run began, is about to take its first step: its window begins where
        the latest step of any optimizer ended (it was created, and its gradients cleared, after that step)."""
        if optimizer not in self._last:
            self._last[optimizer] = self._latest
            self.optimizers += 1

    def restart(self, optimizer: Any, in_progress: bool = False) -> bool:
        """``optimizer``'s window begins at the next micro-batch (its gradients were cleared without a step), or at
        the one in progress (``in_progress``: its forward pass ran, its backward pass has not).

        Returns False when nothing happened since its last step (the window is fresh already).
        """
        now = (self.micro_batch - in_progress, self.backwards)
        if self._last.get(optimizer) == now:
            return False
        if optimizer not in self._last:
            self.optimizers += 1
        self._last[optimizer] = now
        return True


class ArrivalCounts:
    """Per parameter: the micro-batches of its current window in which a backward pass gave it a gradient.

    With one optimizer, a step reads the counts and zeroes them. With several, a parameter two optimizers share
    (an embedding both networks update) has a window per optimizer: the counts then only grow, and each checked
    list (one per optimizer) keeps the counts where its own window began.

    Example::

        arrivals = ArrivalCounts()
        arrivals.resize(3)
        arrivals.record(micro_batch=1, missed=[2])         # parameter 2 got nothing in micro-batch 1
        zero, short = arrivals.take([0, 1, 2], window=1, covers_all=True)
        # zero == [2] (no arrival in the window); short == {2: 1} (one micro-batch without a gradient)

    """

    def __init__(self) -> None:
        self.size = 0
        self.reset()

    def reset(self) -> None:
        self._count = torch.zeros(self.size, dtype=torch.int64)
        self._last = torch.full((self.size,), -1, dtype=torch.int64)
        self._clean = True  # the vectors hold nothing (every count 0, every last -1)
        # the lazy part, on top of the vectors: every parameter outside `_absent` arrived in `_extra` more
        # micro-batches, the latest being `_extra_in`
        self._extra = 0
        self._extra_in = -1
        self._absent: list[int] = []
        self._index: dict[int, tuple[Sequence[int], Tensor]] = {}
        self._base: dict[int, tuple[Sequence[int], Tensor]] = {}  # per checked list: counts where its window began
        # parameters that joined while a window was counting (a layer added mid-run, a param group added): the
        # micro-batches before they joined are unknown, so that window cannot say they missed some
        self._joined: set[int] = set()

    def resize(self, size: int) -> None:
        if size <= self.size:
            return
        if not (self._clean and not self._extra):
            self._joined.update(range(self.size, size))
        self._materialize()
        extra = size - self.size
        self._count = torch.cat([self._count, self._count.new_zeros(extra)])
        self._last = torch.cat([self._last, self._last.new_full((extra,), -1)])
        self.size = size

    # ------------------------------------------------------------------ recording
    def record(self, micro_batch: int, missed: list[int]) -> None:
        """A backward pass of ``micro_batch`` gave every parameter but ``missed`` a gradient.

        A parameter counts once per micro-batch, however many backward passes it ran.
        """
        if len(missed) == self.size:  # nothing arrived (every optimizer stepped and cleared inside the pass)
            return
        if self._extra:
            if missed == self._absent:  # the same pattern as before: the lazy part absorbs it
                if self._extra_in != micro_batch:
                    self._extra += 1
                    self._extra_in = micro_batch
                return
        elif self._clean:  # nothing counted yet in any window: start the lazy part
            self._extra, self._extra_in = 1, micro_batch
            self._absent = missed
            return
        self._materialize()
        arrived = torch.ones(self.size, dtype=torch.bool)
        if missed:
            arrived[torch.tensor(missed, dtype=torch.int64)] = False
        arrived &= self._last != micro_batch
        self._count += arrived
        self._last[arrived] = micro_batch
        self._clean = False

    def restart(self, indices: Sequence[int], covers_all: bool) -> None:
        """Forget the arrivals of ``indices``: their window starts again (``covers_all``: every parameter)."""
        if self._clean and not self._extra:  # nothing counted anywhere: every window is fresh already
            return
        if covers_all:
            self.reset_counts()
            return
        self._materialize()
        index = self._index_of(indices)
        self._set_base(indices, self._count[index])
        self._last[index] = -1  # a backward pass later in the same micro-batch counts for the new window
        if self._joined:
            self._joined.difference_update(indices)

    def reset_counts(self) -> None:
        self._count.zero_()
        self._last.fill_(-1)
        self._clean = True
        self._extra, self._extra_in, self._absent = 0, -1, []
        self._base.clear()
        self._joined.clear()

    # ------------------------------------------------------------------ a step
    def all_arrived(self, window: int, covers_all: bool) -> bool:
        """At a step of the only optimizer: whether every parameter received a gradient in each of the window's
        ``window`` micro-batches (the healthy case, known in constant time); if so, every window restarts."""
        if covers_all and self._clean and self._extra >= window and self._extra and not self._absent:
            self._extra, self._extra_in, self._absent = 0, -1, []
            return True
        return False

    def take(self, indices: Sequence[int], window: int, covers_all: bool) -> tuple[list[int], dict[int, int]]:
        """The arrivals of ``indices`` for a step whose window has ``window`` micro-batches; their windows restart.

        Args:
            indices: the registry indices the step checks.
            window: the number of micro-batches in the step's window.
            covers_all: the step's optimizer is the only one: every parameter's window restarts.

        Returns:
            ``(zero, short)``: the indices that received no gradient in the window, and for each index that missed
            some micro-batches of it, how many (``window`` minus its arrivals).

        """
        if covers_all and self._clean and self._extra >= window:
            # no micro-batch with an arrival since the last step (a step without backward): nobody arrived
            absent = self._absent if self._extra else list(indices)
            zero: list[int] = []
            short: dict[int, int] = {}
            if absent:
                wanted = absent if absent is indices or len(indices) >= self.size else self._members(indices, absent)
                zero = list(wanted)
                if window > 0:
                    short = dict.fromkeys(wanted, window)
            self._extra, self._extra_in, self._absent = 0, -1, []
            return zero, short
        self._materialize()
        index = self._index_of(indices)
        counts = self._count[index]
        base = self._base.get(id(indices))
        rows = counts - base[1] if base is not None and base[0] is indices else counts
        zero_rows = (rows == 0).nonzero().flatten().tolist()
        missing = (window - rows).clamp_(min=0)
        short_rows = missing.nonzero().flatten().tolist()
        short = dict(zip([indices[r] for r in short_rows], missing[short_rows].tolist())) if short_rows else {}
        if self._joined:  # no arrival at all still counts (a None at the step is then not `cleared`)
            short = {i: n for i, n in short.items() if i not in self._joined}
            self._joined.difference_update(indices)
        if covers_all:
            self.reset_counts()
        else:
            self._set_base(indices, counts)
            self._last[index] = -1
        return [indices[r] for r in zero_rows], short

    # ------------------------------------------------------------------ helpers
    def _members(self, indices: Sequence[int], absent: list[int]) -> list[int]:
        wanted = set(indices)
        return [i for i in absent if i in wanted]

    def _materialize(self) -> None:
        """Move the lazy part into the vectors."""
        if not self._extra:
            return
        present = torch.ones(self.size, dtype=torch.bool)
        if self._absent:
            present[torch.tensor(self._absent, dtype=torch.int64)] = False
        self._count[present] += self._extra
        self._last[present] = self._extra_in
        self._extra, self._extra_in, self._absent = 0, -1, []
        self._clean = False

    def _set_base(self, indices: Sequence[int], counts: Tensor) -> None:
        if len(self._base) >= _MAX_INDEX_LISTS and id(indices) not in self._base:
            self._base.clear()  # (windows of forgotten lists then count from the last reset: never fewer arrivals)
        self._base[id(indices)] = (indices, counts)

    def _index_of(self, indices: Sequence[int]) -> Tensor:
        # the same index lists come back every step (one per optimizer): convert each once, keep a few
        cached = self._index.get(id(indices))
        if cached is not None and cached[0] is indices:
            return cached[1]
        if len(self._index) >= _MAX_INDEX_LISTS:
            self._index.clear()
        index = torch.tensor(list(indices), dtype=torch.int64)
        self._index[id(indices)] = (indices, index)
        return index
