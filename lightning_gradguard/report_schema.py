"""What a valid ``gradguard.json`` holds: the check behind :meth:`GradReport.from_dict`.

A report read back from a file is checked field by field before anything uses it, so that a corrupt, truncated or
hand-edited file gives one error naming the field and what it accepts, instead of a crash while printing it (or a
wrong exit status from ``gradguard report``). Counts are non-negative integers below 2**63 (the engine keeps them
in int64), text fields are strings or null, and every object has only the fields this version writes.

Example::

    check_report({"steps": 3, "micro_batches": 3, "params": {"a.weight": {"steps": "3"}}})
    # ValueError: params["a.weight"].steps must be a non-negative integer, got "3"

"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

MAX_COUNT = 2**63 - 1  # the engine's counters are int64

REPORT_FIELDS = ("steps", "micro_batches", "params", "findings", "amp_skipped_steps", "distributed")
PARAM_COUNTS = (
    "steps", "none_steps", "micro_batches", "none_micro_batches", "measured_steps", "nonfinite_steps", "zero_steps",
    "update_steps", "zero_lr_steps", "version_steps", "untouched_steps",
)
PARAM_TEXTS = ("cause", "detail")
FINDING_FIELDS = ("kind", "name", "detail")
FINDING_SEVERITIES = ("warning", "note")  # "severity" is optional: reports written before it hold warnings only
DISTRIBUTED_FIELDS = ("strategy", "world_size", "rank_dependent", "unchecked")
RANK_DEPENDENT_FIELDS = ("ranks", "micro_batches")

_SHOWN_NAME = 80  # characters of a parameter name quoted in an error


def check_report(data: Any) -> None:
    """Raise ``ValueError`` naming the first field of ``data`` that a :meth:`GradReport.to_dict` output cannot hold.

    Raises:
        ValueError: ``data`` is not a GradGuard report; the message names the field and what it accepts.

    """
    _object(data, "the report")
    _fields(data, "the report", required=("steps", "micro_batches", "params"), allowed=REPORT_FIELDS)
    _count(data["steps"], "steps")
    _count(data["micro_batches"], "micro_batches")
    _object(data["params"], "params")
    for name, param in data["params"].items():
        where = f"params[{_quote(name)}]"
        _text(name, f"the parameter name {where}")
        _object(param, where)
        _fields(param, where, required=(), allowed=PARAM_COUNTS + PARAM_TEXTS)
        for key in PARAM_COUNTS:
            if key in param:
                _count(param[key], f"{where}.{key}")
        for key in PARAM_TEXTS:
            if param.get(key) is not None:
                _text(param[key], f"{where}.{key}")
    findings = data.get("findings", [])
    if not isinstance(findings, list):
        raise ValueError(f"findings must be an array, got {_show(findings)}")
    for i, finding in enumerate(findings):
        where = f"findings[{i}]"
        _object(finding, where)
        _fields(finding, where, required=FINDING_FIELDS, allowed=(*FINDING_FIELDS, "severity"))
        for key in FINDING_FIELDS:
            _text(finding[key], f"{where}.{key}")
        if "severity" in finding and finding["severity"] not in FINDING_SEVERITIES:
            raise ValueError(
                f"{where}.severity must be one of {', '.join(map(json.dumps, FINDING_SEVERITIES))}, got "
                f"{_show(finding['severity'])}"
            )
    if data.get("amp_skipped_steps") is not None:
        _count(data["amp_skipped_steps"], "amp_skipped_steps")
    if data.get("distributed") is not None:
        _distributed(data["distributed"])


def _distributed(info: Any) -> None:
    _object(info, "distributed")
    _fields(info, "distributed", required=("strategy", "world_size"), allowed=DISTRIBUTED_FIELDS)
    _text(info["strategy"], "distributed.strategy")
    world_size = info["world_size"]
    _count(world_size, "distributed.world_size")
    if world_size < 1:
        raise ValueError(f"distributed.world_size must be a positive integer, got {world_size}")
    if info.get("unchecked") is not None:
        _text(info["unchecked"], "distributed.unchecked")
    ranked = info.get("rank_dependent", {})
    _object(ranked, "distributed.rank_dependent")
    for name, entry in ranked.items():
        where = f"distributed.rank_dependent[{_quote(name)}]"
        _text(name, f"the parameter name {where}")
        _object(entry, where)
        _fields(entry, where, required=RANK_DEPENDENT_FIELDS, allowed=RANK_DEPENDENT_FIELDS)
        _count(entry["micro_batches"], f"{where}.micro_batches")
        ranks = entry["ranks"]
        if ranks is None:  # beyond 52 ranks only the count is kept
            continue
        if not isinstance(ranks, list):
            raise ValueError(f"{where}.ranks must be an array of ranks or null, got {_show(ranks)}")
        for i, rank in enumerate(ranks):
            _count(rank, f"{where}.ranks[{i}]")
            if rank >= world_size:
                raise ValueError(f"{where}.ranks[{i}] is {rank}, not a rank of a world of {world_size}")


# ---------------------------------------------------------------------------------------------- field checks
def _object(value: Any, where: str) -> None:
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be an object, got {_show(value)}")


def _fields(value: dict, where: str, required: Iterable[str], allowed: Iterable[str]) -> None:
    required = tuple(required)
    absent = [key for key in required if key not in value]
    if absent:
        raise ValueError(f"{where} lacks the field {_quote(absent[0])} (it needs {_names(required)})")
    allowed = tuple(allowed)
    unknown = [key for key in value if key not in allowed]
    if unknown:
        raise ValueError(
            f"{where} has an unknown field {_quote(unknown[0])}; it holds only {_names(allowed)} "
            "(written by another version of GradGuard?)"
        )


def _count(value: Any, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
        raise ValueError(f"{where} must be a non-negative integer (a count), got {_show(value)}")


def _text(value: Any, where: str) -> None:
    if not isinstance(value, str):
        raise ValueError(f"{where} must be a string, got {_show(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate ("\ud800" in the JSON): no terminal can print it
        raise ValueError(f"{where} is not valid Unicode text (it holds a lone surrogate)") from None


# ---------------------------------------------------------------------------------------------- wording
def _show(value: Any) -> str:
    """A short description of a JSON value for an error message (containers by kind: they may be huge)."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return _quote(value)
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 63:
        return "a negative integer" if value < 0 else "an integer beyond 2**63"
    return json.dumps(value)  # null, true, 1.5, Infinity, NaN, -3


def _quote(text: str) -> str:
    shown = text if len(text) <= _SHOWN_NAME else text[:_SHOWN_NAME] + "..."
    return json.dumps(shown)  # escapes control characters and lone surrogates


def _names(keys: Iterable[str]) -> str:
    return ", ".join(keys)
