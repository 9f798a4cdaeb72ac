"""The guard's findings as data: a :class:`GradReport` that prints as a table and round-trips through JSON."""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Union

from lightning_gradguard.core.causes import hint_for
from lightning_gradguard.files import write_atomically
from lightning_gradguard.report_schema import check_report

REPORT_FILENAME = "gradguard.json"
WARNING, NOTE = "warning", "note"  # the severities of a Finding
MIN_ZERO_STEPS = 2  # measured steps, all with an all-zero gradient, before that is a finding (see always_zero)
_NOTHING_CHECKED = (
    "the optimizers that stepped hold no parameter with requires_grad=True that allow_none leaves checked"
)


@dataclass
class ParamReport:
    """What one parameter received.

    ``steps``/``none_steps``: optimizer steps that checked it / at which it had no gradient.
    ``micro_batches``/``none_micro_batches``: micro-batches in the windows of those steps / those whose backward
    pass gave it no gradient. ``measured_steps``: checked steps at which its gradient's values were measured (its
    norm computed: every step by default, logging steps only when ``nonfinite_check`` says so);
    ``nonfinite_steps``/``zero_steps``: measured steps at which its gradient held NaN or Inf / was zero everywhere.
    ``update_steps``: checked steps at which its optimizer's ``step()`` ran; ``zero_lr_steps``: of those, steps at
    which its param group's learning rate was 0; ``version_steps``: steps at which GradGuard read its version counter
    around the step (the first two and every 50th); ``untouched_steps``: of those, steps that did not modify it.
    """

    steps: int = 0
    none_steps: int = 0
    micro_batches: int = 0
    none_micro_batches: int = 0
    measured_steps: int = 0
    nonfinite_steps: int = 0
    zero_steps: int = 0
    update_steps: int = 0
    zero_lr_steps: int = 0
    version_steps: int = 0
    untouched_steps: int = 0
    cause: Optional[str] = None
    detail: Optional[str] = None

    @property
    def missing(self) -> bool:
        """No gradient at one or more optimizer steps."""
        return self.none_steps > 0

    @property
    def intermittent(self) -> bool:
        """A gradient at every step, but not from every micro-batch of the accumulation windows."""
        return self.none_steps == 0 and self.none_micro_batches > 0

    @property
    def always_zero(self) -> bool:
        """A gradient at every step, zero everywhere at every measured step (at least ``MIN_ZERO_STEPS``, two).

        One all-zero step is common and harmless (a branch behind a zero-initialised gate at the first step, a
        batch that does not touch a sparse feature); zeros that never end train nothing.
        """
        return not self.missing and self.measured_steps >= MIN_ZERO_STEPS and self.zero_steps == self.measured_steps


@dataclass
class Finding:
    """Found by inspecting the model and optimizers rather than gradients. ``severity``: a ``"warning"`` makes
    :attr:`GradReport.ok` False; a ``"note"`` changes nothing in training (a target network no gradient reaches)."""

    kind: str  # "unregistered" | "not_in_optimizer" | "zero_lr" | "skipped_by_optimizer"
    name: str
    detail: str
    severity: str = WARNING


@dataclass
class DistributedInfo:
    """What the guard knows about a multi-process (or sharded) run; in the report only for such runs.

    ``strategy``: ``"ddp"``, ``"fsdp"``, ``"fsdp2"``, ``"deepspeed"``...; ``world_size``: the number of ranks.
    ``rank_dependent``: parameters that some ranks' backward passes reached in a micro-batch and others' did not
    (DDP), by name: ``{"ranks": [the ranks that gave it none], "micro_batches": how many such micro-batches}``;
    ``"ranks"`` is None beyond 52 ranks, where only the count is kept.
    ``unchecked``: what the guard could not check under this strategy (None when it checked everything).
    """

    strategy: str
    world_size: int
    rank_dependent: dict[str, dict[str, Any]] = field(default_factory=dict)
    unchecked: Optional[str] = None


