"""The report as plain text: a one-line verdict when the run was healthy, otherwise the table of problems.

``GradReport.summary``, ``format_table`` and ``explanations`` call these functions, so that
:mod:`lightning_gradguard.report` holds the report's data and its JSON only. Like that module, this one needs
neither torch nor Lightning: ``gradguard report`` prints through it.

Example::

    print(format_table(GradReport.load("gradguard.json"), "markdown"))

"""

from __future__ import annotations

from collections import Counter
from typing import Optional

from lightning_gradguard.core.causes import hint_for
from lightning_gradguard.report import NOTE, GradReport, ParamReport

_NOTHING_CHECKED = (
    "the optimizers that stepped hold no parameter with requires_grad=True that allow_none leaves checked"
)


def summary(report: GradReport, max_rows: Optional[int] = None) -> str:
    """A one-line verdict when everything is fine, otherwise the table (see :meth:`GradReport.summary`)."""
    if not report.steps:
        return "GradGuard: no optimizer step was checked" + "".join(f"; {note}" for note in _notes(report))
    if report.ok and not report.intermittent and not _rank_dependent_lines(report):
        if not report.params:
            return (
                f"GradGuard: nothing was checked in {report.steps} optimizer step{'s' if report.steps != 1 else ''}: "
                f"{_NOTHING_CHECKED}" + "".join(f"; {note}" for note in _notes(report))
            )
        n = len(report.params)
        if any(p.steps != report.steps for p in report.params.values()):
            # several optimizers: each parameter was checked at its own optimizer's steps only
            when = f"at every optimizer step that updated it ({report.steps} optimizer steps in all)"
        else:
            when = f"at each of {report.steps} optimizer step{'s' if report.steps != 1 else ''}"
        verdict = (
            f"GradGuard: all {n} trainable parameter{'s' if n != 1 else ''} received a gradient {when}"
            + "".join(f"; {note}" for note in _notes(report))
        )
        return "\n".join([verdict, *_finding_lines(report, max_rows)]) if report.findings else verdict
    return format_table(report, max_rows=max_rows)


def format_table(report: GradReport, fmt: str = "text", max_rows: Optional[int] = None) -> str:
    """The problems as a table, ``fmt`` ``"text"`` or ``"markdown"`` (see :meth:`GradReport.format_table`)."""
    header = ["parameter", "None steps", "None micro-batches", "non-finite", "zero", "cause", "hint"]
    problems = [(name, p) for name, p in report.params.items() if _problem(p)]
    rows = [_row(name, p) for name, p in problems[:max_rows]]
    lines = [_headline(report)]
    why = explanations(report, markdown=fmt == "markdown", max_lines=max_rows)
    if why:
        lines.append("Why, and where:")
        lines.extend(why)
    if rows:
        lines.append(_render(header, rows, fmt))
        if len(problems) > len(rows):
            lines.append(_more(problems[len(rows) :], "parameter"))
    lines.extend(_finding_lines(report, max_rows))
    rank_lines = _rank_dependent_lines(report)
    if rank_lines:
        lines.append("Rank-dependent gradients (no gradient on some ranks only):")
        lines.extend(rank_lines[:max_rows])
        if max_rows is not None and len(rank_lines) > max_rows:
            lines.append(f"- ... and {len(rank_lines) - max_rows} more parameters")
    lines.extend(f"Note: {note}" for note in _notes(report))
    return "\n".join(lines)


def explanations(
    report: GradReport, markdown: bool = False, max_names: int = 8, max_lines: Optional[int] = None
) -> list[str]:
    """One line per distinct explanation, naming the parameters that share it (see :meth:`GradReport.explanations`)."""
    groups: dict[tuple[Optional[str], str], list[str]] = {}
    for name, p in report.params.items():
        if p.detail and (p.missing or p.intermittent or p.always_zero):
            groups.setdefault((p.cause, p.detail), []).append(name)
    items = list(groups.items())
    lines = []
    for (cause, detail), names in items[:max_lines]:
        quoted = [f"`{n}`" if markdown else n for n in names[:max_names]]
        shown = ", ".join(quoted) + (f" and {len(names) - max_names} more" if len(names) > max_names else "")
        lines.append(f"- {shown} ({cause or 'cause unknown'}): {detail}")
    if max_lines is not None and len(items) > max_lines:
        causes: Counter[str] = Counter()
        for (cause, _), names in items[max_lines:]:
            causes[cause or "cause unknown"] += len(names)
        lines.append(
            f"- ... and {len(items) - max_lines} more explanations, of "
            + ", ".join(f"{n} parameter{'s' if n != 1 else ''} ({cause})" for cause, n in causes.items())
        )
    return lines


def _finding_lines(report: GradReport, max_rows: Optional[int]) -> list[str]:
    if not report.findings:
        return []
    tag = {NOTE: ", note"}  # a note says so: it does not count against ok
    lines = ["Findings:"] + [f"- [{f.kind}{tag.get(f.severity, '')}] {f.name}: {f.detail}"
                             for f in report.findings[:max_rows]]
    if max_rows is not None and len(report.findings) > max_rows:
        kinds = Counter(f.kind for f in report.findings[max_rows:])
        more = ", ".join(f"{kind}: {n}" for kind, n in kinds.items())
        lines.append(f"- ... and {len(report.findings) - max_rows} more findings ({more})")
    return lines


