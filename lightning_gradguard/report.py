"""The guard's findings as data: a :class:`GradReport` that round-trips through JSON.

It prints as a table through :mod:`lightning_gradguard.report_table`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Union

from lightning_gradguard.files import write_atomically
from lightning_gradguard.report_schema import check_report

REPORT_FILENAME = "gradguard.json"
WARNING, NOTE = "warning", "note"  # the severities of a Finding
MIN_ZERO_STEPS = 2  # measured steps, all with an all-zero gradient, before that is a finding (see always_zero)


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

    # "unregistered" | "not_in_optimizer" | "zero_lr" | "skipped_by_optimizer" | "skipped_batches" | "never_stepped"
    kind: str
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

    # ------------------------------------------------------------------ rendering (report_table.py)
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
        # imported here: report_table imports this module for the dataclasses
        from lightning_gradguard import report_table

        return report_table.summary(self, max_rows)

    def format_table(self, fmt: str = "text", max_rows: Optional[int] = None) -> str:
        """The problems as a table: ``fmt`` is ``"text"`` (aligned columns) or ``"markdown"``.

        Args:
            fmt: ``"text"`` or ``"markdown"``.
            max_rows: the most entries shown of each list (see :meth:`summary`); ``None`` shows everything.

        Example::

            print(report.format_table("markdown"))

        """
        from lightning_gradguard import report_table

        return report_table.format_table(self, fmt, max_rows)

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
        from lightning_gradguard import report_table

        return report_table.explanations(self, markdown, max_names, max_lines)
