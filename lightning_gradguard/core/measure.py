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

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from lightning_gradguard.core.norms import NormGroup, NormPlan, local_tensor, per_param_norms
from lightning_gradguard.core.state import DEVICE_COUNTERS, GuardState

MAX_PLANS = 8


class _Measured:
    """A norm plan for one measured parameter list, with the counts it has gathered so far.

    Counts are kept per device, in the order of that device's norms (the plan's groups on that device, one after
    the other), so that a step adds each counter's flags with one operation per device.
    """

    __slots__ = ("indices", "plan", "devices", "registry", "index", "counts", "steps")

    def __init__(self, indices: Sequence[int], plan: NormPlan) -> None:
        self.indices = indices  # held, so that its id stays unique while the plan lives
        self.plan = plan
        self.devices: list[list[int]] = []  # per device: the plan's group numbers on it
        self.registry: list[list[int]] = []  # per device: registry indices in the order of its norms
        self.index: list[Optional[Tensor]] = []  # per device: the same, as a tensor on the device
        self.counts: list[dict[str, Tensor]] = []
        self.steps = 0

    def arrange(self, groups: list[NormGroup]) -> None:
        """Find which groups share a device (done at the first step, when the norms' devices are known)."""
        by_device: dict[torch.device, list[int]] = {}
        for k, group in enumerate(groups):
            by_device.setdefault(group.norms.device, []).append(k)
        self.devices = list(by_device.values())
        self.registry = [[self.indices[p] for k in ks for p in groups[k].positions] for ks in self.devices]
        self.index = [None] * len(self.devices)
        self.counts = [{} for _ in self.devices]


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
        groups = measured.plan.compute(grads)
        if not measured.devices:
            measured.arrange(groups)
        measured.steps += 1
        out = []
        for d, members in enumerate(measured.devices):
            if len(members) == 1:
                norms = groups[members[0]].norms
            else:
                norms = torch.cat([groups[k].norms for k in members])
            if grad_scale is not None:
                norms = norms / grad_scale.to(device=norms.device, dtype=norms.dtype, non_blocking=True)
            counts = measured.counts[d]
            for counter in DEVICE_COUNTERS:
                flags = counter.from_norms(norms)  # type: ignore[misc]
                total = counts.get(counter.name)
                if total is None:
                    counts[counter.name] = flags.to(torch.int64)
                else:
                    total.add_(flags)
            local = any(groups[k].local for k in members)
            out.append((measured.registry[d], NormGroup(list(range(norms.numel())), norms, local)))
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
        for d, registry in enumerate(measured.registry):
            self.state.add("measured_steps", registry, measured.steps)
            for name, counts in measured.counts[d].items():
                index = measured.index[d]
                if index is None:
                    index = measured.index[d] = torch.tensor(registry, dtype=torch.int64).to(counts.device)
                self.state.add_device(name, index, counts)
            measured.counts[d] = {}
        measured.steps = 0


# ---------------------------------------------------------------------------------------------- pictures
@dataclass
class StatsRequest:
    """What a sink wants measured at a step beyond the norms (the dashboard's pictures).

    Attributes:
        flow: per-parameter mean and max absolute gradient (the gradient-flow image).
        histograms: ``(series name, registry indices)``: one histogram of the gradient values of those parameters
            each.

    """

    flow: bool = False
    histograms: Sequence[tuple[str, Sequence[int]]] = ()


@dataclass
class StepStats:
    """What :func:`measure_stats` measured, still on the device.

    Attributes:
        flow: ``(registry indices, L1 norms, max norms, element counts)`` of the parameters that had a gradient.
        histograms: ``(series name, packed)`` where ``packed`` is ``[min, max, count, sum, sum of squares,
            bucket counts...]`` over the series' finite gradient values (``HISTOGRAM_BINS`` equal buckets).

    """

    flow: Optional[tuple[list[int], Tensor, Tensor, list[int]]] = None
    histograms: list[tuple[str, Tensor]] = field(default_factory=list)


HISTOGRAM_BINS = 30


def measure_stats(request: StatsRequest, indices: Sequence[int], grads: Sequence[Optional[Tensor]]) -> StepStats:
    """Measure what ``request`` asks for, from ``grads`` (``grads[j]`` belongs to ``indices[j]``; None: missing)."""
    stats = StepStats()
    present = [j for j, grad in enumerate(grads) if grad is not None]
    if request.flow and present:
        tensors = [grads[j] for j in present]
        l1 = _in_order(per_param_norms(tensors, 1.0), len(tensors))  # type: ignore[arg-type]
        peak = _in_order(per_param_norms(tensors, math.inf), len(tensors))  # type: ignore[arg-type]
        numel = [local_tensor(t).numel() for t in tensors]  # type: ignore[arg-type]
        stats.flow = ([indices[j] for j in present], l1, peak, numel)
    if request.histograms:
        grad_of = {indices[j]: grads[j] for j in present}
        for name, members in request.histograms:
            values = [_flat(grad_of[i]) for i in members if i in grad_of]
            if values:
                stats.histograms.append((name, _histogram(torch.cat(values) if len(values) > 1 else values[0])))
    return stats


def _in_order(groups: list[NormGroup], size: int) -> Tensor:
    device = groups[0].norms.device
    out = torch.empty(size, dtype=torch.float32, device=device)
    for group in groups:
        out[torch.tensor(group.positions, device=device)] = group.norms.to(device)
    return out


def _flat(grad: Tensor) -> Tensor:
    grad = local_tensor(grad)
    if grad.layout != torch.strided:
        grad = grad.coalesce().values() if grad.is_sparse else grad.values()
    return grad.detach().reshape(-1).to(torch.float32)


def _histogram(values: Tensor) -> Tensor:
    """``[min, max, count, sum, sum of squares, bucket counts...]`` of the finite values, on their device."""
    finite = torch.isfinite(values)
    count = finite.sum()
    safe = torch.where(finite, values, torch.zeros((), dtype=values.dtype, device=values.device))
    big = torch.finfo(values.dtype).max
    low = torch.where(finite, values, torch.full((), big, device=values.device)).min()
    high = torch.where(finite, values, torch.full((), -big, device=values.device)).max()
    width = (high - low).clamp(min=1e-30) / HISTOGRAM_BINS
    bucket = ((values - low) / width).floor().clamp(0, HISTOGRAM_BINS - 1).to(torch.int64)
    bucket = torch.where(finite, bucket, torch.full_like(bucket, HISTOGRAM_BINS))  # non-finite: an extra bucket
    counts = torch.bincount(bucket, minlength=HISTOGRAM_BINS + 1)[:HISTOGRAM_BINS].to(torch.float64)
    head = torch.stack([low, high, count.to(values.dtype), safe.sum(), safe.square().sum()]).to(torch.float64)
    return torch.cat([head, counts])
