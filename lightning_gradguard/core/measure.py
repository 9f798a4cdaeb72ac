"""Where gradient values are read: per-parameter norms at a measured step, and the counters computed from them.

A measured step computes the norm of every gradient it checks (:mod:`lightning_gradguard.core.norms`) and, from
those norms, every counter declared with ``from_norms`` in :mod:`lightning_gradguard.core.state` (non-finite
gradients, all-zero gradients). Nothing here waits for the device: the counts accumulate on the gradients' device,
in the order of a cached plan, and reach :class:`~lightning_gradguard.core.state.GuardState` (one index-add per
counter) only when the state is read or the plan is retired.

Plans are keyed by the list of parameters measured (the same list object comes back step after step), and at most
``MAX_PLANS`` are kept: a model whose measured set keeps changing retires old plans, it does not pile them up.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from lightning_gradguard.core.norms import NormGroup, NormPlan
from lightning_gradguard.core.state import DEVICE_COUNTERS, GuardState

MAX_PLANS = 8


class _Measured:
    """A norm plan for one measured parameter list, with the counts it has gathered so far (in plan order)."""

    __slots__ = ("indices", "plan", "registry", "index", "counts", "steps")

    def __init__(self, indices: Sequence[int], plan: NormPlan) -> None:
        self.indices = indices  # held, so that its id stays unique while the plan lives
        self.plan = plan
        self.registry = [[indices[p] for p in part.positions] for part in plan.parts]
        self.index: list[Optional[Tensor]] = [None] * len(plan.parts)  # registry indices on the norms' device
        self.counts: list[dict[str, Tensor]] = [{} for _ in plan.parts]
        self.steps = 0


class Measurement:
    """Computes a step's per-parameter norms and counts what the declared counters read from them.

    Args:
        state: where the counts go.
        norm_type: the p of the norms.

    Example::

        measurement = Measurement(state, 2.0)
        groups = measurement.measure(indices, grads)   # [(registry indices, NormGroup)], still on the device
        measurement.flush()                            # before reading the state's counters

    """

    def __init__(self, state: GuardState, norm_type: float) -> None:
        self.state = state
        self.norm_type = norm_type
        self._plans: OrderedDict[int, _Measured] = OrderedDict()

    def measure(
        self, indices: Sequence[int], grads: Sequence[Tensor], grad_scale: Optional[Tensor] = None
    ) -> list[tuple[list[int], NormGroup]]:
        """Norms of ``grads`` (``grads[j]`` belongs to registry index ``indices[j]``; none of them None).

        ``grad_scale``: the loss scale the gradients still carry (AMP with a fused optimizer): norms are divided by
        it on the device; Inf and NaN stay what they are.
        """
        measured = self._plan_for(indices, grads)
        measured.steps += 1
        out = []
        for k, group in enumerate(measured.plan.compute(grads)):
            norms = group.norms
            if grad_scale is not None:
                norms = group.norms = norms / grad_scale.to(device=norms.device, dtype=norms.dtype, non_blocking=True)
            counts = measured.counts[k]
            for counter in DEVICE_COUNTERS:
                flags = counter.from_norms(norms)  # type: ignore[misc]
                total = counts.get(counter.name)
                if total is None:
                    counts[counter.name] = flags.to(torch.int64)
                else:
                    total.add_(flags)
            out.append((measured.registry[k], group))
        return out

    def _plan_for(self, indices: Sequence[int], grads: Sequence[Tensor]) -> _Measured:
        key = id(indices)
        measured = self._plans.get(key)
        if measured is not None and measured.indices is indices and measured.plan.size == len(grads):
            self._plans.move_to_end(key)
            return measured
        if measured is not None:
            self._retire(self._plans.pop(key))
        measured = self._plans[key] = _Measured(indices, NormPlan.build(grads, self.norm_type))
        if len(self._plans) > MAX_PLANS:
            self._retire(self._plans.popitem(last=False)[1])
        return measured

    def flush(self) -> None:
        """Hand every plan's counts to the state (the plans stay, their counts restart from zero)."""
        for measured in self._plans.values():
            self._hand_over(measured)

    def reset(self) -> None:
        """Drop every plan and its counts (a reset of the state)."""
        self._plans.clear()

    def _retire(self, measured: _Measured) -> None:
        self._hand_over(measured)

    def _hand_over(self, measured: _Measured) -> None:
        if not measured.steps:
            return
        for k, registry in enumerate(measured.registry):
            self.state.add("measured_steps", registry, measured.steps)
            for name, counts in measured.counts[k].items():
                index = measured.index[k]
                if index is None or index.device != counts.device:
                    index = measured.index[k] = torch.tensor(registry, dtype=torch.int64).to(
                        counts.device, non_blocking=True
                    )
                self.state.add_device(name, index, counts)
            measured.counts[k] = {}
        measured.steps = 0
