"""``gradguard.json``: the report next to the logger's files, for the ``gradguard report`` command and CI."""

from __future__ import annotations

import os
from typing import Optional

from lightning_gradguard.report import REPORT_FILENAME, GradReport


def write_report(report: GradReport, directory: Optional[str]) -> Optional[str]:
    """Write ``directory/gradguard.json``; returns its path, or None when there is no directory."""
    if not directory:
        return None
    os.makedirs(directory, exist_ok=True)
    return report.save(os.path.join(directory, REPORT_FILENAME))
