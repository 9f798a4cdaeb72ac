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
from operator import is_not
from typing import Optional

from torch import Tensor


class ArrivalTracker:
    """Brackets backward passes and reports which parameters received no gradient."""

    def __init__(self) -> None:
        self._before: Optional[list[Optional[Tensor]]] = None
        self._versions: list[int] = []
        # grads of the parameters the last backward missed, to tell a leftover tensor from one assigned later
        self.last_missed: dict[int, tuple[Optional[weakref.ref], int]] = {}

    def before_backward(self, params: Sequence[Tensor]) -> None:
        before = [p.grad for p in params]
        self._before = before
        # the common case right after zero_grad(set_to_none=True): nothing to version. Identity tests only, in C:
        # list.count(None) and `None in before` would call Tensor.__eq__ on every gradient (~8 us each).
        if any(map(is_not, before, repeat(None))):
            self._versions = [-1 if g is None else g._version for g in before]
        else:
            self._versions = []

    def after_backward(self, params: Sequence[Tensor]) -> list[int]:
        """Indices (into ``params``) of the parameters this backward gave no gradient."""
        after = [p.grad for p in params]
        before, versions = self._before, self._versions
        self._before, self._versions = None, []  # never keep the old gradients alive past the backward
        if before is None or not versions:
            # no snapshot, or every grad was None before: arrival is simply "has a grad now"
            missed = [i for i, g in enumerate(after) if g is None]
        else:
            n = len(before)
            missed = [
                i
                for i, (a, b) in enumerate(zip(before, after))
                if b is None or (a is b and b._version == versions[i])
            ]
            missed.extend(i for i in range(n, len(after)) if after[i] is None)
        self.last_missed = {i: (_ref(after[i]), _version(after[i])) for i in missed}
        return missed

    def unchanged_since_backward(self, index: int, grad: Tensor) -> bool:
        """Whether ``grad`` is the very tensor the last backward left untouched (a leftover, not a new gradient)."""
        seen = self.last_missed.get(index)
        if seen is None or seen[0] is None:
            return False
        return seen[0]() is grad and grad._version == seen[1]

    def reset(self) -> None:
        self._before, self._versions = None, []
        self.last_missed = {}


def _version(grad: Optional[Tensor]) -> int:
    return -1 if grad is None else grad._version


def _ref(grad: Optional[Tensor]) -> Optional[weakref.ref]:
    return None if grad is None else weakref.ref(grad)
