"""``gradguard report`` on inputs that are not valid reports: exit 2 and one line naming the file and what is wrong.

A CI gate reads exit 1 as "a parameter missed a gradient", so a crash (a traceback, exit 1) on a corrupt, hand-edited
or odd file would read as a finding. Every case here starts from a real report (a plain loop with a planted unused
layer and a detached path) and breaks it the way a disk, a killed run or a person would.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import warnings
from contextlib import redirect_stderr, redirect_stdout

import pytest
import torch
import torch.nn.functional as F
from plain_models import PlantedNet, batches

from lightning_gradguard import watch
from lightning_gradguard.cli import EXIT_ERROR, EXIT_MISSING, EXIT_OK, main
from lightning_gradguard.report import GradReport
from lightning_gradguard.report_text import REPORT_TAG, report_markdown

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def planted_report() -> GradReport:
    """The report of a real plain loop: ``net.unused`` never called, ``net.side`` detached."""
    model = PlantedNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        guard = watch(model, optimizer, summary=False)
        for x, y in batches(2):
            F.mse_loss(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
        guard.close()
    return guard.report()


@pytest.fixture(scope="module")
def valid() -> dict:
    data = planted_report().to_dict()
    assert data["params"]["unused.weight"]["none_steps"] == 2
    return data


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def assert_one_line_error(path, argv=(), *fragments: str) -> str:
    code, out, err = run("report", str(path), *argv)
    assert (code, out) == (EXIT_ERROR, ""), err
    assert err.count("\n") == 1 and err.startswith(f"gradguard: {path}"), err
    assert "Traceback" not in err and "internal error" not in err
    for fragment in fragments:
        assert fragment in err
    return err


def edited(valid: dict, edit) -> dict:
    data = json.loads(json.dumps(valid))
    edit(data)
    return data


# ---------------------------------------------------------------------------------------------- wrong values
OUTSIDER = {"ranks": [5], "micro_batches": 2}
WRONG_VALUES = {
    "steps overflows": (lambda d: d.update(steps=1e400), "steps must be a non-negative integer (a count), got Inf"),
    "steps NaN": (lambda d: d.update(steps=float("nan")), "steps must be a non-negative integer (a count), got NaN"),
    "steps negative": (lambda d: d.update(steps=-97), "steps must be a non-negative integer (a count), got -97"),
    "steps a float": (lambda d: d.update(steps=2.5), "got 2.5"),
    "steps true": (lambda d: d.update(steps=True), "got true"),
    "steps beyond int64": (lambda d: d.update(steps=2**64), "got an integer beyond 2**63"),
    "none_steps null": (
        lambda d: d["params"]["unused.weight"].update(none_steps=None),
        'params["unused.weight"].none_steps must be a non-negative integer (a count), got null',
    ),
    "none_steps a string": (
        lambda d: d["params"]["unused.weight"].update(none_steps="4"),
        'params["unused.weight"].none_steps must be a non-negative integer (a count), got "4"',
    ),
    "cause a number": (lambda d: d["params"]["unused.weight"].update(cause=3), '.cause must be a string, got 3'),
    "param an array": (lambda d: d["params"].update(x=[1]), 'params["x"] must be an object, got an array'),
    "params an array": (lambda d: d.update(params=[]), "params must be an object, got an array"),
    "no steps": (lambda d: d.pop("steps"), 'the report lacks the field "steps"'),
    "unknown field": (lambda d: d.update(version=2), 'unknown field "version"'),
    "unknown param field": (lambda d: d["params"]["head.bias"].update(norm=1.0), 'params["head.bias"] has an unknown'),
    "findings an object": (lambda d: d.update(findings={}), "findings must be an array, got an object"),
    "finding without detail": (
        lambda d: d.update(findings=[{"kind": "unregistered", "name": "t"}]),
        'findings[0] lacks the field "detail"',
    ),
    "rank_dependent entry empty": (
        lambda d: d.update(distributed={"strategy": "ddp", "world_size": 2, "rank_dependent": {"x": {}}}),
        'distributed.rank_dependent["x"] lacks the field "ranks"',
    ),
    "rank beyond the world": (
        lambda d: d.update(distributed={"strategy": "ddp", "world_size": 2, "rank_dependent": {"x": OUTSIDER}}),
        "ranks[0] is 5, not a rank of a world of 2",
    ),
    "world of no rank": (
        lambda d: d.update(distributed={"strategy": "ddp", "world_size": 0}),
        "distributed.world_size must be a positive integer, got 0",
    ),
    "amp_skipped_steps a string": (lambda d: d.update(amp_skipped_steps="2"), 'amp_skipped_steps must be'),
}


@pytest.mark.parametrize("case", sorted(WRONG_VALUES))
def test_a_field_of_the_wrong_type_or_range_is_named(valid, tmp_path, case):
    edit, expected = WRONG_VALUES[case]
    path = tmp_path / "gradguard.json"
    path.write_text(json.dumps(edited(valid, edit)))
    err = assert_one_line_error(path, (), "not a GradGuard report", expected)
    assert_one_line_error(tmp_path, ("--fail-on-missing",), expected)  # the run directory: the same, never exit 1
    with pytest.raises(ValueError, match="not a GradGuard report"):
        GradReport.from_dict(edited(valid, edit))
    assert len(err) < 400


# ---------------------------------------------------------------------------------------------- bad text
BAD_TEXT = {
    "nested 200,000 levels": ("[" * 200_000 + "]" * 200_000, "nested too deeply"),
    "nested in a field": ('{"steps": ' + "[" * 200_000 + "]" * 200_000 + "}", "nested too deeply"),
    "an integer of 5,000 digits": ('{"steps": ' + "9" * 5000 + "}", "not a GradGuard report"),
    "empty": ("", "not valid JSON"),
    "truncated": (None, "corrupt report, not valid JSON"),
    "a lone surrogate in a name": (
        '{"steps": 1, "micro_batches": 1, "params": {"\\ud800": {}}}',
        "is not valid Unicode text",
    ),
    "a JSON string": ('"report"', "a string, not an object"),
}


@pytest.mark.parametrize("case", sorted(BAD_TEXT))
def test_text_that_is_not_a_report(valid, tmp_path, case):
    text, expected = BAD_TEXT[case]
    if text is None:
        whole = json.dumps(valid, indent=2)
        text = whole[: len(whole) // 2]
    path = tmp_path / "gradguard.json"
    path.write_text(text, encoding="utf-8")
    assert_one_line_error(path, ("--fail-on-missing",), expected)


@pytest.mark.parametrize(
    "content",
    [bytes(range(256)), "{}".encode("utf-16"), b"\x89PNG\r\n\x1a\n" + bytes(64)],
    ids=["all bytes", "utf-16", "png"],
)
def test_binary_files(tmp_path, content):
    path = tmp_path / "gradguard.json"
    path.write_bytes(content)
    assert_one_line_error(path, (), "not a text file (not UTF-8)")


def test_a_utf8_bom_is_accepted(valid, tmp_path):
    path = tmp_path / "gradguard.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(valid).encode())
    code, out, _ = run("report", str(path))
    assert code == EXIT_OK and "unused.weight" in out


# ---------------------------------------------------------------------------------------------- odd files
def test_special_files_and_paths(tmp_path):
    assert_one_line_error("/dev/null", (), "not a regular file but a character device")
    assert_one_line_error(tmp_path / "nothing", (), "no such file or directory")
    (tmp_path / "file").write_text("x")
    assert_one_line_error(tmp_path / "file" / "gradguard.json", (), "cannot be read (Not a directory)")
    code, _, err = run("report", "bad\0path")
    assert code == EXIT_ERROR and "not a valid path" in err and err.count("\n") == 1


def test_a_dangling_link_in_a_run_directory(tmp_path):
    os.symlink(tmp_path / "gone.json", tmp_path / "gradguard.json")
    err = assert_one_line_error(tmp_path, ("--fail-on-missing",))
    link, target = tmp_path / "gradguard.json", tmp_path / "gone.json"
    assert err == f"gradguard: {link}: a link to {target}, which does not exist\n"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads files whatever their mode")
def test_an_unreadable_file(valid, tmp_path):
    path = tmp_path / "gradguard.json"
    path.write_text(json.dumps(valid))
    path.chmod(0)
    assert_one_line_error(path, (), "cannot be read (Permission denied)")


def test_event_file_garbage_and_a_corrupt_text_entry(valid, tmp_path):
    garbage = tmp_path / "garbage" / "events.out.tfevents.1.host"
    garbage.parent.mkdir()
    garbage.write_bytes(os.urandom(4096))
    code, out, err = run("report", str(garbage))
    assert (code, out) == (EXIT_ERROR, "") and err.count("\n") == 1 and "no 'gradguard/report' text entry" in err

    from torch.utils.tensorboard import SummaryWriter

    bad = edited(valid, lambda d: d.update(steps="many"))
    writer = SummaryWriter(str(tmp_path / "run"))
    text = report_markdown(GradReport.from_dict(valid)).replace(
        json.dumps(valid, separators=(",", ":")), json.dumps(bad, separators=(",", ":"))
    )
    assert '"steps":"many"' in text
    writer.add_text(REPORT_TAG, text, 0)
    writer.close()
    code, out, err = run("report", str(tmp_path / "run"), "--fail-on-missing")
    assert (code, out) == (EXIT_ERROR, "") and err.count("\n") == 1
    assert "corrupt GradGuard text entry (not a GradGuard report: steps must be a non-negative integer" in err


def _subprocess(*argv: str, **env: str) -> subprocess.CompletedProcess:
    path = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
    environment = {**os.environ, **env, "PYTHONPATH": path}
    return subprocess.run(
        [sys.executable, "-m", "lightning_gradguard.cli", *argv], capture_output=True, text=True, timeout=60,
        env=environment,
    )


@pytest.mark.slow
def test_a_fifo_never_blocks(valid, tmp_path):
    """A FIFO named gradguard.json (or like an event file) is refused at once, not read (which would wait forever)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    os.mkfifo(run_dir / "gradguard.json")
    for path in (run_dir, run_dir / "gradguard.json"):
        result = _subprocess("report", str(path), "--fail-on-missing")
        assert result.returncode == EXIT_ERROR and result.stdout == ""
        assert result.stderr.startswith(f"gradguard: {run_dir / 'gradguard.json'}: not a regular file but a FIFO;")
        assert result.stderr.count("\n") == 1
    events = tmp_path / "events"
    events.mkdir()
    os.mkfifo(events / "events.out.tfevents.0.host")
    result = _subprocess("report", str(events))
    assert result.returncode == EXIT_ERROR and "no GradGuard report found" in result.stderr
    assert result.stderr.count("\n") == 1


