"""The end-of-run summary on the console: the one-line verdict, or a bounded table that says where the full one is.

A model with thousands of parameters without a gradient would print thousands of lines; the console gets at most
:data:`CONSOLE_MAX_ROWS` entries of each list (explanations, table rows, findings, rank-dependent parameters), each cut
list ending in "... and N more", and a last line naming where the full table is: ``gradguard.json`` in the log
directory, which ``gradguard report`` prints in full.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

from lightning_gradguard.output.sinks.base import RunInfo, Sink
from lightning_gradguard.report import GradReport

CONSOLE_MAX_ROWS = 8  # entries per list: about 25 lines for a typical big model, 45 at most with every list cut


def print_summary(
    report: GradReport,
    write: Optional[Callable[[str], None]] = None,
    report_path: Optional[str] = None,
    max_rows: Optional[int] = CONSOLE_MAX_ROWS,
) -> str:
    """Print the one-line verdict or the (bounded) table; returns the text.

    Args:
        report: the run's report.
        write: where the text goes (default: ``print``).
        report_path: the ``gradguard.json`` the report was (or will be) written to, named when the table is cut.
        max_rows: the most entries of each list (see :meth:`GradReport.summary`); ``None`` prints everything.

    Example::

        print_summary(guard.report(), report_path="lightning_logs/version_0/gradguard.json")

    """
    text = report.summary(max_rows=max_rows)
    if max_rows is not None and text != report.summary():
        text += "\n" + _where_the_full_table_is(report_path)
    (write or print)(text)
    return text


def _where_the_full_table_is(report_path: Optional[str]) -> str:
    if report_path:
        directory = os.path.dirname(report_path) or "."
        return f"The full table: {report_path} (`gradguard report {directory}` prints it)"
    # no report file is written (no logger, no log_dir or writer)
    return "The full table: guard.report().format_table()"


class ConsoleSink(Sink):
    """The final report on the console: the one-line verdict, or the (bounded) table of problems.

    Args:
        report_path: where the report file goes (named when the console table is cut), if anywhere.

    """

    def __init__(self, report_path: Optional[Callable[[], Optional[str]]] = None) -> None:
        self._report_path = report_path
        self._name = ""  # a named guard's name: several guards' summaries in one console say whose each is

    def start(self, run: RunInfo) -> None:
        self._name = run.prefix.partition("/")[2]

    def write_report(self, report: GradReport, step: int, title: Optional[str]) -> None:
        if title is None:
            name = self._name
            write = (lambda text: print(text.replace("GradGuard", f"GradGuard [{name}]", 1))) if name else None
            print_summary(report, write, self._report_path() if self._report_path is not None else None)
