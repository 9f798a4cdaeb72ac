"""What a logging step writes: the metric names and values, built with one device-to-host copy per device.

Tags live under one ``gradguard/`` prefix so they sort together in any logger:

* ``gradguard/total_norm``, ``gradguard/none_params``, ``gradguard/nonfinite_params``,
  ``gradguard/intermittent_params``: one series each;
* ``gradguard/norm/<parameter>``: the gradient norm of each parameter tensor (``"param"`` granularity), or
  ``gradguard/module_norm/<module>``: the norm over each module's parameters (``"module"`` granularity);
* ``gradguard/none_steps/<parameter>``: the cumulative count of steps without a gradient, for each parameter
  that has missed one (a healthy parameter adds no series).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lightning_gradguard.engine import GradGuardEngine, StepCheck

PREFIX = "gradguard"


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


def step_metrics(engine: GradGuardEngine, checks: Sequence[StepCheck]) -> dict[str, float]:
    """Metrics for a logging step covering ``checks`` (one per optimizer that stepped)."""
    config = engine.config
    names = engine.registry.names
    metrics: dict[str, float] = {}
    missing = {i for c in checks for i in c.missing}
    metrics[f"{PREFIX}/none_params"] = float(len(missing))
    metrics[f"{PREFIX}/intermittent_params"] = float(len({i for c in checks for i in c.intermittent}))

    # one host copy per device for every norm of every check
    by_device: dict[torch.device, list] = defaultdict(list)
    for check in checks:
        for indices, group in check.norms:
            by_device[group.norms.device].append((indices, group.norms))
    norms: dict[int, float] = {}
    for parts in by_device.values():
        values = torch.cat([n for _, n in parts]).tolist()
        flat = [i for indices, _ in parts for i in indices]
        norms.update(zip(flat, values))

    if norms:
        p = config.norm_type
        finite = [v for v in norms.values() if math.isfinite(v)]
        metrics[f"{PREFIX}/nonfinite_params"] = float(len(norms) - len(finite))
        if math.isinf(p):
            total = max(norms.values())
        else:
            total = math.fsum(v**p for v in norms.values()) ** (1.0 / p)
        metrics[f"{PREFIX}/total_norm"] = total
        granularity = config.log_granularity
        if granularity == "auto":
            granularity = "param" if len(engine.registry) <= config.max_logged_series else "module"
        if granularity == "param":
            for i, value in norms.items():
                metrics[f"{PREFIX}/norm/{names[i]}"] = value
        else:
            depth = config.log_module_depth or _cached_depth(engine)
            grouped: dict[str, list[float]] = defaultdict(list)
            for i, value in norms.items():
                grouped[module_key(names[i], depth)].append(value)
            for module, values in grouped.items():
                if math.isinf(p):
                    metrics[f"{PREFIX}/module_norm/{module}"] = max(values)
                else:
                    metrics[f"{PREFIX}/module_norm/{module}"] = math.fsum(v**p for v in values) ** (1.0 / p)

    none_steps = engine._counts["none_steps"]
    for i in none_steps.nonzero().flatten().tolist():
        if not engine.registry.allowed[i]:
            metrics[f"{PREFIX}/none_steps/{names[i]}"] = float(none_steps[i])
    return metrics


def _cached_depth(engine: GradGuardEngine) -> int:
    key = (len(engine.registry), engine.config.max_logged_series)
    cache = engine.__dict__.setdefault("_depth_cache", {})
    if key not in cache:
        cache[key] = auto_depth(engine.registry.names, engine.config.max_logged_series)
    return cache[key]
