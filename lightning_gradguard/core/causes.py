"""Why a parameter does not learn: the cause vocabulary, with a fix hint for each.

The engine assigns ``cleared`` and ``no_backward`` from its own bookkeeping; ``unused``, ``no_grad`` and
``detached`` come from the diagnosis instruments (:mod:`lightning_gradguard.core.diagnosis`); ``zero`` (a gradient
that is there but zero everywhere at every measured step) from the counts, when the report is made.
"""

from __future__ import annotations

from typing import Optional

UNUSED = "unused"
NO_GRAD = "no_grad"
DETACHED = "detached"
CLEARED = "cleared"
NO_BACKWARD = "no_backward"
ZERO = "zero"

CAUSES = (UNUSED, NO_GRAD, DETACHED, CLEARED, NO_BACKWARD, ZERO)

HINTS: dict[str, str] = {
    UNUSED: "call the module in forward (or remove it), or add its name to allow_none if it is optional",
    NO_GRAD: "run that code outside torch.no_grad()/torch.inference_mode(); for reentrant checkpointing pass "
    "use_reentrant=False",
    DETACHED: "keep the tensor in the graph: drop the .detach()/.data/.item() round trip on the way to the loss",
    CLEARED: "call zero_grad() before backward or after optimizer.step(), never between backward and step",
    NO_BACKWARD: "run a backward pass on a loss computed from the model before the optimizer steps (Lightning: "
    "return the loss from training_step, or call manual_backward)",
    ZERO: "find what zeroes its output's gradient: a mask or a zero factor downstream, or units that never activate "
    "(dead ReLUs: lower the learning rate, or use LeakyReLU/GELU); if the loss cannot depend on it (a bias that "
    "cancels out), allow_none",
}

DESCRIPTIONS: dict[str, str] = {
    UNUSED: "took no part in the forward pass",
    NO_GRAD: "was used while autograd was off",
    DETACHED: "was used, but its path to the loss was cut",
    CLEARED: "received a gradient in backward that was cleared before the optimizer step",
    NO_BACKWARD: "no backward pass ran before the optimizer step",
    ZERO: "received a gradient that was zero everywhere at every measured step",
}


def hint_for(cause: Optional[str]) -> str:
    """The fix hint for a cause, or an empty string when the cause is unknown."""
    return HINTS.get(cause or "", "")