def _notes(report: GradReport) -> list[str]:
    notes = []
    if report.amp_skipped_steps:
        notes.append(
            f"the AMP GradScaler skipped {report.amp_skipped_steps} of {report.steps} optimizer steps because a "
            "gradient overflowed (non-finite gradients at those steps are the scaler's business; it lowers "
            "the loss scale and retries)"
        )
    once = [name for name, p in report.params.items() if p.measured_steps == p.zero_steps == 1 and not p.missing]
    if once:
        shown = ", ".join(once[:8]) + (f" and {len(once) - 8} more" if len(once) > 8 else "")
        notes.append(
            f"the gradient of {shown} was zero everywhere at the one measured step (normal at the first step "
            "behind a zero-initialised gate; a dead branch if it lasts)"
        )
    if report.distributed is not None and report.distributed.unchecked:
        notes.append(report.distributed.unchecked)
    return notes


def _rank_dependent_lines(report: GradReport) -> list[str]:
    if report.distributed is None:
        return []
    lines = []
    for name, info in report.distributed.rank_dependent.items():
        ranks, count = info["ranks"], info["micro_batches"]
        if ranks is None:  # beyond 52 ranks the report keeps the count only
            where = f"some of the {report.distributed.world_size} ranks (which ones is not kept beyond 52 ranks)"
        else:
            where = f"rank{'s' if len(ranks) != 1 else ''} {', '.join(map(str, ranks))}"
        lines.append(
            f"- {name}: no gradient on {where} in {count} micro-batch{'es' if count != 1 else ''} in which "
            "other ranks gave it one"
        )
    return lines


def _headline(report: GradReport) -> str:
    parts = [f"GradGuard: {report.steps} optimizer steps, {report.micro_batches} backward passes"]
    if not report.params and report.steps:
        parts.append(f"no parameter was checked ({_NOTHING_CHECKED})")
    if report.missing:
        parts.append(f"{len(report.missing)} of {len(report.params)} parameters missed a gradient at some step")
    if report.intermittent:
        parts.append(f"{len(report.intermittent)} received one at every step but not from every micro-batch")
    if report.nonfinite:
        parts.append(f"{len(report.nonfinite)} had non-finite gradients")
    if report.zero:
        parts.append(f"{len(report.zero)} had a gradient that was zero everywhere at every measured step")
    counts = {"finding": len(report.warnings), "note": len(report.findings) - len(report.warnings)}
    parts += [f"{n} {noun}{'s' if n != 1 else ''}" for noun, n in counts.items() if n]
    return "; ".join(parts)


def _problem(p: ParamReport) -> bool:
    return p.missing or p.intermittent or bool(p.nonfinite_steps) or p.always_zero


def _cause_text(p: ParamReport) -> str:
    if p.missing:
        when = "every step" if p.none_steps == p.steps else "some steps"
    elif p.intermittent:
        when = "some micro-batches"
    elif p.always_zero:
        when = "every measured step"
    else:
        return "-"
    return f"{p.cause or 'unknown'} ({when})"


def _row(name: str, p: ParamReport) -> list[str]:
    if not (p.missing or p.intermittent or p.always_zero):
        hint = "check the loss scale and learning rate"
    elif p.detail and "fix" in p.detail.lower():
        hint = "see above"
    else:
        hint = hint_for(p.cause)
    measured = p.measured_steps or p.steps  # reports written before measured_steps was kept
    nonfinite = f"{p.nonfinite_steps}/{measured}" if p.nonfinite_steps else "0"
    zero = f"{p.zero_steps}/{measured}" if p.zero_steps else "0"
    return [name, f"{p.none_steps}/{p.steps}", f"{p.none_micro_batches}/{p.micro_batches}", nonfinite, zero,
            _cause_text(p), hint]


def _more(rest: list[tuple[str, ParamReport]], noun: str) -> str:
    """The line that ends a cut table: how many rows are left out, and of what kind."""
    missing = sum(p.missing for _, p in rest)
    intermittent = sum(p.intermittent for _, p in rest)
    zero = sum(p.always_zero for _, p in rest)
    kinds = [f"{missing} missed a gradient at some step" if missing else "",
             f"{intermittent} in some micro-batches" if intermittent else "",
             f"{zero} with a gradient zero at every measured step" if zero else ""]
    others = len(rest) - missing - intermittent - zero
    if others:
        kinds.append(f"{others} with non-finite gradients only")
    detail = "; ".join(k for k in kinds if k)
    return f"... and {len(rest)} more {noun}{'s' if len(rest) != 1 else ''} ({detail})"


def _render(header: list[str], rows: list[list[str]], fmt: str) -> str:
    if fmt == "markdown":
        out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
        return "\n".join(out)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    widths[-1] = len(header[-1])  # the hint column is last and not padded
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(out)
