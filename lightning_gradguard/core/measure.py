"""Where gradient values are read: per-parameter norms at a measured step, and the counters computed from them.

A measured step computes the norm of every gradient it checks (:mod:`lightning_gradguard.core.norms`). The counters
declared with ``from_norms`` in :mod:`lightning_gradguard.core.state` (non-finite gradients, all-zero gradients) are
computed from those norms, but not at every step: each step's norms are written by the kernels straight into the
next row of a small ring buffer on the gradients' device, and the counters read the buffer a whole block of rows at
a time, when it is full or when the state is read. A step therefore costs its norm kernels and nothing more, and
nothing waits for the device.

Plans are keyed by the list of parameters measured (the same list object comes back step after step), and their
number is bounded (``MAX_PLANS``, and more small ones within ``ROW_BUDGET`` rows): a model whose measured set keeps
changing retires old plans, it does not pile them up. The ring buffers hold at most ``BUFFER_VALUES`` norms each, so
memory does not grow with the run.
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

MAX_PLANS = 8  # plans kept whatever their size
BUFFER_VALUES = 1 << 16  # norms a plan's ring buffer holds: at most 64 steps of a small model, 6 of a 10k-tensor one
MAX_ROWS = 64
# beyond MAX_PLANS, plans of FEW_ROWS rows each are kept while all plans' rows stay within ROW_BUDGET: a loop with one
# optimizer per parameter (stepped from gradient hooks) measures hundreds of lists in turn, and must not rebuild a
# plan at every step
FEW_ROWS = 8
ROW_BUDGET = 4096


class _Device:
    """One device's share of a plan: its ring buffer of norms (a row per measured step) and the views each step's
    kernels write into."""

    __slots__ = ("registry", "counted", "columns", "index", "local", "buffer", "views")

    def __init__(self, parts: list[tuple[int, list[int]]], indices: Sequence[int], device: torch.device, rows: int,
                 local: bool, empty: set[int]) -> None:
        order = [p for _, positions in parts for p in positions]
        self.registry = [indices[p] for p in order]
        # a parameter with no elements has nothing to measure: its columns are left out of the counts (its norm, 0,
        # would make it "zero everywhere" at every step)
        kept = [c for c, p in enumerate(order) if p not in empty]
        self.counted = self.registry if len(kept) == len(order) else [self.registry[c] for c in kept]
        self.columns = None if len(kept) == len(order) else torch.tensor(kept, dtype=torch.int64, device=device)
        self.index: Optional[Tensor] = None  # registry indices of the counted columns on the device, at the first count
        self.local = local
        self.buffer = torch.zeros(rows, len(self.registry), dtype=torch.float32, device=device)
        # per row: the slice of each part, so that a step creates no view
        self.views: list[list[Tensor]] = []
        for row in self.buffer:
            start, views = 0, []
            for _, positions in parts:
                views.append(row[start : start + len(positions)])
                start += len(positions)
            self.views.append(views)


class _Measured:
    """A norm plan for one measured parameter list, its ring buffers, and how many rows are not yet counted."""

    __slots__ = ("indices", "plan", "devices", "out", "groups", "rows", "next", "pending")

    def __init__(self, indices: Sequence[int], plan: NormPlan, empty: set[int], few_rows: bool = False) -> None:
        self.indices = indices  # held, so that its id stays unique while the plan lives
        self.plan = plan
        by_device: dict[torch.device, list[tuple[int, list[int]]]] = {}
        for k, part in enumerate(plan.parts):
            by_device.setdefault(part.device, []).append((k, part.positions))
        self.rows = max(1, min(FEW_ROWS if few_rows else MAX_ROWS, BUFFER_VALUES // max(len(indices), 1)))
        self.devices = [
            _Device(parts, indices, device, self.rows, any(plan.parts[k].local for k, _ in parts), empty)
            for device, parts in by_device.items()
        ]
        # per row: where each part's norms go, in the plan's part order
        order = [k for parts in by_device.values() for k, _ in parts]
        self.out: list[list[Tensor]] = []
        for r in range(self.rows):
            views = [view for d in self.devices for view in d.views[r]]
            by_part = dict(zip(order, views))
            self.out.append([by_part[k] for k in range(len(plan.parts))])
        # per row: what a step hands back, built once
        positions = [list(range(len(d.registry))) for d in self.devices]  # shared by every row
        self.groups = [
            [(d.registry, NormGroup(positions[k], d.buffer[r], d.local)) for k, d in enumerate(self.devices)]
            for r in range(self.rows)
        ]
        self.next = 0  # the row the next step writes
        self.pending = 0  # rows written since the last count


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
        self._rows = 0  # rows of all plans kept
        self._last: Optional[_Measured] = None  # the plan of the previous step: most steps measure the same list

    def measure(
        self, indices: Sequence[int], grads: Sequence[Tensor], grad_scale: Optional[Tensor] = None
    ) -> list[tuple[list[int], NormGroup]]:
        """Norms of ``grads`` (``grads[j]`` belongs to registry index ``indices[j]``; none of them None).

        ``grad_scale``: the loss scale the gradients still carry (AMP with a fused optimizer): norms are divided by
        it on the device; Inf and NaN stay what they are. The returned norms stay valid until this parameter list
        has been measured as many times again as its ring buffer has rows.
        """
        measured = self._last
        if measured is None or measured.indices is not indices or measured.plan.size != len(grads):
            measured = self._last = self._plan_for(indices, grads)
        row = measured.next
        measured.plan.compute_into(grads, measured.out[row])
        out = measured.groups[row]
        if grad_scale is not None:
            for _, group in out:
                group.norms.div_(grad_scale.to(device=group.norms.device, dtype=torch.float32, non_blocking=True))
        measured.next = (row + 1) % measured.rows
        measured.pending += 1
        if measured.pending == measured.rows:
            self._count(measured)
        return out

    def _plan_for(self, indices: Sequence[int], grads: Sequence[Tensor]) -> _Measured:
        key = id(indices)
        measured = self._plans.get(key)
        if measured is not None and measured.indices is indices and measured.plan.size == len(grads):
            self._plans.move_to_end(key)
            return measured
        if measured is not None:
            self._retire(self._plans.pop(key))
        few_rows = len(self._plans) >= MAX_PLANS
        empty = {j for j, grad in enumerate(grads) if grad.numel() == 0}
        measured = self._plans[key] = _Measured(indices, NormPlan.build(grads, self.norm_type), empty, few_rows)
        self._rows += measured.rows
        while len(self._plans) > MAX_PLANS and self._rows > ROW_BUDGET:
            self._retire(self._plans.popitem(last=False)[1])
        return measured

    def _retire(self, measured: _Measured) -> None:
        self._rows -= measured.rows
        self._count(measured)

    def flush(self) -> None:
        """Count every plan's rows that are not counted yet (before the state's counters are read)."""
        for measured in self._plans.values():
            self._count(measured)

    def reset(self) -> None:
        """Drop every plan and its uncounted rows (a reset of the state)."""
        self._plans.clear()
        self._rows = 0
        self._last = None

    def _count(self, measured: _Measured) -> None:
        pending = measured.pending
        if not pending:
            return
        for device in measured.devices:
            buffer = device.buffer
            if pending == measured.rows:
                block = buffer
            else:  # the last `pending` rows of the ring
                rows = [(measured.next - pending + j) % measured.rows for j in range(pending)]
                block = buffer[torch.tensor(rows, device=buffer.device)]
            if device.columns is not None:
                block = block.index_select(1, device.columns)
            if device.index is None:
                device.index = torch.tensor(device.counted, dtype=torch.int64).to(buffer.device)
            self.state.add("measured_steps", device.counted, pending)
            for counter in DEVICE_COUNTERS:
                flags = counter.from_norms(block)  # type: ignore[misc]
                self.state.add_device(counter.name, device.index, flags.sum(0))
        measured.pending = 0


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
