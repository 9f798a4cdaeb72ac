"""Human-readable messages about missing gradients (warnings and strict-mode errors)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Optional

from lightning_gradguard.core.causes import DESCRIPTIONS, hint_for
from lightning_gradguard.report import NOTE, Finding

if TYPE_CHECKING:
    from lightning_gradguard.core.engine import GradGuardEngine, StepCheck


def module_of(name: str) -> str:
    """The module path of a parameter name (``encoder.layers.0.weight`` -> ``encoder.layers.0``)."""
    return name.rpartition(".")[0] or "<root>"


_MAX_GROUPS = 20  # module blocks (or explanations) a message lists before it summarizes
_MAX_NAMES = 8  # names shown per explanation in the summarized form


def _explained(engine: GradGuardEngine, indices: Sequence[int], indent: str, limit: Optional[int] = None) -> list[str]:
    """Lines naming ``indices`` with their explanation; parameters that share one are named together."""
    shared: dict[tuple[Optional[str], Optional[str]], list[str]] = defaultdict(list)
    for index in indices:
        shared[engine.state.causes.get(index, (None, None))].append(engine.registry.names[index])
    lines = []
    items = list(shared.items())
    for (cause, detail), names in items[:limit]:
        shown = names if limit is None else names[:_MAX_NAMES]
        text = f"{indent}{', '.join(shown)}"
        if len(shown) < len(names):
            text += f" and {len(names) - len(shown)} more"
        if cause:
            text += f"  [{cause}] {detail or DESCRIPTIONS.get(cause, '')}"
            hint = hint_for(cause)
            if hint and "fix" not in (detail or "").lower():
                text += f"\n{indent}  fix: {hint}"
        elif detail:
            text += f"  {detail}"
        lines.append(text)
    if limit is not None and len(items) > limit:
        rest = sum(len(names) for _, names in items[limit:])
        lines.append(f"{indent}... and {rest} more parameters with {len(items) - limit} other explanations "
                     "(guard.report() lists them all)")
    return lines


def missing_message(engine: GradGuardEngine, result: StepCheck, only: Optional[Sequence[int]] = None) -> str:
    """Names every parameter without a gradient at ``result``'s step, grouped by module, with cause and fix."""
    indices = list(only) if only is not None else result.missing
    if result.window:
        window = f"{result.window} micro-batch{'es' if result.window != 1 else ''} in this window"
    else:  # a loop whose micro-batches start at their backward pass, and none reached the model
        window = "no micro-batch since the previous step"
    if result.accumulate is not None:
        window += f", accumulate_grad_batches={result.accumulate}"
    n = len(indices)
    lines = [
        f"GradGuard: {n} trainable parameter{'s' if n != 1 else ''} received no gradient at global step "
        f"{result.step} ({window}):"
    ]
    by_module: dict[str, list[int]] = defaultdict(list)
    for index in indices:
        by_module[module_of(engine.registry.names[index])].append(index)
    if len(by_module) <= _MAX_GROUPS:
        for module, members in by_module.items():
            lines.append(f"  {module}:")
            lines.extend(_explained(engine, members, indent="    "))
    else:  # a big model: one line per distinct explanation, not one block per module
        lines.extend(_explained(engine, indices, indent="  ", limit=_MAX_GROUPS))
    if only is None or len(only) == len(result.missing):
        lines.append("  (allow_none=[...] silences parameters that are legitimately unused)")
    return "\n".join(lines)


def unmatched_pattern_message(pattern: str, names: Sequence[str]) -> str:
    """The warning for an ``allow_none`` pattern that matches no parameter (a typo silences nothing), naming the
    parameter names closest to it."""
    import difflib

    close = difflib.get_close_matches(pattern, names, n=3, cutoff=0.4)
    if not close:  # a pattern like "unsued.*" is closer to a module path than to a full parameter name
        modules = sorted({module_of(name) for name in names})
        near = difflib.get_close_matches(pattern.rstrip("*").rstrip("."), modules, n=3, cutoff=0.4)
        close = [name for module in near for name in names if module_of(name) == module][:3]
    if close:
        hint = f"The closest parameter names: {', '.join(close)}."
    else:
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        hint = f"The parameter names look like: {shown}." if names else "The model has no parameter."
    return (
        f"GradGuard: the allow_none pattern {pattern!r} matches no parameter of this model, so it silences nothing. "
        f"{hint} Patterns are fnmatch patterns matched against the whole name (e.g. 'heads.optional.*')."
    )


