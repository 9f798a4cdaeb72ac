"""Human-readable messages about missing gradients (warnings and strict-mode errors)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Optional

from lightning_gradguard.causes import DESCRIPTIONS, hint_for

if TYPE_CHECKING:
    from lightning_gradguard.engine import GradGuardEngine, StepCheck


def module_of(name: str) -> str:
    """The module path of a parameter name (``encoder.layers.0.weight`` -> ``encoder.layers.0``)."""
    return name.rpartition(".")[0] or "<root>"


def missing_message(engine: GradGuardEngine, result: StepCheck, only: Optional[Sequence[int]] = None) -> str:
    """Names every parameter without a gradient at ``result``'s step, grouped by module, with cause and fix."""
    indices = list(only) if only is not None else result.missing
    window = f"{result.window} micro-batch{'es' if result.window != 1 else ''} in this window"
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
    for module, members in by_module.items():
        lines.append(f"  {module}:")
        # parameters of one module usually share one explanation: say it once
        shared: dict[tuple[Optional[str], Optional[str]], list[str]] = defaultdict(list)
        for index in members:
            shared[engine.causes.get(index, (None, None))].append(engine.registry.names[index])
        for (cause, detail), names in shared.items():
            text = f"    {', '.join(names)}"
            if cause:
                text += f"  [{cause}] {detail or DESCRIPTIONS.get(cause, '')}"
                hint = hint_for(cause)
                if hint and "fix" not in (detail or "").lower():
                    text += f"\n      fix: {hint}"
            elif detail:
                text += f"  {detail}"
            lines.append(text)
    if only is None or len(only) == len(result.missing):
        lines.append("  (allow_none=[...] silences parameters that are legitimately unused)")
    return "\n".join(lines)
