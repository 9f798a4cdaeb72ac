"""The text of each cause: what happened to the parameter, at which line of the user's code, and the fix.

A reason found by :mod:`~lightning_gradguard.core.diagnosis.analysis` becomes a ``(cause, detail)`` pair, in
this order of preference: behind a recorded cut (``detached``, or ``no_grad`` when the cut was autograd being off;
the user's line is named), used with autograd on but its result never reached the loss (``unused``), its module ran
but never used it (``unused``), its module ran only with autograd off (``no_grad``), its module never ran
(``unused``). Inside ``torch.compile``'d code the cause is ``None``: unknown, never guessed.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from lightning_gradguard.core.causes import DETACHED, NO_GRAD, UNUSED
from lightning_gradguard.core.diagnosis.analysis import ENTERED, EVENT, NONE_BACK, USED, Reason
from lightning_gradguard.core.diagnosis.locations import Frame, definition_site, grad_disabling_statement, location
from lightning_gradguard.core.diagnosis.model_map import ModelMap
from lightning_gradguard.core.diagnosis.recording import DATA, DETACH, INTEGER, NUMBER, Event
from lightning_gradguard.core.diagnosis.recording import NO_GRAD as NO_GRAD_USE

_NUMBER_TEXT = {
    "item": ".item() turns it into a Python number",
    "tolist": ".tolist() turns it into Python numbers",
    "numpy": ".numpy() turns it into a NumPy array",
    "float": "float() turns it into a Python number",
    "int": "int() turns it into a Python number",
    "index": "using it as an index turns it into a Python number",
}
UNDIAGNOSED = (
    "GradGuard could not diagnose the cause: the backward passes it watched after the parameter first went missing "
    "gave it a gradient (or the run ended first)"
)
LEFTOVER_NOTE = (
    "Why .grad is not None: no backward pass touched it, but it still holds the zeros zero_grad(set_to_none=False) "
    "left, since it zeroes gradients instead of deleting them (the optimizer still applies them: momentum, weight "
    "decay)."
)


# the fix named for a reentrant checkpoint segment; an adapter whose framework turns checkpointing on itself names
# that framework's switch instead (Diagnosis.checkpoint_fix)
CHECKPOINT_FIX = "pass use_reentrant=False to checkpoint (recommended), or make one of its inputs require grad"

def render(
    index: int, name: str, reason: Reason, model_map: ModelMap, checkpoint_fix: str = CHECKPOINT_FIX
) -> tuple[Optional[str], str]:
    """``(cause, detail)`` for the parameter ``name`` (registry ``index``) missed for ``reason``.

    ``checkpoint_fix``: the fix named for a reentrant checkpoint segment (an adapter whose framework turns
    checkpointing on itself names that framework's switch).
    """
    tag, payload = reason
    if tag == EVENT:
        return _render_event(payload, checkpoint_fix)
    if tag == ENTERED:  # used with autograd on, its result then went into a no-grad block
        what = "it was used with autograd on, but its result was then used with autograd off"
        return NO_GRAD, _no_grad_text(what, payload.frames, payload.checkpoint, payload.inference, checkpoint_fix)
    if tag == NONE_BACK:
        node, function, compiled = payload
        if compiled:
            return None, (
                f"it was used with autograd on and the backward pass reached it, but its gradient came back None from "
                f"compiled code (`{node}`, torch.compile), where GradGuard cannot tell a result left out of the loss "
                "from a detached one. Run a few steps without compiling to see the cause and the line."
            )
        if function is not None:
            return DETACHED, (
                f"it was used with autograd on and the backward pass reached it, but its gradient came back None "
                f"from `{node}`: the backward of the custom torch.autograd.Function `{function}` returns None for "
                "this input. Fix: return its gradient from that backward (or do not pass it to the Function if it "
                "should not train)."
            )
        return DETACHED, (
            f"it was used with autograd on and its path to the loss is intact, but no gradient came to it from "
            f"`{node}`, the operation that consumes it: the backward pass was limited to other tensors "
            "(backward(inputs=...)), or a backward hook replaced its gradient with None. Fix: include it in inputs=, "
            "or return its gradient from the hook."
        )
    owners = model_map.owners.get(index, [])
    where = " and ".join(str(o) for o in owners) if owners else "the model"
    if tag == USED and payload:
        first = owners[0].name if owners and owners[0].name else None
        silence = f"add '{first}.*' to allow_none" if first else f"add {name!r} to allow_none"
        return UNUSED, (
            f"{where} used it with autograd on, but only while the model was in eval mode, and that result never "
            "reached the loss: if that was an evaluation pass that left autograd on, the parameter takes no part in "
            f"training ({silence} if it is for evaluation only, and run evaluation under torch.no_grad()); if the "
            "model trains in eval mode, use that output in the loss, or remove the computation."
        )
    if tag == USED:
        return UNUSED, (
            f"{where} used it with autograd on, but that result never reached the loss (it was computed, "
            "then left out). Fix: use that output in the loss, or remove the computation."
        )
    runs: dict[int, list[Any]] = payload
    replaced = _replaced_text(model_map, index, name)
    if replaced is not None:
        return UNUSED, replaced
    ran = [o for o in owners if runs.get(o.module_id, (0, 0))[0]]
    ran_without_grad = [o for o in owners if runs.get(o.module_id, (0, 0))[1]]
    root = model_map.root
    if ran:
        if model_map.trace_cuts:
            return UNUSED, (
                f"{ran[0]} ran, but its forward never used `{name}`{_defined(root, name)}. Fix: use it in "
                "forward, or remove it."
            )
        return None, (
            f"{ran[0]} ran with autograd on, but `{name}` never reached the loss; inside compiled code "
            "(torch.compile, TorchScript) GradGuard cannot tell a result left out of the loss from a detached one. "
            "Run a few steps without compiling to see the cause and the line."
        )
    if ran_without_grad:
        owner = ran_without_grad[0]
        found, inference = runs[owner.module_id][2] or (None, False)
        frames, checkpoint = found if found is not None else ([], None)
        return NO_GRAD, _no_grad_text(f"{owner} ran with autograd off", frames, checkpoint, inference, checkpoint_fix)
    if owners and all(o.opaque for o in owners):
        return None, (
            f"{where} is inside compiled code (torch.compile, TorchScript), where GradGuard cannot see whether it "
            "ran or what became of its output. Run a few steps without compiling to see the cause."
        )
    named = [o for o in owners if o.name]
    if not owners and root is not None:  # only an optimizer holds it: the model has no module that owns it
        return UNUSED, _orphan_text(model_map, index)
    if not named:
        return UNUSED, (
            f"nothing in the forward pass used it (a parameter of the model itself{_defined(root, name)}). Fix: "
            f"use it in forward, remove it, or add {name!r} to allow_none if it is optional."
        )
    owner = named[0]
    return UNUSED, (
        f"{owner}{_defined(root, owner.name, ',')} was never called in the forward pass: it is registered, but "
        f"no code path of this step ran it. Fix: call it in forward, remove it, or add '{owner.name}.*' to "
        "allow_none if it is optional."
    )


def _orphan_text(model_map: ModelMap, index: int) -> str:
    params = model_map.engine.registry.params
    shape = f" of shape {list(params[index].shape)}" if index < len(params) else ""
    return (
        f"a tensor{shape} that an optimizer updates but that is not a parameter of the model GradGuard watches, and "
        "nothing in the forward pass used it. Most often it is what remains of a layer or parameter replaced after "
        "the optimizer was created (`model.fc = nn.Linear(...)` after building the optimizer): the optimizer still "
        "holds the old tensor and not its replacement. Fix: create the optimizer after the last change to the "
        "model (or add the new parameters with add_param_group); if the tensor belongs to another model, that "
        "model's forward pass is not watched here."
    )


def _replaced_text(model_map: ModelMap, index: int, name: str) -> Optional[str]:
    """The text for a parameter whose name in the model now holds another tensor, or None."""
    root, params = model_map.root, model_map.engine.registry.params
    if root is None or index >= len(params):
        return None
    try:
        current = root.get_parameter(name)
    except (AttributeError, TypeError, ValueError, RuntimeError):  # a wrapper's naming, no longer a parameter,
        return None  # or a ScriptModule (which has no get_parameter): no claim
    if current is params[index]:
        return None
    if model_map.engine.registry.find(current) is not None:  # an optimizer was given the new tensor too
        return (
            f"`{name}` was replaced after GradGuard and the optimizer took it: the model now holds a new tensor "
            "under that name, which an optimizer also updates, while an optimizer still holds the old one, which "
            "nothing uses. Fix: build the optimizer after the last change to the model, or leave the old tensor out."
        )
    return (
        f"`{name}` was replaced after GradGuard and the optimizer took it: the model now holds a new tensor under "
        "that name, which the forward pass uses and no optimizer updates, while the optimizer updates the old one, "
        "which nothing uses. Most often a parameter created in forward (`self.w = nn.Parameter(...)` there) or a "
        "layer re-created after the optimizer was built. Fix: create parameters once, in __init__ (change their "
        "values in place under torch.no_grad()), and build the optimizer after the last change to the model."
    )


STALE_NOTE = (
    "Why .grad is not None: no backward pass touched it, but it still holds the gradient of an earlier step, "
    "because no zero_grad() ran since: the optimizer applies that old gradient again at every step."
)


def with_leftover_note(detail: Optional[str], stale: bool = False) -> str:
    """``detail`` followed by why the parameter's ``.grad`` still holds a tensor (``stale``: an old gradient, not
    the zeros of ``zero_grad(set_to_none=False)``)."""
    note = STALE_NOTE if stale else LEFTOVER_NOTE
    return f"{detail} {note}" if detail else note


def undiagnosed(detail: Optional[str]) -> Optional[str]:
    """``detail`` saying that the window reopened for this parameter found nothing; None if it already says so."""
    if detail is not None and UNDIAGNOSED in detail:
        return None
    return f"{detail} {UNDIAGNOSED}." if detail else f"{UNDIAGNOSED}."


def _defined(root: Optional[torch.nn.Module], dotted_name: str, separator: str = "") -> str:
    """``, defined at model.py:12 in __init__: `...``, or an empty string when the source is not known."""
    site = definition_site(root, dotted_name) if root is not None else None
    if site is None:
        return ""
    return f", defined at {site}{separator}"


def _render_event(event: Event, checkpoint_fix: str) -> tuple[str, str]:
    where = str(location(event.frames[0])) if event.frames else "a call outside your code"
    if event.kind == NO_GRAD_USE:
        frames, checkpoint, inference = event.frames, event.checkpoint, event.inference
        return NO_GRAD, _no_grad_text("it was used with autograd off", frames, checkpoint, inference, checkpoint_fix)
    cut = f"it was used with autograd on, but its path to the loss was cut at {where}: "
    if event.kind == DETACH:
        return DETACHED, cut + (
            ".detach() returns a tensor without autograd history. Fix: drop the .detach() on the way to the loss "
            "(detach only what you log or carry across batches)."
        )
    if event.kind == DATA:
        return DETACHED, cut + ".data returns the values without autograd history. Fix: use the tensor, not .data."
    if event.kind == NUMBER:
        return DETACHED, cut + (
            f"{_NUMBER_TEXT.get(event.op, 'it became a Python value')}, which carries no gradient, and a tensor "
            "rebuilt from it (torch.tensor(...)) starts a new graph. Fix: keep it a tensor all the way to the loss."
        )
    if event.kind == INTEGER:
        return DETACHED, cut + (
            f"`{event.op}` returns an integer or boolean tensor, which carries no gradient. Fix: use a "
            "differentiable stand-in (softmax weights instead of argmax, a float mask instead of a comparison, "
            ".float() instead of .long())."
        )
    return DETACHED, cut + (
        f"`{event.op}` returns a result without autograd history. Fix: reach the loss through differentiable "
        "operations."
    )


def _no_grad_text(
    what: str, frames: list[Frame], checkpoint: Optional[int], inference: bool, checkpoint_fix: str
) -> str:
    if checkpoint is not None:
        return (
            f"{what} inside a reentrant torch.utils.checkpoint segment, called at {location(frames[checkpoint])}: "
            "none of the segment's inputs required grad, so it ran without autograd and its output carries no "
            f"gradient. Fix: {checkpoint_fix}."
        )
    block = "torch.inference_mode()" if inference else "torch.no_grad()"
    statement = grad_disabling_statement(frames)
    if statement is not None:
        used = location(frames[0]) if frames else None
        at = f" (used at {used})" if used is not None and used.lineno != statement.lineno else ""
        return (
            f"{what}, inside {statement}{at}. Fix: move the code that needs a gradient out of that block (or wrap "
            "it in torch.enable_grad())."
        )
    used_at = f" at {location(frames[0])}" if frames else ""
    return (
        f"{what}{used_at} (inside {block} or another autograd-disabling context). Fix: run that code with autograd "
        "on."
    )