def zero_detail(steps: int) -> str:
    """The explanation of a gradient that was zero everywhere at each of ``steps`` measured steps."""
    return (
        f"its gradient was there but exactly zero everywhere at all {steps} measured steps, so the optimizer never "
        "moves it (beyond weight decay): something downstream multiplies its contribution by zero (a mask, or a gate "
        "or scale that sits at zero and is not trained), the units it feeds never activate (a ReLU layer whose "
        "inputs are always negative passes no gradient back), or the loss does not depend on it (a bias whose shift "
        "cancels out, such as a WGAN critic's output bias in D(fake).mean() - D(real).mean(): harmless there, and "
        "allow_none silences it)"
    )


def fsdp_zero_detail(steps: int) -> str:
    """:func:`zero_detail` under FSDP, where an unused parameter shows as zeros (not None)."""
    return (
        "under FSDP a parameter that no forward pass used gets a zero gradient, not None, when other parameters of "
        f"its FSDP unit were used; its gradient was zero everywhere at all {steps} measured steps, so most likely it "
        "is unused: call its module in forward, remove it, or add its name to allow_none if it is optional (a zero "
        "factor downstream, or units that never activate, look the same)"
    )


SKIPPED_BATCHES = "skipped_batches"  # the kind of the note about steps after batches skipped on purpose
NEVER_STEPPED = "never_stepped"  # the kind of the note about parameters only optimizers that never stepped hold


def skipped_batches_note(steps: int, reason: str, advice: str = "") -> Finding:
    """The note for ``steps`` optimizer steps whose batches the training loop skipped on purpose (``reason``;
    ``advice``: what to do if that is not meant to happen)."""
    plural = "s" if steps != 1 else ""
    return Finding(SKIPPED_BATCHES, "training loop", (
        f"{steps} optimizer step{plural} came after batches that ran no backward pass because {reason}, after "
        f"earlier batches of the run had trained: no gradient was computed for {'them' if plural else 'it'} and no "
        f"weight changed, so {'they are' if plural else 'it is'} not counted as missing gradients."
        + (f" {advice}" if advice else "")
    ), severity=NOTE)


def never_stepped_note(optimizers: Sequence[str], names: Sequence[str], with_grad: int, steps: int) -> Finding:
    """The note for the parameters ``names`` that only ``optimizers`` (which never stepped in a run of ``steps``
    checked steps) update; ``with_grad`` of them hold a gradient at the end of the run."""
    n = len(names)
    shown = ", ".join(names[:8]) + (f" and {n - 8} more" if n > 8 else "")
    them, are = ("it", "is") if n == 1 else ("they", "are")
    one = len(optimizers) == 1
    which = " and ".join(optimizers) if len(optimizers) <= 2 else f"{len(optimizers)} optimizers"
    held = f"; {with_grad} of them hold{'s' if with_grad == 1 else ''} a gradient never applied" if with_grad else ""
    were = "was" if steps == 1 else "were"
    return Finding(NEVER_STEPPED, "optimizers", (
        f"{n} trainable parameter{'s' if n != 1 else ''} ({shown}) {are} updated only by {which}, which never "
        f"stepped in this run while {steps} optimizer step{'s' if steps != 1 else ''} of the others {were} checked: "
        f"{them} never changed{held}. If that is not meant, make {'it' if one else 'them'} step (a forgotten "
        "step() call; or a step in a gradient hook, which never runs for a parameter whose gradient never comes)."
    ), severity=NOTE)
