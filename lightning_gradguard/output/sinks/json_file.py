"""``gradguard.json``: the report next to the logger's files, for the ``gradguard report`` command and CI."""

from __future__ import annotations

import os
import warnings
from typing import Optional

from lightning_gradguard.errors import GradGuardWarning
from lightning_gradguard.output.sinks.base import RunInfo, Sink
from lightning_gradguard.report import REPORT_FILENAME, GradReport


def write_report(report: GradReport, directory: Optional[str]) -> Optional[str]:
    """Write ``directory/gradguard.json``; returns its path, or None when there is no directory."""
    if not directory:
        return None
    os.makedirs(directory, exist_ok=True)
    return report.save(os.path.join(directory, REPORT_FILENAME))


class JsonSink(Sink):
    """The final report as ``gradguard.json`` (``gradguard-<name>.json`` for a named guard) in ``directory``.

    A file that cannot be written (a read-only directory, a full disk) is said in a warning that names the path
    and the reason; training is over by then and its results stand.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.path: Optional[str] = None
        self._filename = REPORT_FILENAME

    def start(self, run: RunInfo) -> None:
        self._filename = run.report_file

    def write_report(self, report: GradReport, step: int, title: Optional[str]) -> None:
        if title is not None:
            return
        target = os.path.join(self.directory, self._filename)
        try:
            os.makedirs(self.directory, exist_ok=True)
            self.path = report.save(target)
        except OSError as err:
            warnings.warn(
                f"GradGuard could not write its report to {target}: {err.strerror or err}. The report above is "
                "complete; fix the directory (permissions, free space) to get the file next time.",
                GradGuardWarning,
                stacklevel=2,
            )
