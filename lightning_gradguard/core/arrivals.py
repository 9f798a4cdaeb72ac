"""Which parameters a backward pass gave a gradient: detected from host-side metadata, without hooks.

Gradient accumulation hides a micro-batch that gave a parameter nothing: the gradient of an earlier micro-batch
is still in ``.grad``. Autograd accumulates in place (``grad += new``, which bumps the tensor's version counter)
or installs a new tensor (first arrival, or ``create_graph=True``). So comparing each ``.grad``'s identity and
version before and after a backward pass tells exactly which parameters received something, for the price of
reading two attributes per parameter, and with no per-parameter hook in autograd's hot path.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from itertools import repeat
from operator import attrgetter, is_, is_not
from typing import Optional

from torch import Tensor

_GRAD = attrgetter("grad")


class ArrivalTracker:
    """Brackets backward passes and reports which parameters received no gradient."""

    def __init__(self) -> None:
        self._before: Optional[list[Optional[Tensor]]] = None
        self._versions: list[int] = []
        # grads of the parameters the last backward missed, to tell a leftover tensor from one assigned later
        self.last_missed: dict[int, tuple[Optional[weakref.ref], int]] = {}
        self._others: dict[tuple[int, int], tuple[Sequence[int], list[int]]] = {}  # complements of `cleared`
        # the last read after backward, kept for the step check when the adapter knows nothing can change .grad
        # in between (taken by the check, dropped by the next backward: never held past the step)
        self._kept: Optional[list[Optional[Tensor]]] = None
        self._kept_none: Optional[list[int]] = None  # positions of None in it, when that scan was made anyway
        # the state the last backward left (gradients and, when read then, their versions): the next backward pass's
        # baseline when nothing touched a gradient in between (the micro-batches of an accumulation window)
        self._last: Optional[list[Optional[Tensor]]] = None
        self._last_versions: Optional[list[int]] = None
        self.eager_versions = False  # read the versions right after backward (see keep_baseline)
        self.reuse_read = False  # the step check may use the read after backward instead of its own (see take_for_step)
        self.verify_read = False  # ... only if the .grad attributes still hold what was read

    def before_backward(self, params: Sequence[Tensor], cleared: Optional[Sequence[int]] = None) -> None:
        """Snapshot the gradients right before a backward pass.

        Args:
            params: every watched parameter.
            cleared: indices into ``params`` whose gradients are known to be None (``zero_grad(set_to_none=True)``
                just ran for them): they are not read. Reading ``.grad`` costs 0.05-0.2 us per parameter (0.2 once the
                forward pass has pushed the parameters out of the cache): up to 2 ms for 10k tensors.
                Two of them are read anyway; if either has a gradient, everything is read.

        """
        self._kept = self._kept_none = None
        self._last = self._last_versions = None  # never keep gradients alive past the zero_grad that freed them
        if cleared and params[cleared[0]].grad is None and params[cleared[-1]].grad is None:
            others = self._complement(len(params), cleared)
            if not others:
                # every gradient is None: arrival is "has a gradient after backward", no snapshot needed. (A list
                # here would be the first allocation after zero_grad freed every gradient, and pay the allocator's
                # deferred work for all of those frees: 3 ms at 10k tensors.)
                self._before, self._versions = None, []
                return
            before: list[Optional[Tensor]] = [None] * len(params)
            for i in others:
                before[i] = params[i].grad
        else:
            before = [p.grad for p in params]
        self._before = before
        # the common case right after zero_grad(set_to_none=True): nothing to version. Identity tests only, in C:
        # list.count(None) and `None in before` would call Tensor.__eq__ on every gradient (~8 us each).
        if any(map(is_not, before, repeat(None))):
            self._versions = [-1 if g is None else g._version for g in before]
        else:
            self._versions = []

    def new_since_mark(self, params: Sequence[Tensor], indices: Sequence[int]) -> bool:
        """Whether a parameter of ``params[indices]`` holds a gradient that :meth:`before_backward` did not record: a
        new tensor (a backward pass the adapter did not see installed it, or it was assigned by hand), or the
        recorded one written in place and no longer all zeros (a backward pass into the zeros of
        ``zero_grad(set_to_none=False)``; clipping or unscaling zeros leaves zeros). Reads values only in that last
        case, which a loop whose backward passes are all seen never reaches."""
        before, versions = self._before, self._versions
        for i in indices:
            grad = params[i].grad
            if grad is None:
                continue
            if before is None or i >= len(before) or before[i] is not grad:
                return True
            if versions and grad._version != versions[i] and bool(grad.any()):
                return True
        return False

    def keep_baseline(self, params: Sequence[Tensor]) -> None:
        """The next backward pass starts from what the last one left: no gradient changed in between.

        Versions are those read right after the last backward pass when :attr:`eager_versions` was set, else read
        now; read now, a gradient a parameter used only in the loss already received in the pass that is starting
        would look like it was there before (an adapter that notices the pass late sets ``eager_versions``).
        """
        last = self._last
        if last is None or len(last) != len(params):
            self.before_backward(params)
            return
        self._kept = self._kept_none = None
        self._before = last
        if self._last_versions is not None:
            self._versions = self._last_versions
        elif any(map(is_not, last, repeat(None))):
            self._versions = [-1 if g is None else g._version for g in last]
        else:
            self._versions = []

    def _complement(self, n: int, cleared: Sequence[int]) -> list[int]:
        key = (n, id(cleared))
        hit = self._others.get(key)
        if hit is None or hit[0] is not cleared:  # the registry hands back the same list while nothing changes
            skip = set(cleared)
            if len(self._others) > 8:
                self._others.clear()
            hit = self._others[key] = (cleared, [i for i in range(n) if i not in skip])
        return hit[1]

    def after_backward(self, params: Sequence[Tensor], keep: bool = False) -> list[int]:
        """Indices (into ``params``) of the parameters this backward gave no gradient.

        ``keep``: hold on to the gradients just read until :meth:`take_kept` (the step check) or the next backward.
        """
        after = [p.grad for p in params]
        self._kept, self._kept_none = (after if keep else None), None
        before, versions = self._before, self._versions
        self._before, self._versions = None, []  # never keep the old gradients alive past the backward
        if before is None or not versions:
            # no snapshot, or every grad was None before: arrival is simply "has a grad now"
            missed = none_positions(after)
            if keep:
                self._kept_none = missed
        else:
            n = len(before)
            missed = [
                i
                for i, (a, b) in enumerate(zip(before, after))
                if b is None or (a is b and b._version == versions[i])
            ]
            missed.extend(i for i in range(n, len(after)) if after[i] is None)
        self.last_missed = {i: (_ref(after[i]), _version(after[i])) for i in missed}
        self._last = after
        self._last_versions = [-1 if g is None else g._version for g in after] if self.eager_versions else None
        return missed

    def take_kept(
        self, verify: Optional[Sequence[Tensor]] = None
    ) -> tuple[Optional[list[Optional[Tensor]]], Optional[list[int]]]:
        """The gradients the last backward left, as read right after it (if kept), and the positions of None among
        them (if known); hands them over only once. A step ends what the next backward pass could start from.

        ``verify``: the parameters, when code the adapter cannot see may have run since the read (a hand-written
        loop setting ``p.grad = None``, or assigning a clipped copy): the read is handed over only if their
        ``.grad`` are still the tensors it holds: every one up to ``FULL_VERIFY`` parameters, an evenly spaced
        sample of about 64 beyond (reading 10,000 ``.grad`` costs about a millisecond).
        """
        kept, none, self._kept, self._kept_none = self._kept, self._kept_none, None, None
        self._last = self._last_versions = None
        if kept is not None and verify is not None and not _still_held(kept, verify):
            return None, None
        return kept, none

    def take_for_step(
        self, params: Sequence[Tensor]
    ) -> tuple[Optional[list[Optional[Tensor]]], Optional[list[int]]]:
        """For the step check: the gradients of ``params`` (every watched parameter) as read after the last backward
        pass, when :attr:`reuse_read` allows it (and, with :attr:`verify_read`, they are still what ``.grad`` holds),
        and the positions of None among them if known; ``(None, None)`` when the check must read ``.grad`` itself."""
        kept, none = self.take_kept(params if self.verify_read else None)
        if kept is None or not self.reuse_read or len(kept) != len(params):
            return None, None
        return kept, none

    def unchanged_since_backward(self, index: int, grad: Tensor) -> bool:
        """Whether ``grad`` is the very tensor the last backward left untouched (a leftover, not a new gradient)."""
        seen = self.last_missed.get(index)
        if seen is None or seen[0] is None:
            return False
        return seen[0]() is grad and grad._version == seen[1]

    def reset(self) -> None:
        self._before, self._versions = None, []
        self._kept = self._kept_none = None
        self._last = self._last_versions = None
        self.last_missed = {}


FULL_VERIFY = 1024


def _still_held(kept: Sequence[Optional[Tensor]], params: Sequence[Tensor]) -> bool:
    if len(kept) != len(params):
        return False
    if len(params) <= FULL_VERIFY:
        return all(map(is_, kept, map(_GRAD, params)))
    positions = range(len(params) - 1, -1, -(len(params) // 64))  # the last parameter included
    return all(kept[i] is params[i].grad for i in positions)


def _version(grad: Optional[Tensor]) -> int:
    return -1 if grad is None else grad._version


def _ref(grad: Optional[Tensor]) -> Optional[weakref.ref]:
    return None if grad is None else weakref.ref(grad)


def none_positions(values: Sequence[Optional[Tensor]]) -> list[int]:
    """Positions of ``None`` in ``values``: a scan in C first, since on most steps there is none.

    Identity tests only: ``values.count(None)`` or ``None in values`` would call ``Tensor.__eq__`` on every
    gradient (about 8 us each).
    """
    if all(map(is_not, values, repeat(None))):
        return []
    return [i for i, value in enumerate(values) if value is None]
