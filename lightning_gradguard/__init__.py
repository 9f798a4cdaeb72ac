"""lightning_gradguard: names every parameter that received no gradient, says why, and logs gradient norms.

The names below are imported on first use, so that ``from lightning_gradguard import watch`` does not import the
Lightning Trainer, and ``gradguard report`` does not import torch at all.
"""

from __future__ import annotations

import importlib
import warnings
from typing import TYPE_CHECKING, Any

from lightning_gradguard._version import __version__

# public name -> the module that defines it
_PUBLIC = {
    "GradGuard": "lightning_gradguard.callback",
    "watch": "lightning_gradguard.plain",
    "LoopGuard": "lightning_gradguard.plain",
    "watch_fabric": "lightning_gradguard.fabric",
    "FabricGuard": "lightning_gradguard.fabric",
    "GradReport": "lightning_gradguard.report",
    "ParamReport": "lightning_gradguard.report",
    "Finding": "lightning_gradguard.report",
    "GradGuardError": "lightning_gradguard.errors",
    "GradGuardWarning": "lightning_gradguard.errors",
}
# names that moved out of the top-level namespace: still importable from here for one release, with a warning
_MOVED = {
    "GradGuardEngine": "lightning_gradguard.engine",
    "StepCheck": "lightning_gradguard.engine",
    "GuardConfig": "lightning_gradguard.config",
}

__all__ = sorted([*_PUBLIC, "__version__"])

if TYPE_CHECKING:  # pragma: no cover - what static analysers and IDEs see
    from lightning_gradguard.callback import GradGuard
    from lightning_gradguard.errors import GradGuardError, GradGuardWarning
    from lightning_gradguard.fabric import FabricGuard, watch_fabric
    from lightning_gradguard.plain import LoopGuard, watch
    from lightning_gradguard.report import Finding, GradReport, ParamReport


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        module = _MOVED.get(name)
        if module is None:
            raise AttributeError(f"module 'lightning_gradguard' has no attribute {name!r}")
        warnings.warn(
            f"`lightning_gradguard.{name}` is deprecated and will be removed in the next release; import it from "
            f"`{module}` instead",
            DeprecationWarning,
            stacklevel=2,
        )
    value = getattr(importlib.import_module(module), name)
    if name in _PUBLIC:
        globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
