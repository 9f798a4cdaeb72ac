"""The guard's settings, validated once at construction so that a typo fails before training starts."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, Optional, Union

from torch import Tensor

NonfiniteCheck = Literal["auto", "every_step", "log_steps"]
LogGranularity = Literal["auto", "param", "module"]

_NONFINITE_CHECKS = ("auto", "every_step", "log_steps")
_GRANULARITIES = ("auto", "param", "module")


# above this many parameter tensors on the CPU, "auto" computes norms on logging steps only (see GuardConfig)
CPU_EVERY_STEP_MAX_TENSORS = 1000


@dataclass(frozen=True)
class GuardConfig:
    """Validated settings shared by every adapter (Trainer callback, Fabric, plain loop).

    Args:
        strict: raise :class:`~lightning_gradguard.GradGuardError` at the first step where a checked parameter
            has no gradient, before the optimizer changes any weight.
        allow_none: ``fnmatch`` patterns of parameter names that are never reported.
        log_every_n_steps: log every n optimizer steps; ``None`` follows the Trainer's cadence.
        norm_type: the p of the per-parameter p-norm: a positive float, or ``"inf"``.
        nonfinite_check: when per-parameter norms (and with them NaN/Inf counts) are computed. ``"every_step"``
            reads every gradient once per step; ``"log_steps"`` only on logging steps; ``"auto"`` (default) is
            ``"every_step"``, except for a model with more than ``CPU_EVERY_STEP_MAX_TENSORS`` (1,000) parameter
            tensors on the CPU: there the norms run synchronously on the training thread (about 1 us per tensor:
            9-12 ms a step at 10,000 tensors), so they are computed on logging steps only. On an accelerator the
            kernels run asynchronously and cost a fraction of a percent.
        log_granularity: ``"param"`` logs one norm per parameter tensor, ``"module"`` per-module aggregates at
            ``log_module_depth``; ``"auto"`` logs per parameter while everything fits in ``max_logged_series``
            (216 tensors for the default 256) and, above that, per-module norms at the deepest depth that fits
            plus the 16 largest parameter norms by name (see :mod:`lightning_gradguard.output.metrics`).
        log_module_depth: module depth for ``"module"`` granularity (1 = top-level children); ``None`` picks the
            deepest depth whose modules fit in ``max_logged_series``.
        max_logged_series: the most metrics one logging step writes under ``"auto"`` (``none_steps`` series
            are capped at an eighth of it, the most often missing parameters first).
        histogram_every_n_steps: write gradient histograms to TensorBoard every n optimizer steps; ``None`` never.
        gradient_flow_every_n_steps: draw the gradient-flow image (per-parameter mean and max gradient, missing
            gradients marked) to TensorBoard every n optimizer steps, and at the first missing gradient;
            ``None`` never. Needs matplotlib (the ``plot`` extra).

    """

    strict: bool = False
    allow_none: tuple[str, ...] = ()
    log_every_n_steps: Optional[int] = None
    norm_type: float = 2.0
    nonfinite_check: NonfiniteCheck = "auto"
    log_granularity: LogGranularity = "auto"
    log_module_depth: Optional[int] = None
    max_logged_series: int = 256
    histogram_every_n_steps: Optional[int] = None
    gradient_flow_every_n_steps: Optional[int] = None

    def measures_every_step(self, params: Sequence[Tensor]) -> bool:
        """Whether norms and NaN/Inf counts are computed at every step for a model with these parameters."""
        if self.nonfinite_check != "auto":
            return self.nonfinite_check == "every_step"
        on_cpu = all(p.device.type == "cpu" for p in params)
        return not on_cpu or len(params) <= CPU_EVERY_STEP_MAX_TENSORS

    @classmethod
    def create(
        cls,
        strict: bool = False,
        allow_none: Union[str, Iterable[str]] = (),
        log_every_n_steps: Optional[int] = None,
        norm_type: Union[float, int, str] = 2.0,
        nonfinite_check: str = "auto",
        log_granularity: str = "auto",
        log_module_depth: Optional[int] = None,
        max_logged_series: int = 256,
        histogram_every_n_steps: Optional[int] = None,
        gradient_flow_every_n_steps: Optional[int] = None,
    ) -> GuardConfig:
        """Validate raw arguments and build a config.

        Raises:
            TypeError: an argument has the wrong type.
            ValueError: an argument has a value outside the accepted range.
            ModuleNotFoundError: ``gradient_flow_every_n_steps`` is set and matplotlib is not installed.

        """
        if not isinstance(strict, bool):
            raise TypeError(f"`strict` must be True or False, got {strict!r}")
        return cls(
            strict=strict,
            allow_none=_patterns(allow_none),
            log_every_n_steps=_optional_positive_int("log_every_n_steps", log_every_n_steps),
            norm_type=_norm_type(norm_type),
            nonfinite_check=_choice("nonfinite_check", nonfinite_check, _NONFINITE_CHECKS),  # type: ignore[arg-type]
            log_granularity=_choice("log_granularity", log_granularity, _GRANULARITIES),  # type: ignore[arg-type]
            log_module_depth=_optional_positive_int("log_module_depth", log_module_depth),
            max_logged_series=_positive_int("max_logged_series", max_logged_series),
            histogram_every_n_steps=_optional_positive_int("histogram_every_n_steps", histogram_every_n_steps),
            gradient_flow_every_n_steps=_gradient_flow(gradient_flow_every_n_steps),
        )


def _gradient_flow(value: Optional[int]) -> Optional[int]:
    value = _optional_positive_int("gradient_flow_every_n_steps", value)
    if value is not None:
        from lightning_gradguard.output.sinks.tensorboard import require_matplotlib

        require_matplotlib("gradient_flow_every_n_steps")
    return value


def _patterns(value: Union[str, Iterable[str]]) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    try:
        items = tuple(value)
    except TypeError:
        raise TypeError(
            f"`allow_none` must be a string or an iterable of fnmatch pattern strings, got {value!r}"
        ) from None
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"`allow_none` accepts only fnmatch pattern strings, got {item!r} in {value!r}")
    return items


def _norm_type(value: Union[float, int, str]) -> float:
    if isinstance(value, str):
        if value.lower() in ("inf", "infinity"):
            return math.inf
        raise ValueError(f"`norm_type` must be a positive float or 'inf', got {value!r}")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # Real: numpy scalars too
        raise TypeError(f"`norm_type` must be a positive float or 'inf', got {value!r}")
    if math.isnan(value) or value <= 0:
        raise ValueError(f"`norm_type` must be a positive float or 'inf', got {value!r}")
    return float(value)


def _positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):  # Integral: numpy integers too
        raise TypeError(f"`{name}` must be a positive int, got {value!r}")
    if value <= 0:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}")
    return int(value)


def _optional_positive_int(name: str, value: Optional[int]) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be a positive int or None, got {value!r}")
    if value <= 0:
        raise ValueError(f"`{name}` must be a positive int or None, got {value!r}")
    return int(value)


def _choice(name: str, value: str, accepted: tuple[str, ...]) -> str:
    if value not in accepted:
        raise ValueError(f"`{name}` must be one of {', '.join(map(repr, accepted))}, got {value!r}")
    return value
