"""lightning_gradguard: names every parameter that received no gradient, says why, and logs gradient norms."""

from lightning_gradguard.callback import GradGuard
from lightning_gradguard.config import GuardConfig
from lightning_gradguard.engine import GradGuardEngine, StepCheck
from lightning_gradguard.errors import GradGuardError, GradGuardWarning
from lightning_gradguard.fabric import FabricGuard, watch_fabric
from lightning_gradguard.plain import LoopGuard, watch
from lightning_gradguard.report import Finding, GradReport, ParamReport

__version__ = "0.1.0"

__all__ = [
    "FabricGuard",
    "Finding",
    "GradGuard",
    "GradGuardEngine",
    "GradGuardError",
    "GradGuardWarning",
    "GradReport",
    "GuardConfig",
    "LoopGuard",
    "ParamReport",
    "StepCheck",
    "__version__",
    "watch",
    "watch_fabric",
]
