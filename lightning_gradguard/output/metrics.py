"""What a logging step writes: the metric names and values, built from one device-to-host copy per device.

Tags live under one ``gradguard/`` prefix so they sort together in any logger:

* ``gradguard/total_norm``, ``gradguard/none_params``, ``gradguard/nonfinite_params``,
  ``gradguard/intermittent_params``, ``gradguard/zero_params`` (parameters whose gradient at this step is zero
  everywhere): one series each;
* ``gradguard/norm/<parameter>``: the gradient norm of a parameter tensor;
* ``gradguard/module_norm/<module>``: the norm over a module's parameters (the norm of their norms);
* ``gradguard/none_steps/<parameter>``: the cumulative count of steps without a gradient, for each parameter
  that has missed one (a healthy parameter adds no series).

How many series a step writes (``GuardConfig.log_granularity``):

* ``"param"``: a norm for every parameter tensor, and a ``none_steps`` series for every parameter that missed one;
* ``"module"``: per-module norms at ``log_module_depth`` (or the deepest depth that fits the budget), and the
  capped ``none_steps`` of ``"auto"``;
* ``"auto"`` (default): ``none_steps`` for at most ``max_logged_series // 8`` parameters (the most often missing),
  and ``"param"`` while the model has at most ``max_logged_series - RESERVED_SERIES - max_logged_series // 8``
  tensors (216 for the default 256). Above that, TensorBoard stays readable: per-module norms at the deepest
  depth that fits, plus the ``TOP_K`` parameters with the largest norm at this step (a non-finite norm counts as
  the largest). Either way a step writes at most ``max_logged_series`` metrics in all.

The copy never blocks the training loop on an accelerator: :func:`stage_metrics` starts a non-blocking copy into
pinned host memory and records a CUDA event; :meth:`StagedMetrics.ready` polls it, and the metrics are built once
the values have arrived (a step or so later), so the GPU never waits for logging.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import Tensor

if TYPE_CHECKING:
    from lightning_gradguard.core.engine import GradGuardEngine, StepCheck

PREFIX = "gradguard"
RESERVED_SERIES = 8  # the one-series scalars (total_norm, none_params, ..., an adapter's AMP count)
TOP_K = 16  # largest-norm parameters logged by name next to module aggregates (``"auto"`` on big models)
_CACHE_SIZE = 8


def module_key(name: str, depth: int) -> str:
    """The first ``depth`` components of a parameter's module path (its own name for a root parameter)."""
    parts = name.split(".")
    module = parts[:-1] or parts
    return ".".join(module[:depth])


def auto_depth(names: Sequence[str], max_series: int) -> int:
    """The deepest module depth at which the number of distinct modules stays within ``max_series``."""
    best = 1
    max_depth = max((len(n.split(".")) - 1 for n in names), default=1)
    for depth in range(1, max(max_depth, 1) + 1):
        if len({module_key(n, depth) for n in names}) <= max_series:
            best = depth
        else:
            break
    return best


