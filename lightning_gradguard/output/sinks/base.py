"""What a sink is: one destination for what the guard found. A new destination (MLflow, a CSV file, W&B) is one
class with the methods it needs; the :class:`~lightning_gradguard.output.reporter.Reporter` decides when each is
called, so a sink never decides cadence, never reads a gradient and never talks to other ranks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

if TYPE_CHECKING:
    from lightning_gradguard.core.measure import StatsRequest
    from lightning_gradguard.core.observer import StepCheck
    from lightning_gradguard.report import GradReport


@dataclass
class RunInfo:
    """What every sink may know about the run it writes for.

    Attributes:
        names: every parameter's name by registry index (the engine's live list: it grows with the registry).
        shown: the names the guard reports on (``allow_none`` left out), in registry order.
        prefix: the tag prefix: ``"gradguard"``, or ``"gradguard/<name>"`` for a named guard.
        report_file: ``"gradguard.json"``, or ``"gradguard-<name>.json"`` for a named guard.
        amp: a loss scaler is in use (its skipped steps are logged).
        report: the report as it stands (built on demand: call rarely).

    """

    names: Sequence[str]
    shown: list[str]
    prefix: str
    report_file: str
    amp: bool
    report: Callable[[], GradReport]


class Sink:
    """Base class of the guard's destinations; every method is optional.

    Example::

        class PrintSink(Sink):
            def write_metrics(self, metrics, step):
                print(step, metrics["gradguard/total_norm"])

    """

    def start(self, run: RunInfo) -> None:
        """Training starts; ``run`` stays valid until :meth:`close`."""

    def request(self, check: StepCheck, step: int) -> Optional[StatsRequest]:
        """What this sink wants measured at this step beyond the norms (asked with the classified check)."""
        return None

    def write_step(self, check: StepCheck, step: int) -> None:
        """A step was checked (``check.stats`` holds what :meth:`request` asked for)."""

    def write_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """A logging step's scalars, on the host."""

    def write_report(self, report: GradReport, step: int, title: Optional[str]) -> None:
        """A report: ``title`` names an intermediate one (strict mode stopped training); None is the final one."""

    def close(self) -> None:
        """Training ended: flush, release what the sink opened."""
