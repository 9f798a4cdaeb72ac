"""The guard's options, declared once, and validated at construction so that a typo fails before training starts.

Every adapter (``GradGuard``, ``watch``, ``watch_fabric``) takes these options; :class:`GuardConfig` is their one
declaration: a field each, with its type, default, meaning and validator. ``GradGuard.__init__`` spells them out
as an explicit signature (LightningCLI and IDEs read it), and a test keeps the two identical.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Callable, Literal, Optional, Union

if TYPE_CHECKING:
    from torch import Tensor

# the types the adapters' signatures declare (jsonargparse validates a LightningCLI config against them)
NonfiniteCheck = Literal["auto", "every_step", "log_steps"]
LogGranularity = Literal["auto", "param", "module"]
AllowNone = Union[str, Iterable[str]]
NormType = Union[float, Literal["inf"]]

# above this many parameter tensors on the CPU, "auto" computes norms on logging steps only (see GuardConfig)
CPU_EVERY_STEP_MAX_TENSORS = 1000
_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,100}")  # fullmatch: `$` would let a trailing newline through


def _option(default: Any, validate: Callable[[str, Any], Any], doc: str) -> Any:
    return field(default=default, metadata={"validate": validate, "doc": doc})


# ---------------------------------------------------------------------------------------------- validators
def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be True or False, got {value!r}")
    return value


def _patterns(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    try:
        items = tuple(value)
    except TypeError:
        raise TypeError(f"`{name}` must be a string or an iterable of fnmatch pattern strings, got {value!r}") from None
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"`{name}` accepts only fnmatch pattern strings, got {item!r} in {value!r}")
    return items


def _norm_type(name: str, value: Any) -> float:
    if isinstance(value, str):
        if value.lower() in ("inf", "infinity"):
            return math.inf
        raise ValueError(f"`{name}` must be a positive float or 'inf', got {value!r}")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # Real: numpy scalars too
        raise TypeError(f"`{name}` must be a positive float or 'inf', got {value!r}")
    if math.isnan(value) or value <= 0:
        raise ValueError(f"`{name}` must be a positive float or 'inf', got {value!r}")
    return float(value)


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):  # Integral: numpy integers too
        raise TypeError(f"`{name}` must be a positive int, got {value!r}")
    if value <= 0:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}")
    return int(value)


def _optional_positive_int(name: str, value: Any) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be a positive int or None, got {value!r}")
    if value <= 0:
        raise ValueError(f"`{name}` must be a positive int or None, got {value!r}")
    return int(value)


def _choice(*accepted: str) -> Callable[[str, Any], str]:
    def check(name: str, value: Any) -> str:
        if not isinstance(value, str) or value not in accepted:
            raise ValueError(f"`{name}` must be one of {', '.join(map(repr, accepted))}, got {value!r}")
        return value

    return check


def _gradient_flow(name: str, value: Any) -> Optional[int]:
    value = _optional_positive_int(name, value)
    if value is not None:
        from lightning_gradguard.output.sinks.pictures import require_matplotlib

        require_matplotlib(name)
    return value


def _name(name: str, value: Any) -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"`{name}` must be a string or None, got {value!r}")
    if not _NAME.fullmatch(value) or not value.strip("."):  # "." and ".." would read as directories in a tag
        raise ValueError(
            f"`{name}` must be 1 to 100 letters, digits, '_', '-' or '.', not only dots (it becomes part of metric "
            f"tags and a file name), got {value!r}"
        )
    return value


# ---------------------------------------------------------------------------------------------- the declaration
@dataclass(frozen=True)
class GuardConfig:
    """The options of every GradGuard adapter, validated (see :meth:`create`).

    Args:
        strict: raise :class:`~lightning_gradguard.GradGuardError` at the first step where a checked parameter has
            no gradient, before the optimizer changes any weight, and at the end of the run for parameters that
            received gradients but never moved. Otherwise warn once per parameter.
        allow_none: ``fnmatch`` patterns of parameter names that are never checked, reported, warned about or
            logged (optional heads, mixture-of-experts experts).
        log_every_n_steps: logging cadence in optimizer steps; ``None`` follows the Trainer's
            ``log_every_n_steps`` (plain loops and Fabric: 50).
        norm_type: the p of the per-parameter gradient p-norm: a positive float, or ``"inf"``.
        nonfinite_check: when gradient values are read to count NaN/Inf (and all-zero gradients):
            ``"every_step"``, ``"log_steps"``, or ``"auto"``: every step, except on the CPU for models with more
            than ``CPU_EVERY_STEP_MAX_TENSORS`` (1,000) parameter tensors, where each tensor costs a synchronous
            dispatch (logging steps only there).
        log_granularity: ``"param"`` logs one norm per parameter tensor, ``"module"`` per-module aggregates at
            ``log_module_depth``; ``"auto"`` logs per parameter while everything fits in ``max_logged_series``
            and per module above that (see :mod:`lightning_gradguard.output.metrics`).
        log_module_depth: module depth of the per-module norms (1 = top-level children); ``None`` picks the
            deepest depth that fits ``max_logged_series``.
        max_logged_series: the most metrics one logging step writes under ``"auto"``.
        histogram_every_n_steps: gradient histograms in TensorBoard every n optimizer steps; ``None`` never.
        gradient_flow_every_n_steps: the gradient-flow image in TensorBoard every n optimizer steps and at the
            first missing gradient; ``None`` never. Needs matplotlib (the ``plot`` extra).
        summary: print the report at the end of training (global rank zero).
        name: a name for this guard, when several guards share a logger or log directory: its metrics go under
            ``gradguard/<name>/`` and its report to ``gradguard-<name>.json``.

    Example::

        config = GuardConfig.create(strict=True, allow_none="heads.optional.*")

    """

    strict: bool = _option(False, _bool, "raise GradGuardError at the first missing gradient")
    allow_none: tuple[str, ...] = _option((), _patterns, "fnmatch patterns of parameters never reported")
    log_every_n_steps: Optional[int] = _option(None, _optional_positive_int, "logging cadence in optimizer steps")
    norm_type: float = _option(2.0, _norm_type, "the p of the per-parameter p-norm, or 'inf'")
    nonfinite_check: NonfiniteCheck = _option("auto", _choice("auto", "every_step", "log_steps"),
                                              "when gradient values are read for NaN/Inf counts")
    log_granularity: LogGranularity = _option("auto", _choice("auto", "param", "module"),
                                              "one norm series per parameter or per module")
    log_module_depth: Optional[int] = _option(None, _optional_positive_int, "module depth of per-module norms")
    max_logged_series: int = _option(256, _positive_int, "the most norm series one logging step writes")
    histogram_every_n_steps: Optional[int] = _option(None, _optional_positive_int, "gradient histograms cadence")
    gradient_flow_every_n_steps: Optional[int] = _option(None, _gradient_flow, "gradient-flow image cadence")
    summary: bool = _option(True, _bool, "print the report at the end of training")
    name: Optional[str] = _option(None, _name, "prefix of this guard's tags and report file")

    @classmethod
    def create(cls, **options: Any) -> GuardConfig:
        """Validate raw options and build a config; an option not given keeps its default.

        Raises:
            TypeError: an option has the wrong type, or is not an option at all.
            ValueError: an option has a value outside the accepted range.
            ModuleNotFoundError: ``gradient_flow_every_n_steps`` is set and matplotlib is not installed.

        """
        known = {f.name: f for f in fields(cls)}
        unknown = [key for key in options if key not in known]
        if unknown:
            raise TypeError(
                f"unknown GradGuard option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; the "
                f"options are: {', '.join(known)}"
            )
        values = {key: known[key].metadata["validate"](key, value) for key, value in options.items()}
        return cls(**values)

    def measures_every_step(self, params: Sequence[Tensor]) -> bool:
        """Whether norms and NaN/Inf counts are computed at every step for a model with these parameters."""
        if self.nonfinite_check != "auto":
            return self.nonfinite_check == "every_step"
        on_cpu = all(p.device.type == "cpu" for p in params)
        return not on_cpu or len(params) <= CPU_EVERY_STEP_MAX_TENSORS


OPTIONS = tuple(f.name for f in fields(GuardConfig))
