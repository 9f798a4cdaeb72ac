"""The end-of-run summary on the console."""

from __future__ import annotations

from typing import Callable, Optional

from lightning_gradguard.output.sinks.base import Sink
from lightning_gradguard.report import GradReport


def print_summary(report: GradReport, write: Optional[Callable[[str], None]] = None) -> str:
    """Print the one-line verdict or the table; returns the text."""
    text = report.summary()
    (write or print)(text)
    return text


class ConsoleSink(Sink):
    """The final report on the console: the one-line verdict, or the table of problems."""

    def write_report(self, report: GradReport, step: int, title: Optional[str]) -> None:
        if title is None:
            print_summary(report)
