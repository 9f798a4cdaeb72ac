"""The report as text for TensorBoard's text tab, and back: markdown with the report's JSON hidden inside.

The dashboard writes :func:`report_markdown` under :data:`REPORT_TAG`; ``gradguard report`` reads a run directory
back with :func:`report_from_text`. This module needs neither torch nor Lightning, so the command answers at once.

Example::

    text = report_markdown(report, "GradGuard report at the end of training")
    assert report_from_text(text).to_dict() == report.to_dict()

"""

from __future__ import annotations

import json
from typing import Optional

from lightning_gradguard.report import GradReport

# the tag prefix of every GradGuard series (lightning_gradguard.metrics.PREFIX), spelled out to stay torch-free
REPORT_TAG = "gradguard/report"

_JSON_OPEN = "<!-- gradguard-report-json "
_JSON_CLOSE = " -->"


def report_markdown(report: GradReport, title: Optional[str] = None) -> str:
    """The report as markdown for TensorBoard's text tab, with the report's JSON in a hidden HTML comment.

    Example::

        writer.add_text(REPORT_TAG, report_markdown(report, "title"), step)

    """
    blocks = [f"### {title}"] if title else []
    blocks.append(problems_markdown(report))
    # ">" only occurs inside JSON strings, so escaping it keeps "-->" out of the comment and the JSON valid
    payload = json.dumps(report.to_dict(), separators=(",", ":")).replace(">", "\\u003e")
    blocks.append(f"{_JSON_OPEN}{payload}{_JSON_CLOSE}")
    return "\n\n".join(blocks)


def problems_markdown(report: GradReport) -> str:
    """The report as markdown: the one-line verdict, or the headline, the causes with their source lines
    (parameters that share an explanation grouped), the table and its notes (:meth:`GradReport.format_table`).

    Example::

        print(problems_markdown(GradReport.load("gradguard.json")))

    """
    summary = report.summary()
    if report.ok and not report.intermittent and "\n" not in summary:
        return summary
    return _markdown_blocks(report.format_table("markdown"))


def _markdown_blocks(text: str) -> str:
    """Separate tables, lists and paragraphs by blank lines: Python-Markdown (TensorBoard) needs them."""
    out: list[str] = []
    previous = None
    for line in text.splitlines():
        kind = "table" if line.startswith("|") else "list" if line.startswith(("- ", "  ")) else "text"
        if previous is not None and (kind != previous or kind == "text"):
            out.append("")
        if kind == "text" and line.endswith(":"):
            line = f"**{line}**"
        out.append(line)
        previous = kind
    return "\n".join(out)


def report_from_text(text: str) -> Optional[GradReport]:
    """The report embedded in a text entry written by :func:`report_markdown`, or None when there is none.

    Raises:
        ValueError: the entry carries a report that cannot be parsed.

    Example::

        report = report_from_text(event.summary.value[0].tensor.string_val[0].decode())

    """
    start = text.rfind(_JSON_OPEN)
    if start < 0:
        return None
    end = text.find(_JSON_CLOSE, start)
    if end < 0:
        raise ValueError("the GradGuard text entry is truncated (no end of the embedded report)")
    payload = text[start + len(_JSON_OPEN) : end]
    try:
        data = json.loads(payload)
    except json.JSONDecodeError as err:
        raise ValueError(f"the report embedded in the GradGuard text entry is not valid JSON: {err}") from err
    except RecursionError:
        raise ValueError("the report embedded in the GradGuard text entry is nested too deeply") from None
    except ValueError as err:  # e.g. an integer longer than Python's digit limit
        raise ValueError(f"the report embedded in the GradGuard text entry cannot be parsed: {err}") from None
    return GradReport.from_dict(data)