class LogLayout:
    """Which series a logging step writes for one model: decided once per registry size, then cached.

    Args:
        names: parameter names by registry index.
        granularity: ``"auto"``, ``"param"`` or ``"module"``.
        max_series: the budget of ``"auto"`` (see the module docstring).
        depth: the module depth for aggregates; ``None`` picks the deepest that fits.

    """

    def __init__(self, names: Sequence[str], granularity: str, max_series: int, depth: Optional[int]) -> None:
        self.size = len(names)
        none_cap = max(max_series // 8, 1)
        auto = granularity == "auto"
        if auto:  # every tensor's norm, the capped none_steps and the scalars must fit in the budget
            granularity = "param" if len(names) <= max_series - RESERVED_SERIES - none_cap else "module"
        self.per_param = granularity == "param"
        self.none_cap: Optional[int] = none_cap if auto or not self.per_param else None  # "param" asked: all
        self.top_k = min(TOP_K, max(max_series // 16, 1)) if auto and not self.per_param else 0
        self.modules: list[str] = []
        self.module_ids: list[int] = []  # registry index -> position in `modules`
        if not self.per_param:
            room = max(max_series - RESERVED_SERIES - (self.none_cap or 0) - self.top_k, 1)
            depth = depth or auto_depth(names, room)
            position: dict[str, int] = {}
            for name in names:
                key = module_key(name, depth)
                if key not in position:
                    position[key] = len(self.modules)
                    self.modules.append(key)
                self.module_ids.append(position[key])
        self._ids_cache: dict[tuple[int, ...], Tensor] = {}

    def ids_for(self, indices: Sequence[int]) -> Tensor:
        """Module positions of ``indices`` as an index tensor (cached: the same order comes back every step)."""
        key = tuple(indices)
        ids = self._ids_cache.get(key)
        if ids is None:
            if len(self._ids_cache) >= _CACHE_SIZE:
                self._ids_cache.clear()
            ids = self._ids_cache[key] = torch.tensor([self.module_ids[i] for i in key], dtype=torch.int64)
        return ids


def layout_for(engine: GradGuardEngine) -> LogLayout:
    """A :class:`LogLayout` for the engine's parameters and settings (callers keep it while the registry's size
    stays the same: see :class:`~lightning_gradguard.output.reporter.Reporter`)."""
    config = engine.config
    return LogLayout(engine.registry.names, config.log_granularity, config.max_logged_series, config.log_module_depth)


class StagedMetrics:
    """A logging step's values on their way to the host; :meth:`result` turns them into metrics.

    Everything host-side (missing counts, cumulative None counts) is read when staged; device values are copied
    without blocking (CUDA: pinned memory and an event; the CPU: no copy at all).
    """

    def __init__(
        self,
        engine: GradGuardEngine,
        checks: Sequence[StepCheck],
        scalars: Optional[Mapping[str, Tensor]] = None,
        *,
        prefix: str = PREFIX,
        layout: Optional[LogLayout] = None,
        labels: Optional[Sequence[str]] = None,
    ) -> None:
        self._names = engine.registry.names
        self._norm_type = engine.config.norm_type
        self._layout = layout or layout_for(engine)
        self._prefix = prefix
        self._fixed: dict[str, float] = {
            f"{prefix}/none_params": float(len({i for c in checks for i in c.missing})),
            f"{prefix}/intermittent_params": float(len({i for c in checks for i in c.intermittent})),
        }
        # several optimizers at this logging step: each one's own total norm too, by label
        self._owners: list[tuple[str, set[int]]] = []
        if labels is not None and len(checks) > 1:
            self._owners = [(label, set(c.checked)) for label, c in zip(labels, checks)]
        none_steps = engine.state.values("none_steps")
        allowed = engine.registry.allowed
        missed = [i for i in none_steps.nonzero().flatten().tolist() if not allowed[i]]
        self._none_steps = list(zip(missed, none_steps[missed].tolist())) if missed else []

        by_device: dict[torch.device, list[tuple[list[Any], Tensor]]] = defaultdict(list)
        for check in checks:
            for indices, group in check.norms:
                by_device[group.norms.device].append((indices, group.norms))
        for tag, value in (scalars or {}).items():
            by_device[value.device].append(([tag], value.detach().reshape(1).to(torch.float32)))
        # (keys, values on the host or on their way there, event to wait for)
        self._parts: list[tuple[list[Any], Tensor, Any]] = []
        for parts in by_device.values():
            keys = [key for indices, _ in parts for key in indices]
            values = torch.cat([norms for _, norms in parts]) if len(parts) > 1 else parts[0][1]
            self._parts.append((keys, *_to_host(values)))

    def ready(self) -> bool:
        """Whether every copy has arrived (never blocks)."""
        return all(event is None or event.query() for _, _, event in self._parts)

    def result(self) -> dict[str, float]:
        """The metrics (waits for copies still in flight)."""
        metrics = dict(self._fixed)
        keys: list[int] = []
        chunks: list[Tensor] = []
        for part_keys, host, event in self._parts:
            if event is not None and not event.query():  # query first: a finished copy costs no wait at all
                event.synchronize()
            tags = [j for j, key in enumerate(part_keys) if isinstance(key, str)]  # adapters' scalars
            if tags:
                for j, value in zip(tags, host[tags].tolist()):
                    metrics[part_keys[j]] = value
                tagged = set(tags)
                norm_positions = [j for j in range(len(part_keys)) if j not in tagged]
                part_keys, host = [part_keys[j] for j in norm_positions], host[norm_positions]
            keys.extend(part_keys)
            chunks.append(host)
        if keys:
            values = torch.cat(chunks) if len(chunks) > 1 else chunks[0]
            metrics.update(self._norm_metrics(keys, values.to(torch.float64)))
        metrics.update(self._none_metrics())
        return metrics

    def _norm_metrics(self, keys: list[int], values: Tensor) -> dict[str, float]:
        p, layout, names = self._norm_type, self._layout, self._names
        out: dict[str, float] = {
            f"{self._prefix}/nonfinite_params": float((~torch.isfinite(values)).sum()),
            f"{self._prefix}/zero_params": float((values == 0).sum()),
        }
        out[f"{self._prefix}/total_norm"] = _p_norm(values, p)
        if self._owners:
            for label, members in self._owners:
                mask = torch.tensor([key in members for key in keys], dtype=torch.bool)
                if mask.any():
                    out[f"{self._prefix}/total_norm/{label}"] = _p_norm(values[mask], p)
        if layout.per_param:
            out.update({f"{self._prefix}/norm/{names[i]}": v for i, v in zip(keys, values.tolist())})
            return out
        ids = layout.ids_for(keys)
        count = len(layout.modules)
        if math.isinf(p):
            modules = values.abs().new_zeros(count).scatter_reduce_(0, ids, values.abs(), "amax")
        else:
            powered = values.abs().pow(p)
            modules = values.new_zeros(count).index_add_(0, ids, powered).pow_(1.0 / p)
        present = torch.zeros(count, dtype=torch.bool).index_fill_(0, ids, True)
        for position in present.nonzero().flatten().tolist():
            out[f"{self._prefix}/module_norm/{layout.modules[position]}"] = float(modules[position])
        if layout.top_k:
            # topk ranks NaN above everything, and inf above every number: a non-finite gradient is always named
            top = torch.topk(values, min(layout.top_k, len(keys))).indices.tolist()
            for position in top:
                out[f"{self._prefix}/norm/{names[keys[position]]}"] = float(values[position])
        return out

    def _none_metrics(self) -> dict[str, float]:
        entries = self._none_steps
        cap = self._layout.none_cap
        if cap is not None and len(entries) > cap:  # the most often missing first, then in model order
            entries = sorted(entries, key=lambda e: (-e[1], e[0]))[:cap]
        return {f"{self._prefix}/none_steps/{self._names[i]}": float(count) for i, count in entries}


def stage_metrics(
    engine: GradGuardEngine, checks: Sequence[StepCheck], scalars: Optional[Mapping[str, Tensor]] = None
) -> StagedMetrics:
    """Start moving a logging step's values to the host without waiting for the device.

    Args:
        engine: the engine whose checks these are.
        checks: one per optimizer that stepped at this logging step.
        scalars: further metrics held as 0-dim tensors on a device (the AMP skipped-step count); they travel to
            the host in the same copy as the norms.

    Example::

        staged = stage_metrics(engine, [check])    # right after the step: launches the copy, returns at once
        ...                                        # the next step runs
        if staged.ready():
            logger.log_metrics(staged.result(), step=step)

    """
    return StagedMetrics(engine, checks, scalars)


def step_metrics(
    engine: GradGuardEngine, checks: Sequence[StepCheck], scalars: Optional[Mapping[str, Tensor]] = None
) -> dict[str, float]:
    """Metrics for a logging step covering ``checks`` (one per optimizer that stepped), right away.

    ``scalars``: further metrics held as 0-dim tensors on a device (the AMP skipped-step count); they travel to the
    host in the same copy as the norms. Waits for the device; :func:`stage_metrics` does not.
    """
    return StagedMetrics(engine, checks, scalars).result()


def _to_host(values: Tensor) -> tuple[Tensor, Any]:
    device = values.device
    if device.type == "cpu":
        return values, None
    if device.type == "cuda":
        # pinned destination (non_blocking to the CPU pins it): the copy is queued behind the norm kernels and
        # the event says when it has landed; nothing here waits for the GPU
        host = values.to("cpu", non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        return host, event
    return values.cpu(), None  # other accelerators: one synchronous copy


def _p_norm(values: Tensor, p: float) -> float:
    if values.numel() == 0:
        return 0.0
    if math.isinf(p):
        return float(values.abs().max())  # torch's max propagates NaN (Python's max would not)
    return float(torch.linalg.vector_norm(values, p))
