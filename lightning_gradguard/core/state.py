"""Where a missing gradient is counted: every per-parameter counter declared once, and the state that holds them.

A counter is declared by a :class:`Counter`: its name (the field of
:class:`~lightning_gradguard.report.ParamReport` and of the checkpoint), what it counts, and how the ranks of a
distributed run combine it. Reset, the checkpoint (:meth:`GuardState.state_dict`, named and versioned), the report's
per-parameter values and the cross-rank reduction (:mod:`lightning_gradguard.training.distributed`) all iterate
over :data:`COUNTERS`, so adding a counter is one declaration plus the code that counts it.

Counting stays cheap at every model size: a step that counts the same amount for every parameter it checked (the
healthy case) is recorded as one pending scalar per counter, keyed by the checked index list, and added to the
per-parameter vectors only when they are read (a report, a checkpoint, a reduction) or when another list comes in.
Counters measured from gradient values (:attr:`Counter.from_norms`) live on the gradients' device and are updated
there without a host synchronization (see :mod:`lightning_gradguard.core.measure`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from lightning_gradguard.core.causes import ZERO
from lightning_gradguard.core.messages import zero_detail
from lightning_gradguard.report import ParamReport

SAME = "same"  # every rank that checks the parameter counts the same (its gradient at the step is the same)
ANY_RANK = "any"  # a measured step counts when it counts on any rank (a non-finite value in any shard)
ALL_RANKS = "all"  # a measured step counts when it counts on every rank that holds a shard (an all-zero gradient)

STATE_VERSION = 2
# distinct checked lists with pending uniform counts before they are added up (one per optimizer; a loop may keep
# one optimizer per parameter)
_MAX_PENDING = 1024


@dataclass(frozen=True)
class Counter:
    """One per-parameter counter.

    Attributes:
        name: the field name in the report and the checkpoint.
        doc: what one unit of it is.
        combine: how ranks combine it: ``"same"`` (every rank that checks the parameter counts alike),
            ``"any"`` or ``"all"`` (a measured step counts when any / every rank's shard counts it).
        from_norms: for counters measured from gradient values: the per-parameter flag computed from the
            step's gradient norms (a bool tensor on the device).

    """

    name: str
    doc: str
    combine: str = SAME
    from_norms: Optional[Callable[[Tensor], Tensor]] = None

    @property
    def on_device(self) -> bool:
        return self.from_norms is not None


def _nonfinite(norms: Tensor) -> Tensor:
    # a norm is never negative: "not below infinity" is Inf or NaN, in one kernel (isfinite takes several)
    return (norms < math.inf).logical_not_()


def _zero(norms: Tensor) -> Tensor:
    return norms == 0


COUNTERS: tuple[Counter, ...] = (
    Counter("steps", "optimizer steps that checked the parameter"),
    Counter("none_steps", "checked steps at which it had no gradient"),
    Counter("micro_batches", "micro-batches in the accumulation windows of its checked steps"),
    Counter("none_micro_batches", "micro-batches of those windows whose backward passes gave it no gradient"),
    Counter("measured_steps", "checked steps at which its gradient's values were measured"),
    Counter("nonfinite_steps", "measured steps at which its gradient held NaN or Inf", ANY_RANK, _nonfinite),
    Counter("zero_steps", "measured steps at which its gradient was zero everywhere", ALL_RANKS, _zero),
    # weights that never move (lightning_gradguard.core.updates): steps that ran, not the ones the AMP scaler skipped
    Counter("update_steps", "checked steps at which its optimizer's step() ran"),
    Counter("zero_lr_steps", "steps that ran while its param group's learning rate was 0"),
    Counter("version_steps", "steps that ran with its version counter read before and after step()"),
    Counter("untouched_steps", "of those, steps after which its version counter had not changed"),
)
HOST_COUNTERS = tuple(c for c in COUNTERS if not c.on_device)
DEVICE_COUNTERS = tuple(c for c in COUNTERS if c.on_device)
_BY_NAME = {c.name: c for c in COUNTERS}


class GuardState:
    """The engine's counts: per-parameter counters (declared in :data:`COUNTERS`), causes, and run totals.

    Only the engine and its observers write it, through the methods below. Vectors are indexed by registry index
    and grow with the registry (:meth:`resize`).

    Example::

        state = GuardState()
        state.resize(3)
        state.add_uniform([0, 1, 2], steps=1, micro_batches=4)   # a healthy step: pending, O(1)
        state.add("none_steps", [2], 1)                           # parameter 2 had no gradient
        state.values("steps").tolist()                            # [1, 1, 1]

    """

    def __init__(self) -> None:
        self.size = 0
        self.steps = 0  # optimizer steps checked
        self.backwards = 0  # backward passes seen
        self.reset()

    # ------------------------------------------------------------------ lifecycle
    def reset(self) -> None:
        """Forget every count and cause (the size stays)."""
        self.steps = 0
        self.backwards = 0
        self.skipped_steps = 0  # optimizer steps after batches the training loop skipped on purpose (not checked)
        self._host = {c.name: torch.zeros(self.size, dtype=torch.int64) for c in HOST_COUNTERS}
        self._device: dict[str, dict[torch.device, Tensor]] = {c.name: {} for c in DEVICE_COUNTERS}
        self._pending: dict[int, tuple[Sequence[int], dict[str, int]]] = {}
        self.causes: dict[int, tuple[Optional[str], Optional[str]]] = {}
        self.warned: set[int] = set()

    def resize(self, size: int) -> None:
        """Grow every vector to ``size`` parameters (new parameters start at zero)."""
        if size <= self.size:
            return
        extra = size - self.size
        for name, vector in self._host.items():
            self._host[name] = torch.cat([vector, vector.new_zeros(extra)])
        for per_device in self._device.values():
            for device, vector in per_device.items():
                per_device[device] = torch.cat([vector, vector.new_zeros(extra)])
        self.size = size

    # ------------------------------------------------------------------ counting
    def add_uniform(self, indices: Sequence[int], **values: int) -> None:
        """Add the same amount to every parameter in ``indices``; pending until read.

        ``indices`` should be a list that comes back by identity step after step (the registry's and the engine's
        lists do): one pending entry per list, so a healthy step costs a dictionary lookup.
        """
        key = id(indices)
        entry = self._pending.get(key)
        if entry is None or entry[0] is not indices:
            if len(self._pending) >= _MAX_PENDING:
                self.flush()
            entry = self._pending[key] = (indices, dict.fromkeys(values, 0))
        amounts = entry[1]
        for name, value in values.items():
            amounts[name] = amounts.get(name, 0) + value

    def add(self, name: str, indices: Any, value: Any) -> None:
        """Add ``value`` (a number, or one per index) to host counter ``name`` at ``indices`` (a list or tensor)."""
        if len(indices) == 0:
            return
        index = indices if isinstance(indices, Tensor) else torch.tensor(indices, dtype=torch.int64)
        vector = self._host[name]
        if isinstance(value, Tensor):
            vector.index_add_(0, index, value.to(torch.int64))
        else:
            vector[index] += value

    def assign(self, name: str, mask: Tensor, values: Tensor) -> None:
        """Set host counter ``name`` where ``mask`` is True (the cross-rank reduction's global values)."""
        self.flush()
        self._host[name][mask] = values.to(torch.int64)

    def add_device(self, name: str, index: Tensor, values: Tensor) -> None:
        """Add ``values`` (on a device) to device counter ``name`` at ``index`` (on the same device), no sync."""
        per_device = self._device[name]
        vector = per_device.get(values.device)
        if vector is None:
            vector = per_device[values.device] = torch.zeros(self.size, dtype=torch.int64, device=values.device)
        elif vector.numel() < self.size:
            vector = per_device[values.device] = torch.cat([vector, vector.new_zeros(self.size - vector.numel())])
        vector.index_add_(0, index, values.to(torch.int64))

    def flush(self) -> None:
        """Add the pending uniform counts to the per-parameter vectors."""
        pending, self._pending = self._pending, {}
        for indices, amounts in pending.values():
            if not indices:
                continue
            index = torch.tensor(indices, dtype=torch.int64) if not isinstance(indices, range) else None
            for name, amount in amounts.items():
                if amount:
                    vector = self._host[name]
                    if index is None:
                        vector[indices.start : indices.stop] += amount
                    else:
                        vector[index] += amount

    # ------------------------------------------------------------------ causes
    def explain(self, index: int, cause: Optional[str], detail: Optional[str]) -> None:
        """Record why ``index`` had no gradient: the first explanation wins, a later one fills in an unknown."""
        current = self.causes.get(index)
        if current is None or current[0] is None:
            self.causes[index] = (cause, detail)

    # ------------------------------------------------------------------ reading
    def values(self, name: str) -> Tensor:
        """Counter ``name`` per parameter, on the host (device counters: one copy per device; call rarely)."""
        if _BY_NAME[name].on_device:
            total = torch.zeros(self.size, dtype=torch.int64)
            for vector in self._device[name].values():
                total[: vector.numel()] += vector.cpu()
            return total
        self.flush()
        return self._host[name]

    def table(self) -> dict[str, list[int]]:
        """Every counter as a list per parameter (one host copy per device counter)."""
        return {c.name: self.values(c.name).tolist() for c in COUNTERS}

    def param_reports(self, names: Sequence[str], allowed: Sequence[bool]) -> dict[str, ParamReport]:
        """The report's entry of every parameter checked at least once and not allowed to go without a gradient
        (``names[i]``, ``allowed[i]``: parameter ``i``), with its cause when it has a problem."""
        table = self.table()
        counters = [c.name for c in COUNTERS]
        params: dict[str, ParamReport] = {}
        for i, name in enumerate(names):
            if table["steps"][i] == 0 or allowed[i]:
                continue
            p = ParamReport(**{counter: table[counter][i] for counter in counters})
            if p.missing or p.intermittent:
                p.cause, p.detail = self.causes.get(i, (None, None))
            elif p.always_zero:
                p.cause, p.detail = ZERO, zero_detail(p.zero_steps)
            params[name] = p
        return params

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self, names: Sequence[str], keep: Callable[[int], bool]) -> dict[str, Any]:
        """Counts and causes by parameter name (``names[i]`` is parameter ``i``) for the parameters ``keep`` selects."""
        table = self.table()
        params = {}
        for i, name in enumerate(names):
            if not keep(i):
                continue
            entry: dict[str, Any] = {c.name: table[c.name][i] for c in COUNTERS}
            cause, detail = self.causes.get(i, (None, None))
            if cause is not None or detail is not None:
                entry["cause"], entry["detail"] = cause, detail
            params[name] = entry
        return {
            "version": STATE_VERSION,
            "steps": self.steps,
            "backwards": self.backwards,
            "skipped_steps": self.skipped_steps,
            "params": params,
            "warned": [names[i] for i in sorted(self.warned) if i < len(names)],
        }

    def load_state_dict(self, state: Mapping[str, Any], index_of: Mapping[str, int]) -> None:
        """Replace every count with the checkpoint's (``index_of``: parameter name -> index; others are ignored).

        Raises:
            ValueError: ``state`` is not a GradGuard state (wrong types, negative counts, unknown version).

        """
        parsed = parse_state(state)
        self.reset()
        self.steps, self.backwards = parsed["steps"], parsed["backwards"]
        self.skipped_steps = parsed["skipped_steps"]
        restored_device = {c.name: torch.zeros(self.size, dtype=torch.int64) for c in DEVICE_COUNTERS}
        for name, entry in parsed["params"].items():
            i = index_of.get(name)
            if i is None or i >= self.size:
                continue
            for counter in COUNTERS:
                target = restored_device[counter.name] if counter.on_device else self._host[counter.name]
                target[i] = entry.get(counter.name, 0)
            if entry.get("cause") is not None or entry.get("detail") is not None:
                self.causes[i] = (entry.get("cause"), entry.get("detail"))
        for name, vector in restored_device.items():
            if vector.any():
                self._device[name] = {torch.device("cpu"): vector}
        self.warned = {index_of[n] for n in parsed["warned"] if n in index_of}


# version 1 stored a list per parameter in this order
_V1_FIELDS = ("steps", "none_steps", "micro_batches", "none_micro_batches", "nonfinite_steps", "cause", "detail")


def parse_state(state: Any) -> dict[str, Any]:
    """Validate a checkpointed GradGuard state and bring it to the current version's shape.

    Raises:
        ValueError: naming what is wrong, when ``state`` cannot be GradGuard's.

    """
    if not isinstance(state, Mapping):
        raise ValueError(f"expected a dict, got {type(state).__name__}")
    version = state.get("version", 1)
    if version not in (1, STATE_VERSION):
        raise ValueError(f"unknown state version {version!r} (this GradGuard reads 1 and {STATE_VERSION})")
    out: dict[str, Any] = {
        "steps": _count(state.get("steps", 0), "steps"),
        "backwards": _count(state.get("backwards", 0), "backwards"),
        "skipped_steps": _count(state.get("skipped_steps", 0), "skipped_steps"),
        "params": {},
        "warned": [],
    }
    params = state.get("params", {})
    if not isinstance(params, Mapping):
        raise ValueError(f"`params` must be a dict, got {type(params).__name__}")
    for name, raw in params.items():
        if not isinstance(name, str):
            raise ValueError(f"parameter names must be strings, got {name!r}")
        if version == 1:
            if not isinstance(raw, (list, tuple)) or len(raw) != len(_V1_FIELDS):
                raise ValueError(f"`params[{name!r}]` must be a list of {len(_V1_FIELDS)} values, got {raw!r}")
            raw = dict(zip(_V1_FIELDS, raw))
        if not isinstance(raw, Mapping):
            raise ValueError(f"`params[{name!r}]` must be a dict, got {type(raw).__name__}")
        entry: dict[str, Any] = {}
        for counter in COUNTERS:
            if counter.name in raw:
                entry[counter.name] = _count(raw[counter.name], f"params[{name!r}].{counter.name}")
        for text in ("cause", "detail"):
            value = raw.get(text)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"`params[{name!r}].{text}` must be a string or None, got {value!r}")
            entry[text] = value
        out["params"][name] = entry
    warned = state.get("warned", [])
    if not isinstance(warned, (list, tuple)) or not all(isinstance(n, str) for n in warned):
        raise ValueError(f"`warned` must be a list of parameter names, got {warned!r}")
    out["warned"] = list(warned)
    return out


def _count(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or isinstance(value, float) and (
        not math.isfinite(value) or value != int(value)
    ):
        raise ValueError(f"`{field}` must be a non-negative integer, got {value!r}")
    if value < 0:
        raise ValueError(f"`{field}` must be a non-negative integer, got {value!r}")
    return int(value)
