"""The ``gradguard`` command: print a finished run's report, and gate CI pipelines on it.

::

    gradguard report lightning_logs/version_3                 # the table
    gradguard report runs/exp1/gradguard.json --format json   # text, markdown or json
    gradguard report lightning_logs/version_3 --fail-on-missing && echo "every parameter got a gradient"

``PATH`` is a ``gradguard.json`` file, a TensorBoard event file, or a directory holding one run's log (the report
is read from ``gradguard.json`` when there is one, otherwise from the ``gradguard/report`` text entry that the
dashboard writes into the event files). Exit status: 0 on success, 1 with ``--fail-on-missing`` when a parameter
missed a gradient, 2 when no report can be read (no report under the path, a corrupt file, several runs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Optional

from lightning_gradguard.output.sinks.tensorboard import REPORT_TAG, problems_markdown, report_from_text
from lightning_gradguard.report import REPORT_FILENAME, GradReport

EXIT_OK = 0
EXIT_MISSING = 1
EXIT_ERROR = 2

_EVENT_MARK = "tfevents"


class ReportNotFound(Exception):
    """No report can be read from the path; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------- finding reports
def find_runs(path: str) -> list[str]:
    """The run locations under a directory that hold a GradGuard report, sorted.

    A run is a ``gradguard.json`` file, or a directory whose event files carry a ``gradguard/report`` text entry
    (and no ``gradguard.json`` beside them).
    """
    runs: list[str] = []
    for directory, subdirs, files in os.walk(path):
        subdirs.sort()
        if REPORT_FILENAME in files:
            runs.append(os.path.join(directory, REPORT_FILENAME))
            continue
        events = sorted(os.path.join(directory, f) for f in files if _EVENT_MARK in f)
        if events and _latest_text_report(events) is not None:
            runs.append(directory)
    return sorted(runs)


def load_report(path: str) -> tuple[GradReport, str]:
    """Read the report at ``path`` (file or directory); returns it and where it was read from.

    Raises:
        ReportNotFound: there is no report, the file is corrupt, or the directory holds several runs.

    """
    if not os.path.exists(path):
        raise ReportNotFound(f"{path}: no such file or directory")
    if os.path.isfile(path):
        if _EVENT_MARK in os.path.basename(path):
            return _report_from_events([path]), path
        return _report_from_json(path), path
    runs = find_runs(path)
    if not runs:
        raise ReportNotFound(
            f"{path}: no GradGuard report found. Expected {REPORT_FILENAME} (written next to the logger's files at "
            f"the end of training) or TensorBoard event files with a '{REPORT_TAG}' text entry. Did training reach "
            "its end, and did it run with a logger (Lightning) or with log_dir/writer (plain PyTorch, Fabric)?"
        )
    if len(runs) > 1:
        listing = "\n".join(f"  {run}" for run in runs)
        raise ReportNotFound(f"{path} holds {len(runs)} runs with a GradGuard report; pass one of them:\n{listing}")
    run = runs[0]
    if os.path.isfile(run):
        return _report_from_json(run), run
    events = sorted(os.path.join(run, f) for f in os.listdir(run) if _EVENT_MARK in f)
    return _report_from_events(events), run


def _report_from_json(path: str) -> GradReport:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except UnicodeDecodeError:
        raise ReportNotFound(f"{path}: not a text file; expected {REPORT_FILENAME} or a log directory") from None
    except json.JSONDecodeError as err:
        raise ReportNotFound(
            f"{path}: corrupt report, not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); "
            "the run may have been killed while writing it"
        ) from None
    except OSError as err:
        raise ReportNotFound(f"{path}: cannot be read ({err.strerror})") from None
    if not isinstance(data, dict):
        raise ReportNotFound(f"{path}: valid JSON but not a GradGuard report (a {type(data).__name__}, not an object)")
    try:
        return GradReport.from_dict(data)
    except ValueError as err:
        raise ReportNotFound(f"{path}: valid JSON but not a GradGuard report ({err})") from None


def _report_from_events(events: Sequence[str]) -> GradReport:
    found = _latest_text_report(events)
    if found is None:
        raise ReportNotFound(
            f"{os.path.dirname(events[0]) or '.'}: the TensorBoard events hold no '{REPORT_TAG}' text entry "
            "(training may not have reached its end)"
        )
    text, source = found
    try:
        report = report_from_text(text)
    except ValueError as err:
        raise ReportNotFound(f"{source}: corrupt GradGuard text entry ({err})") from None
    if report is None:
        raise ReportNotFound(f"{source}: the '{REPORT_TAG}' text entry carries no machine-readable report")
    return report


def _latest_text_report(events: Sequence[str]) -> Optional[tuple[str, str]]:
    """The last ``gradguard/report`` text (by step, then by file order) in the event files, with its file."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    best: Optional[tuple[tuple[int, float], str, str]] = None
    for path in events:
        try:
            for event in EventFileLoader(path).Load():
                for value in event.summary.value:
                    # torch's and tensorboardX's add_text append "/text_summary" to the tag
                    if value.tag != REPORT_TAG and not value.tag.startswith(REPORT_TAG + "/"):
                        continue
                    strings = value.tensor.string_val
                    if not strings:
                        continue
                    key = (event.step, event.wall_time)
                    if best is None or key >= best[0]:
                        best = (key, strings[0].decode("utf-8", errors="replace"), path)
        except Exception:  # noqa: BLE001 - a truncated event file (a killed run) still yields what was written
            continue
    return None if best is None else (best[1], best[2])


# ---------------------------------------------------------------------------------------------- rendering
def render(report: GradReport, fmt: str) -> str:
    """The report as ``text`` (the console table), ``markdown`` or ``json``."""
    if fmt == "json":
        return report.to_json()
    if fmt == "markdown":
        return problems_markdown(report)
    return report.summary()


# ---------------------------------------------------------------------------------------------- entry point
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradguard",
        description="GradGuard: names every parameter that received no gradient, and says why.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    report = commands.add_parser(
        "report",
        help="print the report of a finished run",
        description="Print the GradGuard report of a finished run: from gradguard.json, a TensorBoard event file, "
        "or a run's log directory.",
    )
    report.add_argument("path", metavar="PATH", help="gradguard.json, an event file, or a run's log directory")
    report.add_argument(
        "--format", choices=("text", "markdown", "json"), default="text", help="output format (default: text)"
    )
    report.add_argument(
        "--fail-on-missing",
        action="store_true",
        help="exit with status 1 when any parameter missed a gradient at some optimizer step",
    )
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "report":
        parser.print_help(sys.stderr)
        return EXIT_ERROR
    try:
        report, source = load_report(args.path)
    except ReportNotFound as err:
        print(f"gradguard: {err}", file=sys.stderr)
        return EXIT_ERROR
    try:
        print(render(report, args.format))
        sys.stdout.flush()
    except BrokenPipeError:  # `gradguard report ... | head`: the reader left, which is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    if args.fail_on_missing and report.missing:
        n = len(report.missing)
        print(
            f"gradguard: {n} parameter{'s' if n != 1 else ''} missed a gradient ({source}); failing as asked by "
            "--fail-on-missing",
            file=sys.stderr,
        )
        return EXIT_MISSING
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
