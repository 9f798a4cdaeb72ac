"""``gradguard.json``: the report next to the logger's files, for the ``gradguard report`` command and CI.

The file is written atomically (:meth:`GradReport.save`). A problem of the environment (a read-only or full disk, a
path that is a file) is not a failure of the run: it becomes one :class:`~lightning_gradguard.GradGuardWarning`
that says what went wrong and where, and training ends normally.
"""

from __future__ import annotations

import errno
import os
import warnings
from typing import Optional

from lightning_gradguard.errors import GradGuardWarning
from lightning_gradguard.files import write_atomically
from lightning_gradguard.output.sinks.base import RunInfo, Sink
from lightning_gradguard.report import REPORT_FILENAME, GradReport

# what an OSError means for the user, by errno; the rest are described by the system's own message
_MEANING = {
    getattr(errno, code): meaning
    for code, meaning in (
        ("EACCES", "no permission to write there"),
        ("EPERM", "no permission to write there"),
        ("EROFS", "the file system is read-only"),
        ("ENOSPC", "the disk is full"),
        ("EDQUOT", "the disk quota is exceeded"),
        ("ENOTDIR", "a part of the path is a file, not a directory"),
        ("EEXIST", "a part of the path is a file, not a directory"),
        ("EISDIR", "the path is a directory"),
    )
    if hasattr(errno, code)
}


def write_report(report: GradReport, directory: Optional[str], filename: str = REPORT_FILENAME) -> Optional[str]:
    """Write ``directory/filename`` atomically; returns its path, or None when there is no directory or it failed
    (then one :class:`~lightning_gradguard.GradGuardWarning` says why and where).

    Example::

        path = write_report(guard.report(), trainer.log_dir)

    """
    if not directory:
        return None
    path = os.path.join(directory, filename)
    try:
        write_atomically(path, report.to_json())  # a link at `path` is replaced, never followed
        return path
    except OSError as err:
        warnings.warn(_could_not_write(path, err), GradGuardWarning, stacklevel=2)
        return None


def _could_not_write(path: str, err: OSError) -> str:
    meaning = _MEANING.get(err.errno or 0, err.strerror or str(err))
    where = err.filename if err.filename and os.fspath(err.filename) != path else None
    return (
        f"GradGuard: could not write the report to {path}: {meaning}"
        + (f" ({where})" if where else "")
        + f" [{type(err).__name__}: {err.strerror or err}]. Training is not affected and the report is still "
        "available as guard.report(); point the logger (or log_dir) at a writable directory to get the file."
    )


class JsonSink(Sink):
    """The final report as ``gradguard.json`` (``gradguard-<name>.json`` for a named guard) in ``directory``."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.filename = REPORT_FILENAME
        self.path: Optional[str] = None  # once written

    @property
    def target(self) -> str:
        return os.path.join(self.directory, self.filename)

    def start(self, run: RunInfo) -> None:
        self.filename = run.report_file

    def write_report(self, report: GradReport, step: int, title: Optional[str]) -> None:
        if title is None:
            self.path = write_report(report, self.directory, self.filename)