@dataclass
class GradReport:
    """Everything the guard found in one run.

    Example::

        report = guard.report()
        for name in report.missing:
            print(name, report.params[name].cause)
        report.save("gradguard.json")

    """

    steps: int = 0
    micro_batches: int = 0
    params: dict[str, ParamReport] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    # optional parts, present in to_dict() only when they apply (16-mixed with a GradScaler; a distributed run)
    amp_skipped_steps: Optional[int] = None  # optimizer steps the AMP GradScaler skipped (gradient overflow)
    distributed: Optional[DistributedInfo] = None

    @property
    def missing(self) -> list[str]:
        """Names of parameters that had no gradient at one or more optimizer steps."""
        return [name for name, p in self.params.items() if p.missing]

    @property
    def intermittent(self) -> list[str]:
        """Names of parameters that missed some micro-batches but had a gradient at every step."""
        return [name for name, p in self.params.items() if p.intermittent]

    @property
    def nonfinite(self) -> list[str]:
        """Names of parameters whose gradient held NaN or Inf at one or more measured steps."""
        return [name for name, p in self.params.items() if p.nonfinite_steps > 0]

    @property
    def zero(self) -> list[str]:
        """Names of parameters whose gradient was zero everywhere at every measured step (see
        :attr:`ParamReport.always_zero`): they train no more than a parameter without a gradient."""
        return [name for name, p in self.params.items() if p.always_zero]

    @property
    def ok(self) -> bool:
        """True when every checked parameter received a finite gradient at every step, not zero at all of them, and
        nothing was found.

        Under an AMP GradScaler an overflowing (non-finite) gradient makes the scaler skip that step and lower the
        scale, which is how loss scaling works; it counts against ``ok`` only when the scaler skipped every step.
        """
        benign_overflow = self.amp_skipped_steps is not None and self.amp_skipped_steps < self.steps
        return not (self.missing or (self.nonfinite and not benign_overflow) or self.zero or self.warnings)

    @property
    def warnings(self) -> list[Finding]:
        """The findings that make :attr:`ok` False (every finding but the notes)."""
        return [f for f in self.findings if f.severity != NOTE]

    # ------------------------------------------------------------------ serialization
    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "steps": self.steps, "micro_batches": self.micro_batches,
            "params": {name: asdict(p) for name, p in self.params.items()},
            "findings": [asdict(f) for f in self.findings],
        }
        if self.amp_skipped_steps is not None:
            data["amp_skipped_steps"] = self.amp_skipped_steps
        if self.distributed is not None:
            data["distributed"] = asdict(self.distributed)
        return data

    @classmethod
    def from_dict(cls, data: Any) -> GradReport:
        """Rebuild a report from :meth:`to_dict` output, checking every field first.

        Raises:
            ValueError: ``data`` is not a GradGuard report; the message names the field that is wrong and what it
                accepts (counts are non-negative integers, text fields strings, no unknown fields).

        Example::

            report = GradReport.from_dict(json.loads(text))

        """
        try:
            check_report(data)
        except ValueError as err:
            raise ValueError(f"not a GradGuard report: {err}") from None
        return cls(
            steps=data["steps"], micro_batches=data["micro_batches"],
            params={name: ParamReport(**p) for name, p in data["params"].items()},
            findings=[Finding(**f) for f in data.get("findings", [])], amp_skipped_steps=data.get("amp_skipped_steps"),
            distributed=DistributedInfo(**data["distributed"]) if data.get("distributed") else None,
        )

    def to_json(self, indent: Optional[int] = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def save(self, path: Union[str, os.PathLike]) -> str:
        """Write the report as JSON; a directory gets ``gradguard.json`` inside it. Returns the file path.

        The file is written atomically: to a temporary file in the same directory, then renamed over ``path``, so a
        reader (or a run killed mid-write) never sees half a report. A symbolic link at ``path`` is replaced by the
        file; the link's target is left untouched.

        Raises:
            OSError: the file cannot be written (a read-only directory, a full disk, a parent that is a file).

        Example::

            path = report.save("lightning_logs/version_0")  # lightning_logs/version_0/gradguard.json

        """
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, REPORT_FILENAME)
        write_atomically(path, self.to_json())
        return path

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> GradReport:
        """Read a report written by :meth:`save`.

        Raises:
            OSError: the file cannot be read.
            ValueError: the file is not a GradGuard report (not JSON, or a field is wrong: see :meth:`from_dict`).

        Example::

            report = GradReport.load("lightning_logs/version_0/gradguard.json")

        """
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    # ------------------------------------------------------------------ rendering
    def summary(self, max_rows: Optional[int] = None) -> str:
        """A one-line verdict when everything is fine, otherwise the table (see :meth:`format_table`).

        Args:
            max_rows: show at most this many entries of each list (explanations, table rows, findings,
                rank-dependent parameters), each cut list ending in a line "... and N more"; ``None`` (the default)
                shows everything. The console summary at the end of a fit uses a bound, so that a model with
                thousands of parameters without a gradient prints a few dozen lines.

        Example::

            print(report.summary())  # GradGuard: all 6 trainable parameters received a gradient at each of ...

        """
        if not self.steps:
            return "GradGuard: no optimizer step was checked" + "".join(f"; {note}" for note in self._notes())
        if self.ok and not self.intermittent and not self._rank_dependent_lines():
            if not self.params:
                return (
                    f"GradGuard: nothing was checked in {self.steps} optimizer step{'s' if self.steps != 1 else ''}: "
                    f"{_NOTHING_CHECKED}" + "".join(f"; {note}" for note in self._notes())
                )
            n = len(self.params)
            if any(p.steps != self.steps for p in self.params.values()):
                # several optimizers: each parameter was checked at its own optimizer's steps only
                when = f"at every optimizer step that updated it ({self.steps} optimizer steps in all)"
            else:
                when = f"at each of {self.steps} optimizer step{'s' if self.steps != 1 else ''}"
            verdict = (
                f"GradGuard: all {n} trainable parameter{'s' if n != 1 else ''} received a gradient {when}"
                + "".join(f"; {note}" for note in self._notes())
            )
            return "\n".join([verdict, *self._finding_lines(max_rows)]) if self.findings else verdict
        return self.format_table(max_rows=max_rows)

    def format_table(self, fmt: str = "text", max_rows: Optional[int] = None) -> str:
        """The problems as a table: ``fmt`` is ``"text"`` (aligned columns) or ``"markdown"``.

        Args:
            fmt: ``"text"`` or ``"markdown"``.
            max_rows: the most entries shown of each list (see :meth:`summary`); ``None`` shows everything.

        Example::

            print(report.format_table("markdown"))

        """
        header = ["parameter", "None steps", "None micro-batches", "non-finite", "zero", "cause", "hint"]
        problems = [(name, p) for name, p in self.params.items() if _problem(p)]
        rows = [_row(name, p) for name, p in problems[:max_rows]]
        lines = [self._headline()]
        why = self.explanations(markdown=fmt == "markdown", max_lines=max_rows)
        if why:
            lines.append("Why, and where:")
            lines.extend(why)
        if rows:
            lines.append(_render(header, rows, fmt))
            if len(problems) > len(rows):
                lines.append(_more(problems[len(rows) :], "parameter"))
        lines.extend(self._finding_lines(max_rows))
        rank_lines = self._rank_dependent_lines()
        if rank_lines:
            lines.append("Rank-dependent gradients (no gradient on some ranks only):")
            lines.extend(rank_lines[:max_rows])
            if max_rows is not None and len(rank_lines) > max_rows:
                lines.append(f"- ... and {len(rank_lines) - max_rows} more parameters")
        lines.extend(f"Note: {note}" for note in self._notes())
        return "\n".join(lines)

    def explanations(self, markdown: bool = False, max_names: int = 8, max_lines: Optional[int] = None) -> list[str]:
        """One line per distinct explanation (cause and detail), naming the parameters that share it.

        Args:
            markdown: quote the names as code.
            max_names: names shown per explanation before "and N more".
            max_lines: the most explanations listed; the rest are summed up by cause in one last line.

        Example::

            for line in report.explanations():
                print(line)  # - enc.weight, enc.bias (unused): module `enc` (Linear) was never called ...

        """
        groups: dict[tuple[Optional[str], str], list[str]] = {}
        for name, p in self.params.items():
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

    def _finding_lines(self, max_rows: Optional[int]) -> list[str]:
        if not self.findings:
            return []
        tag = {NOTE: ", note"}  # a note says so: it does not count against ok
        lines = ["Findings:"] + [f"- [{f.kind}{tag.get(f.severity, '')}] {f.name}: {f.detail}"
                                 for f in self.findings[:max_rows]]
        if max_rows is not None and len(self.findings) > max_rows:
            kinds = Counter(f.kind for f in self.findings[max_rows:])
            more = ", ".join(f"{kind}: {n}" for kind, n in kinds.items())
            lines.append(f"- ... and {len(self.findings) - max_rows} more findings ({more})")
        return lines

    def _notes(self) -> list[str]:
        notes = []
        if self.amp_skipped_steps:
            notes.append(
                f"the AMP GradScaler skipped {self.amp_skipped_steps} of {self.steps} optimizer steps because a "
                "gradient overflowed (non-finite gradients at those steps are the scaler's business; it lowers "
                "the loss scale and retries)"
            )
        once = [name for name, p in self.params.items() if p.measured_steps == p.zero_steps == 1 and not p.missing]
        if once:
            shown = ", ".join(once[:8]) + (f" and {len(once) - 8} more" if len(once) > 8 else "")
            notes.append(
                f"the gradient of {shown} was zero everywhere at the one measured step (normal at the first step "
                "behind a zero-initialised gate; a dead branch if it lasts)"
            )
        if self.distributed is not None and self.distributed.unchecked:
            notes.append(self.distributed.unchecked)
        return notes

    def _rank_dependent_lines(self) -> list[str]:
        if self.distributed is None:
            return []
        lines = []
        for name, info in self.distributed.rank_dependent.items():
            ranks, count = info["ranks"], info["micro_batches"]
            if ranks is None:  # beyond 52 ranks the report keeps the count only
                where = f"some of the {self.distributed.world_size} ranks (which ones is not kept beyond 52 ranks)"
            else:
                where = f"rank{'s' if len(ranks) != 1 else ''} {', '.join(map(str, ranks))}"
            lines.append(
                f"- {name}: no gradient on {where} in {count} micro-batch{'es' if count != 1 else ''} in which "
                "other ranks gave it one"
            )
        return lines

    def _headline(self) -> str:
        parts = [f"GradGuard: {self.steps} optimizer steps, {self.micro_batches} backward passes"]
        if not self.params and self.steps:
            parts.append(f"no parameter was checked ({_NOTHING_CHECKED})")
        if self.missing:
            parts.append(f"{len(self.missing)} of {len(self.params)} parameters missed a gradient at some step")
        if self.intermittent:
            parts.append(f"{len(self.intermittent)} received one at every step but not from every micro-batch")
        if self.nonfinite:
            parts.append(f"{len(self.nonfinite)} had non-finite gradients")
        if self.zero:
            parts.append(f"{len(self.zero)} had a gradient that was zero everywhere at every measured step")
        counts = {"finding": len(self.warnings), "note": len(self.findings) - len(self.warnings)}
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
