"""The end-of-run summary on the console."""

from __future__ import annotations

from typing import Callable, Optional

from lightning_gradguard.report import GradReport


def print_summary(report: GradReport, write: Optional[Callable[[str], None]] = None) -> str:
    """Print the one-line verdict or the table; returns the text."""
    text = report.summary()
    (write or print)(text)
    return text
