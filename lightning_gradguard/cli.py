"""The ``gradguard`` command: print a finished run's report, and gate CI pipelines on it.

::

    gradguard report lightning_logs/version_3                 # the table
    gradguard report runs/exp1/gradguard.json --format json   # text, markdown or json
    gradguard report lightning_logs/version_3 --fail-on-missing && echo "every parameter got a gradient"

``PATH`` is a ``gradguard.json`` file, a TensorBoard event file, or a directory holding one run's log (the report
is read from ``gradguard.json`` when there is one, otherwise from the ``gradguard/report`` text entry that the
dashboard writes into the event files).

Exit status:

* 0: the report was read and printed (with ``--fail-on-missing``: and no parameter missed a gradient);
* 1: only with ``--fail-on-missing``: the report was read, and a parameter missed a gradient at some step;
* 2: no valid report could be read (no report under the path, several runs, a file that is not a report: corrupt,
  truncated, binary, unreadable, not a regular file, a field of the wrong type or out of range), or the command
  line is wrong. One line on stderr says what is wrong with which file; there is never a traceback.

The command imports neither torch nor Lightning (reading event files imports ``tensorboard``, only when needed),
so a CI gate answers at once.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import stat
import sys
from collections.abc import Sequence
from typing import Optional, TextIO

from lightning_gradguard.report import REPORT_FILENAME, GradReport
from lightning_gradguard.report_text import REPORT_TAG, problems_markdown, report_from_text

EXIT_OK = 0
EXIT_MISSING = 1
EXIT_ERROR = 2

_EVENT_MARK = "tfevents"
MAX_REPORT_BYTES = 1 << 30  # a 10,000-parameter report is about 3 MB; beyond this the file is not a report


_REPORT_FILE = re.compile(r"gradguard(-[A-Za-z0-9_.-]+)?\.json\Z")
_REPORT_TAG = re.compile(r"gradguard/([A-Za-z0-9_.-]+/)?report(/text_summary)?\Z")


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
        reports = sorted(name for name in files if _REPORT_FILE.match(name))  # a named guard's: gradguard-<name>.json
        if reports:
            runs.extend(os.path.join(directory, name) for name in reports)
            continue
        events = _event_files(directory, files)
        if events and _latest_text_report(events) is not None:
            runs.append(directory)
    return sorted(runs)


def load_report(path: str) -> tuple[GradReport, str]:
    """Read the report at ``path`` (file or directory); returns it and where it was read from.

    Raises:
        ReportNotFound: there is no report, the file is not a valid report, or the directory holds several runs.

    """
    mode = _mode(path)
    if stat.S_ISREG(mode):
        if _EVENT_MARK in os.path.basename(path):
            return _report_from_events([path]), path
        return _report_from_json(path), path
    if not stat.S_ISDIR(mode):
        raise ReportNotFound(
            f"{path}: {_not_regular(mode)}; expected {REPORT_FILENAME}, an event file or a log directory"
        )
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
    if _REPORT_FILE.match(os.path.basename(run)) and not os.path.isdir(run):
        return _report_from_json(run), run
    return _report_from_events(_event_files(run, os.listdir(run))), run


def _mode(path: str) -> int:
    """The file type and mode of ``path`` (links followed)."""
    try:
        return os.stat(path).st_mode
    except FileNotFoundError:
        raise ReportNotFound(f"{path}: no such file or directory") from None
    except ValueError as err:  # an embedded NUL character
        raise ReportNotFound(f"{path!r}: not a valid path ({err})") from None
    except OSError as err:
        raise ReportNotFound(f"{path}: cannot be read ({err.strerror or err})") from None


def _not_regular(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"))
    for test, kind in kinds:
        if test(mode):
            return f"not a regular file but {kind}"
    return "not a regular file"


def _event_files(directory: str, names: Sequence[str]) -> list[str]:
    """The regular files among ``names`` that look like TensorBoard event files (a FIFO would block the reader)."""
    events = []
    for name in sorted(names):
        if _EVENT_MARK not in name:
            continue
        full = os.path.join(directory, name)
        try:
            if stat.S_ISREG(os.stat(full).st_mode):
                events.append(full)
        except (OSError, ValueError):
            continue
    return events


def _read_text(path: str) -> str:
    """The file's text; never blocks on a FIFO (opened without waiting for a writer, then refused)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        if os.path.islink(path):
            raise ReportNotFound(f"{path}: a link to {os.readlink(path)}, which does not exist") from None
        raise ReportNotFound(f"{path}: no such file or directory") from None
    except OSError as err:
        raise ReportNotFound(f"{path}: cannot be read ({err.strerror or err})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ReportNotFound(f"{path}: {_not_regular(info.st_mode)}; expected {REPORT_FILENAME}")
        if info.st_size > MAX_REPORT_BYTES:
            raise ReportNotFound(f"{path}: {info.st_size} bytes, too large to be a GradGuard report")
        with os.fdopen(fd, "rb") as f:
            fd = -1  # closed by the file object
            data = f.read(MAX_REPORT_BYTES + 1)
    except OSError as err:
        raise ReportNotFound(f"{path}: cannot be read ({err.strerror or err})") from None
    finally:
        if fd >= 0:
            os.close(fd)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ReportNotFound(
            f"{path}: not a text file (not UTF-8); expected {REPORT_FILENAME} or a log directory"
        ) from None


def _report_from_json(path: str) -> GradReport:
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ReportNotFound(
            f"{path}: corrupt report, not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); "
            "the run may have been killed while writing it"
        ) from None
    except RecursionError:
        raise ReportNotFound(f"{path}: not a GradGuard report (JSON nested too deeply)") from None
    except ValueError as err:  # an integer longer than Python's digit limit
        raise ReportNotFound(f"{path}: not a GradGuard report ({err})") from None
    if not isinstance(data, dict):
        raise ReportNotFound(f"{path}: valid JSON but not a GradGuard report (a {_json_kind(data)}, not an object)")
    try:
        return GradReport.from_dict(data)
    except ValueError as err:
        raise ReportNotFound(f"{path}: {err}") from None


def _json_kind(value: object) -> str:
    kinds = {list: "array", str: "string", bool: "boolean", int: "number", float: "number", type(None): "null"}
    return kinds.get(type(value), type(value).__name__)


def _report_from_events(events: Sequence[str]) -> GradReport:
    if not events:
        raise ReportNotFound("no readable TensorBoard event file")
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
    try:  # imported here: reading gradguard.json needs no tensorboard
        from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    except ImportError:
        raise ReportNotFound(
            f"{events[0]}: reading TensorBoard event files needs the tensorboard package (pip install tensorboard)"
        ) from None

    best: Optional[tuple[tuple[int, float], str, str]] = None
    for path in events:
        try:
            for event in EventFileLoader(path).Load():
                for value in event.summary.value:
                    # torch's and tensorboardX's add_text append "/text_summary" to the tag; a named guard's tag
                    # is gradguard/<name>/report
                    if not _REPORT_TAG.match(value.tag):
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
    """Run the command line; returns the exit status (0, 1 or 2, see the module docstring). Never raises.

    Example::

        status = main(["report", "lightning_logs/version_0", "--fail-on-missing"])

    """
    try:
        return _run(argv)
    except SystemExit as exit_:  # argparse: --help (0) or a usage error (2)
        code = exit_.code
        return code if isinstance(code, int) and code in (EXIT_OK, EXIT_ERROR) else EXIT_ERROR
    except Exception as err:  # noqa: BLE001 - a crash must never read as a finding (exit 1) in CI
        _say(sys.stderr, f"gradguard: internal error ({type(err).__name__}: {err}); please report this")
        return EXIT_ERROR


def _run(argv: Optional[Sequence[str]]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "report":
        parser.print_help(sys.stderr)
        return EXIT_ERROR
    try:
        report, source = load_report(args.path)
    except ReportNotFound as err:
        _say(sys.stderr, f"gradguard: {err}")
        return EXIT_ERROR
    try:
        _say(sys.stdout, render(report, args.format))
        sys.stdout.flush()
    except BrokenPipeError:  # `gradguard report ... | head`: the reader left, which is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    if args.fail_on_missing and report.missing:
        n = len(report.missing)
        _say(
            sys.stderr,
            f"gradguard: {n} parameter{'s' if n != 1 else ''} missed a gradient ({source}); failing as asked by "
            "--fail-on-missing",
        )
        return EXIT_MISSING
    return EXIT_OK


def _say(stream: TextIO, text: str) -> None:
    """Print ``text``; characters the stream cannot encode (a name in an ASCII terminal) are escaped, not fatal."""
    encoding = getattr(stream, "encoding", None) or "utf-8"
    try:
        text.encode(encoding)
    except UnicodeEncodeError:
        text = text.encode(encoding, "backslashreplace").decode(encoding, "replace")
    except LookupError:  # an encoding Python does not know: print as is
        pass
    print(text, file=stream)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
