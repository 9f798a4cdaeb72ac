"""The guard's findings as data: a :class:`GradReport` that prints as a table and round-trips through JSON."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Union

from lightning_gradguard.causes import hint_for

REPORT_FILENAME = "gradguard.json"


@dataclass
class ParamReport:
    """What one parameter received.

    ``steps``/``none_steps``: optimizer steps that checked it / at which it had no gradient.
    ``micro_batches``/``none_micro_batches``: micro-batches in the windows of those steps / those whose backward
    pass gave it no gradient. ``nonfinite_steps``: checked steps at which its gradient held NaN or Inf.
    """

    steps: int = 0
    none_steps: int = 0
    micro_batches: int = 0
    none_micro_batches: int = 0
    nonfinite_steps: int = 0
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


@dataclass
class Finding:
    """A problem found by inspecting the model and optimizers rather than gradients."""

    kind: str  # "unregistered" | "not_in_optimizer"
    name: str
    detail: str


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
        return [name for name, p in self.params.items() if p.nonfinite_steps > 0]

    @property
    def ok(self) -> bool:
        """True when every checked parameter received a finite gradient at every step and nothing was found."""
        return not (self.missing or self.nonfinite or self.findings)

    # ------------------------------------------------------------------ serialization
    def to_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "micro_batches": self.micro_batches,
            "params": {name: asdict(p) for name, p in self.params.items()},
            "findings": [asdict(f) for f in self.findings],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GradReport:
        """Rebuild a report from :meth:`to_dict` output.

        Raises:
            ValueError: ``data`` is not a GradGuard report.

        """
        try:
            return cls(
                steps=int(data["steps"]),
                micro_batches=int(data["micro_batches"]),
                params={name: ParamReport(**p) for name, p in data["params"].items()},
                findings=[Finding(**f) for f in data.get("findings", [])],
            )
        except (KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"not a GradGuard report: {err!r}") from err

    def to_json(self, indent: Optional[int] = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def save(self, path: Union[str, os.PathLike]) -> str:
        """Write the report as JSON; a directory gets ``gradguard.json`` inside it. Returns the file path."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, REPORT_FILENAME)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json())
        return path

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> GradReport:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    # ------------------------------------------------------------------ rendering
    def summary(self) -> str:
        """A one-line verdict when everything is fine, otherwise the table (see :meth:`format_table`)."""
        if not self.steps:
            return "GradGuard: no optimizer step was checked"
        if self.ok and not self.intermittent:
            n = len(self.params)
            return (
                f"GradGuard: all {n} trainable parameter{'s' if n != 1 else ''} received a gradient at each of "
                f"{self.steps} optimizer step{'s' if self.steps != 1 else ''}"
            )
        return self.format_table()

    def format_table(self, fmt: str = "text") -> str:
        """The problems as a table: ``fmt`` is ``"text"`` (aligned columns) or ``"markdown"``."""
        header = ["parameter", "None steps", "None micro-batches", "non-finite", "cause", "hint"]
        rows = []
        for name, p in self.params.items():
            if not (p.missing or p.intermittent or p.nonfinite_steps):
                continue
            hint = hint_for(p.cause) if p.missing or p.intermittent else "check the loss scale and learning rate"
            rows.append(
                [
                    name,
                    f"{p.none_steps}/{p.steps}",
                    f"{p.none_micro_batches}/{p.micro_batches}",
                    f"{p.nonfinite_steps}/{p.steps}" if p.nonfinite_steps else "0",
                    _cause_text(p),
                    hint,
                ]
            )
        lines = [self._headline()]
        if rows:
            lines.append(_render(header, rows, fmt))
        details = [
            f"- {name}: {p.detail}" for name, p in self.params.items() if p.detail and (p.missing or p.intermittent)
        ]
        if details:
            lines.append("Details:")
            lines.extend(details)
        if self.findings:
            lines.append("Findings:")
            lines.extend(f"- [{f.kind}] {f.name}: {f.detail}" for f in self.findings)
        return "\n".join(lines)

    def _headline(self) -> str:
        parts = [f"GradGuard: {self.steps} optimizer steps, {self.micro_batches} backward passes"]
        if self.missing:
            parts.append(f"{len(self.missing)} of {len(self.params)} parameters missed a gradient at some step")
        if self.intermittent:
            parts.append(f"{len(self.intermittent)} received one at every step but not from every micro-batch")
        if self.nonfinite:
            parts.append(f"{len(self.nonfinite)} had non-finite gradients")
        if self.findings:
            parts.append(f"{len(self.findings)} findings")
        return "; ".join(parts)


def _cause_text(p: ParamReport) -> str:
    if p.missing:
        when = "every step" if p.none_steps == p.steps else "some steps"
    elif p.intermittent:
        when = "some micro-batches"
    else:
        return "-"
    return f"{p.cause or 'unknown'} ({when})"


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
