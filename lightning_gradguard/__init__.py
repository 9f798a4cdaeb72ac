"""lightning_gradguard: names every parameter that received no gradient, says why, and logs gradient norms.

The names below are imported on first use, so that ``from lightning_gradguard import watch`` does not import the
Lightning Trainer, and ``gradguard report`` does not import torch at all.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from typing import TYPE_CHECKING, Any

from lightning_gradguard._version import __version__

# public name -> the module that defines it
_PUBLIC = {
    "GradGuard": "lightning_gradguard.adapters.lightning",
    "watch": "lightning_gradguard.adapters.loop",
    "LoopGuard": "lightning_gradguard.adapters.loop",
    "watch_fabric": "lightning_gradguard.adapters.fabric",
    "FabricGuard": "lightning_gradguard.adapters.fabric",
    "GradReport": "lightning_gradguard.report",
    "ParamReport": "lightning_gradguard.report",
    "Finding": "lightning_gradguard.report",
    "GradGuardError": "lightning_gradguard.errors",
    "GradGuardWarning": "lightning_gradguard.errors",
    "check_gradients": "lightning_gradguard.preflight",
    "assert_gradients_flow": "lightning_gradguard.preflight",
}
# names that moved out of the top-level namespace: still importable from here for one release, with a warning
_MOVED = {
    "GradGuardEngine": "lightning_gradguard.core.engine",
    "StepCheck": "lightning_gradguard.core.engine",
    "GuardConfig": "lightning_gradguard.config",
}
# modules that moved in the reorganisation into core/, training/, output/ and adapters/: the old paths still import,
# with a warning, for one release
_MOVED_MODULES = {
    "lightning_gradguard.callback": "lightning_gradguard.adapters.lightning",
    "lightning_gradguard.plain": "lightning_gradguard.adapters.loop",
    "lightning_gradguard.fabric": "lightning_gradguard.adapters.fabric",
    "lightning_gradguard.engine": "lightning_gradguard.core.engine",
}

__all__ = [
    "FabricGuard",
    "Finding",
    "GradGuard",
    "GradGuardError",
    "GradGuardWarning",
    "GradReport",
    "LoopGuard",
    "ParamReport",
    "__version__",
    "assert_gradients_flow",
    "check_gradients",
    "watch",
    "watch_fabric",
]

if TYPE_CHECKING:  # pragma: no cover - what static analysers and IDEs see
    from lightning_gradguard.adapters.fabric import FabricGuard, watch_fabric
    from lightning_gradguard.adapters.lightning import GradGuard
    from lightning_gradguard.adapters.loop import LoopGuard, watch
    from lightning_gradguard.errors import GradGuardError, GradGuardWarning
    from lightning_gradguard.preflight import assert_gradients_flow, check_gradients
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


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old module path as the module that replaced it (``sys.modules`` then holds both names)."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in _MOVED_MODULES:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: Any) -> Any:
        new = _MOVED_MODULES[spec.name]
        warnings.warn(
            f"`{spec.name}` is deprecated and will be removed in the next release; import from `{new}` (or the "
            "top-level `lightning_gradguard`) instead",
            DeprecationWarning,
            stacklevel=2,
        )
        return importlib.import_module(new)

    def exec_module(self, module: Any) -> None:
        pass  # the replacement module is already executed


if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModuleFinder())
