"""The exception strict mode raises, and the warning category of everything else GradGuard says."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from lightning_gradguard.report import GradReport


class GradGuardError(RuntimeError):
    """Raised in strict mode at the first optimizer step where a checked parameter has no gradient.

    It is raised before the optimizer changes any weight. At the end of a run (the end of fit, ``close()``) it is
    also raised for parameters that received gradients but never moved (a param group at ``lr=0``, an optimizer
    step that skips them); ``step`` is then the last step of the run.

    Attributes:
        params: names of every parameter that had no gradient at that step.
        step: the global step (the optimizer step about to run, counted from 0).
        report: the :class:`~lightning_gradguard.report.GradReport` as it stood when the error was raised.

    """

    def __init__(
        self, message: str, params: list[str], step: int, report: Optional[GradReport] = None
    ) -> None:
        super().__init__(message)
        self.params = list(params)
        self.step = step
        self.report = report

    def __reduce__(self):  # picklable (multiprocessing, Ray, spawn launchers) with all its attributes
        return (type(self), (str(self), self.params, self.step, self.report))


class GradGuardWarning(UserWarning):
    """The category of GradGuard's warnings (a missing gradient outside strict mode, a finding, an internal error).

    Example::

        import warnings
        warnings.filterwarnings("error", category=GradGuardWarning)  # or "ignore"

    """
