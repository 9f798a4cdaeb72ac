"""lightning_gradguard: names every parameter that received no gradient, says why, and logs gradient norms."""

from lightning_gradguard.callback import GradGuard
from lightning_gradguard.config import GuardConfig
from lightning_gradguard.engine import GradGuardEngine, StepCheck
from lightning_gradguard.errors import GradGuardError
from lightning_gradguard.report import Finding, GradReport, ParamReport

__version__ = "0.1.0"

__all__ = [
    "Finding",
    "GradGuard",
    "GradGuardEngine",
    "GradGuardError",
    "GradReport",
    "GuardConfig",
    "ParamReport",
    "StepCheck",
    "__version__",
]