@pytest.mark.slow
def test_exit_codes_of_the_real_command(valid, tmp_path):
    path = tmp_path / "gradguard.json"
    path.write_text(json.dumps(valid))
    assert _subprocess("report", str(path)).returncode == EXIT_OK
    assert _subprocess("report", str(path), "--fail-on-missing").returncode == EXIT_MISSING
    path.write_text(json.dumps(edited(valid, lambda d: d.update(steps=1e400))))
    result = _subprocess("report", str(path), "--fail-on-missing")
    assert result.returncode == EXIT_ERROR and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert _subprocess("report").returncode == EXIT_ERROR  # no PATH: argparse's usage error


@pytest.mark.slow
def test_a_name_the_terminal_cannot_encode_is_escaped(valid, tmp_path):
    data = edited(valid, lambda d: d["params"].update({"tête.wéight": d["params"].pop("unused.weight")}))
    path = tmp_path / "gradguard.json"
    path.write_text(json.dumps(data))
    result = _subprocess("report", str(path), "--fail-on-missing", PYTHONIOENCODING="ascii")
    assert result.returncode == EXIT_MISSING, result.stderr
    assert "t\\xeate.w\\xe9ight" in result.stdout


# ---------------------------------------------------------------------------------------------- more than 52 ranks
def test_a_report_beyond_52_ranks_prints(valid, tmp_path):
    """Beyond 52 ranks the report keeps how many micro-batches, not which ranks (``"ranks": null``)."""
    data = edited(
        valid,
        lambda d: d.update(
            distributed={
                "strategy": "ddp",
                "world_size": 64,
                "rank_dependent": {
                    "head.weight": {"ranks": None, "micro_batches": 3},
                    "head.bias": {"ranks": [7], "micro_batches": 1},
                },
                "unchecked": None,
            }
        ),
    )
    report = GradReport.from_dict(data)
    expected = (
        "- head.weight: no gradient on some of the 64 ranks (which ones is not kept beyond 52 ranks) in 3 "
        "micro-batches in which other ranks gave it one"
    )
    assert expected in report.summary().splitlines()
    assert expected in report.format_table().splitlines()
    assert "- head.bias: no gradient on rank 7 in 1 micro-batch in which other ranks gave it one" in report.summary()
    path = tmp_path / "gradguard.json"
    path.write_text(json.dumps(data))
    code, out, err = run("report", str(path), "--fail-on-missing")
    assert code == EXIT_MISSING and expected in out.splitlines()
    code, out, _ = run("report", str(path), "--format", "markdown")
    assert code == EXIT_OK and "some of the 64 ranks" in out
    code, out, _ = run("report", str(path), "--format", "json")
    assert code == EXIT_OK and json.loads(out) == data
