"""What one optimizer step looked like (:class:`StepCheck`), and how a strategy or a precision plugin takes part in
the engine's protocol (:class:`EngineObserver`) without touching its state."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from lightning_gradguard.core.measure import StepStats
    from lightning_gradguard.core.norms import NormGroup
    from lightning_gradguard.report import GradReport


@dataclass
class StepCheck:
    """What one optimizer step looked like. Indices are registry indices.

    Attributes:
        step: the global step (for messages and logs).
        window: micro-batches since this optimizer's previous step.
        backwards: backward passes in that window.
        accumulate: the ``accumulate_grad_batches`` in effect, when the adapter knows it.
        checked: the parameters this step checked (the optimizer's trainable parameters, minus ``allow_none``).
        missing: no gradient at this step.
        intermittent: a gradient at the step, but some micro-batches of the window gave none.
        norms: ``(registry indices, NormGroup)`` pairs when the step was measured (values still on the device).
        leftover: missing parameters whose ``.grad`` still holds an old tensor no backward pass touched.
        stale: those of them whose old tensor is not zeros (no ``zero_grad`` since: an old gradient applied again);
            known the first time a parameter is a leftover.
        optimizer: the optimizer that is about to step.
        measured: norms were asked for at this step (every rank asks at the same steps).
        stats: what a sink asked to be measured beyond the norms (the dashboard's pictures), when it did.

    """

    step: int
    window: int
    backwards: int
    accumulate: Optional[int]
    checked: list[int]
    missing: list[int]
    intermittent: list[int]
    norms: list[tuple[list[int], NormGroup]] = field(default_factory=list)
    leftover: list[int] = field(default_factory=list)
    stale: list[int] = field(default_factory=list)
    optimizer: Any = None
    measured: bool = False
    stats: Optional[StepStats] = None


class EngineObserver:
    """A participant in the engine's step protocol; override what you need and register it with
    :meth:`~lightning_gradguard.core.engine.GradGuardEngine.observe`.

    The distributed ledger (:class:`~lightning_gradguard.training.distributed.RankLedger`) is one: it watches each
    backward pass's arrivals, takes the strict-mode decision together with the other ranks, and adds the ranks'
    view to the report.

    Attributes:
        skip_empty_shards: a parameter with no elements on this rank (a sharded parameter whose shard is elsewhere)
            is not checked on this rank.
        rewrites_grads: the strategy writes ``.grad`` after the backward pass (DDP's averaged gradients): a gradient
            no backward pass of this rank wrote is not one set by hand.

    """

    skip_empty_shards = False
    rewrites_grads = False  # DDP: the reducer writes gradients after the backward pass, not by autograd

    def after_backward(self, micro_batch: int, missed: Sequence[int]) -> None:
        """A backward pass of ``micro_batch`` gave no gradient to ``missed`` (registry indices)."""

    def after_check(self, check: StepCheck) -> None:
        """A step was checked (and was not stopped by strict mode)."""

    def decide(self, missing: list[int]) -> list[int]:
        """Strict mode, at every step: the parameters to raise for. Ranks must answer alike (a collective)."""
        return missing

    def add_to_report(self, report: GradReport) -> None:
        """Add what this observer knows to a report being built."""
