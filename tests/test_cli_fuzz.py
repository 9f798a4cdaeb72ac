"""Property tests of ``gradguard report``: whatever the file holds, the command exits 0, 1 or 2 as documented.

The documented contract: 0 when a valid report was printed, 1 only with ``--fail-on-missing`` when that valid report
has a parameter that missed a gradient, 2 (with one line on stderr, never a traceback) for everything else. The
inputs are generated JSON values, reports with random values in their fields, truncated and mutated real reports,
and arbitrary bytes. ``main()`` runs in-process (fast); test_cli_inputs.py runs the real command as a subprocess.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from contextlib import redirect_stderr, redirect_stdout

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_cli_inputs import planted_report

from lightning_gradguard.cli import EXIT_ERROR, EXIT_MISSING, EXIT_OK, main
from lightning_gradguard.report import GradReport

# FUZZ_EXAMPLES=3000 searches harder (about two minutes)
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

REAL = planted_report().to_dict()
REAL["distributed"] = {  # a valid distributed section, so that mutations reach it too
    "strategy": "ddp",
    "world_size": 64,
    "rank_dependent": {
        "head.weight": {"ranks": None, "micro_batches": 2},
        "head.bias": {"ranks": [1, 3], "micro_batches": 1},
    },
    "unchecked": None,
}
REAL["amp_skipped_steps"] = 0
REAL_TEXT = json.dumps(REAL, indent=2)

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
# objects with the report's own field names, so that generated values reach the field checks, not only the first one
field_names = st.sampled_from(
    ["steps", "micro_batches", "params", "findings", "amp_skipped_steps", "distributed", "none_steps", "cause",
     "detail", "kind", "name", "strategy", "world_size", "rank_dependent", "ranks", "unchecked", "other"]
)
report_like = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(field_names | st.text(max_size=4), children,
                                                                      max_size=6),
    max_leaves=30,
)


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory() as directory:
        yield directory


def check(directory: str, content: bytes) -> int:
    """Write ``content`` as a run's gradguard.json, run the command on the file and on the directory, check the
    documented contract, and return the exit status."""
    path = os.path.join(directory, "gradguard.json")
    with open(path, "wb") as f:
        f.write(content)
    codes = set()
    for target in (path, directory):
        for flag in ((), ("--fail-on-missing",)):
            out, err = io.StringIO(), io.StringIO()
            with redirect_stdout(out), redirect_stderr(err):
                code = main(["report", target, *flag])
            codes.add((flag, code))
            assert code in (EXIT_OK, EXIT_MISSING, EXIT_ERROR)
            assert "Traceback" not in err.getvalue() and "internal error" not in err.getvalue(), err.getvalue()
            if code == EXIT_ERROR:
                assert out.getvalue() == "" and err.getvalue().count("\n") == 1, err.getvalue()
                assert err.getvalue().startswith(f"gradguard: {path}:")
                continue
            # 0 or 1: the file is a valid report, printed in full, and 1 means exactly "a parameter missed one"
            report = GradReport.from_dict(json.loads(content.decode("utf-8-sig")))
            assert out.getvalue() == report.summary() + "\n"
            assert code == (EXIT_MISSING if flag and report.missing else EXIT_OK)
    plain = {code for flag, code in codes if not flag}
    assert len(plain) == 1  # the file and its directory read alike
    for fmt in ("markdown", "json"):
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            code = main(["report", path, "--format", fmt])
        assert code in plain and "internal error" not in err.getvalue(), err.getvalue()
        if code == EXIT_OK and fmt == "json":
            report = GradReport.from_dict(json.loads(content.decode("utf-8-sig")))  # absent fields: their defaults
            assert json.loads(out.getvalue()) == report.to_dict()
    return plain.pop()


@SETTINGS
@given(value=json_values)
def test_any_json_value(workdir, value):
    check(workdir, json.dumps(value).encode())


@SETTINGS
@given(value=report_like)
def test_objects_with_report_field_names(workdir, value):
    check(workdir, json.dumps(value).encode())


@SETTINGS
@given(fields=st.dictionaries(field_names, json_values, max_size=6))
def test_a_real_report_with_fields_replaced(workdir, fields):
    data = json.loads(REAL_TEXT)
    data.update(fields)
    check(workdir, json.dumps(data).encode())


def _paths(value, prefix=()):
    """Every path into a JSON value, as a tuple of keys and indices."""
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            yield from _paths(child, (*prefix, i))


PATHS = [p for p in _paths(REAL) if p]


@SETTINGS
@given(path=st.sampled_from(PATHS), action=st.sampled_from(["replace", "delete", "add"]), value=json_values)
def test_a_real_report_mutated_anywhere(workdir, path, action, value):
    data = json.loads(REAL_TEXT)
    *parents, last = path
    node = data
    for key in parents:
        node = node[key]
    if action == "replace":
        node[last] = value
    elif action == "delete":
        del node[last]
    elif isinstance(node, dict):
        node[f"{last}_extra"] = value
    else:
        node.append(value)
    check(workdir, json.dumps(data).encode())


@SETTINGS
@given(end=st.integers(0, len(REAL_TEXT)))
def test_a_real_report_truncated(workdir, end):
    code = check(workdir, REAL_TEXT[:end].encode())
    assert code == (EXIT_OK if end == len(REAL_TEXT) else EXIT_ERROR) or REAL_TEXT[end:].strip() == ""


@SETTINGS
@given(data=st.data())
def test_a_real_report_with_bytes_changed(workdir, data):
    content = bytearray(REAL_TEXT.encode())
    for _ in range(data.draw(st.integers(1, 4))):
        content[data.draw(st.integers(0, len(content) - 1))] = data.draw(st.integers(0, 255))
    check(workdir, bytes(content))


@SETTINGS
@given(content=st.binary(max_size=256))
def test_arbitrary_bytes(workdir, content):
    check(workdir, content)


def test_the_unmutated_report_is_valid(workdir):
    assert check(workdir, REAL_TEXT.encode()) == EXIT_OK
