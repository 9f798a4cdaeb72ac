"""Where a missing gradient is detected: the step check, in four named phases.

:meth:`StepChecker.check` runs right before an optimizer steps (``GradGuardEngine.check_step``):

* **gather**: the optimizer's parameters and their ``.grad`` (the read right after the last backward pass when the
  adapter knows nothing could change them since);
* **classify**: which parameters are checked (trainable, not in ``allow_none``), which have no gradient (``missing``)
  and which missed some micro-batches of the accumulation window (``intermittent``), with the causes the engine can
  tell by itself: ``cleared`` (a gradient arrived, then was gone at the step) and ``no_backward``; the healthy step
  (every gradient there, every micro-batch gave one) takes a constant-time path;
* **count**: into :class:`~lightning_gradguard.core.state.GuardState`;
* **measure**: per-parameter norms when asked (:mod:`lightning_gradguard.core.measure`), and the dashboard's
  statistics when a sink asked for them;

then the causes that need the forward pass come from the diagnosis, and strict mode decides (with the other ranks,
through the engine's observers).
"""

from __future__ import annotations

from operator import attrgetter
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
from torch import Tensor

from lightning_gradguard.core.arrivals import none_positions
from lightning_gradguard.core.causes import CLEARED, NO_BACKWARD
from lightning_gradguard.core.measure import StatsRequest, measure_stats
from lightning_gradguard.core.observer import StepCheck
from lightning_gradguard.errors import GradGuardError

if TYPE_CHECKING:
    from lightning_gradguard.core.engine import GradGuardEngine

_GRAD = attrgetter("grad")
_MAX_LISTS = 16  # derived index lists kept by identity (checked and measured subsets)
_CLEARED_DETAIL = (
    "it received a gradient in backward, but .grad was None at the optimizer step: something called zero_grad() "
    "(or set .grad = None) in between"
)
_ZEROED_DETAIL = (
    "it received a gradient in backward, but zero_grad(set_to_none=False) zeroed .grad before the optimizer step, "
    "which applied zeros instead"
)
_STALE_GRAD = "; .grad still holds a gradient from an earlier step, which the optimizer is about to apply again"
_SET_OTHERWISE_DETAIL = (
    "no backward pass through the model's output wrote gradients before this optimizer step, yet other parameters "
    "it updates had one: their .grad was set another way (assigned, for example from torch.autograd.grad; written "
    "by a backward pass of a loss that reaches the model only through torch.autograd.grad(..., create_graph=True), "
    "such as a gradient penalty; or left from an earlier step), and nothing set this one's. Fix: set its .grad as "
    "well (torch.autograd.grad over every parameter the optimizer holds, with allow_unused=True, shows which get "
    "None), or call loss.backward(); if that loss does not depend on it (an output bias under a gradient penalty), "
    "add it to allow_none for such steps"
)
_LEFTOVER_DETAIL = (
    "no backward pass gave it a gradient, but .grad is not None: it holds the zeros zero_grad(set_to_none=False) "
    "left, so the optimizer still applies it (momentum, weight decay)"
)
_ASSIGNED_DETAIL = (
    "no backward pass of its window gave it a gradient, but its .grad was assigned after the backward pass, not by "
    "autograd (a filler such as zeros or noise for parameters without a gradient, or a gradient computed by hand), "
    "and the optimizer applies that"
)
_STALE_DETAIL = (
    "no backward pass gave it a gradient, but .grad is not None: it still holds the gradient of an earlier step "
    "(no zero_grad() ran since), which the optimizer applies again"
)


class _View:
    """The gather phase's result: the optimizer's checked candidates and their gradients."""

    __slots__ = ("indices", "params", "grads", "none", "excluded", "zeroed")

    def __init__(self, indices: list[int], params: list[Tensor], grads: list[Optional[Tensor]], none: list[int]):
        self.indices = indices
        self.params = params
        self.grads = grads
        self.none = none  # positions (into indices) whose .grad is None
        self.excluded: set[int] = set()  # registry indices the classify phase found not checked (frozen)
        self.zeroed = False  # zero_grad(set_to_none=False) ran after the window's last backward pass


class StepChecker:
    """The engine's step check (see the module docstring); the engine owns one and calls :meth:`check`."""

    def __init__(self, engine: GradGuardEngine) -> None:
        self.engine = engine
        self._lists = _DerivedLists()
        self._assigned: list[int] = []  # this step's parameters whose .grad no backward pass of the window wrote

    def check(
        self,
        optimizer: torch.optim.Optimizer,
        step: int,
        accumulate: Optional[int],
        measure: bool,
        grad_scale: Optional[Tensor],
        extras: Optional[Callable[[StepCheck], Optional[StatsRequest]]],
    ) -> StepCheck:
        engine = self.engine
        view = self._gather(optimizer)
        audit = engine.optimizer_audit
        if audit.following and (audit.due or audit.version != engine.registry.layout_version):
            engine.follow_audit(optimizer)  # param groups or trainable parameters changed: three reads otherwise
        inside = engine.in_backward  # stepping from a gradient hook: the running pass belongs to this window
        if engine.windows.zeroed_after_backward(optimizer):  # every gradient is zeros (or None): none counts
            view.zeroed = True
            view.none = list(range(len(view.indices)))
        window, backwards = engine.windows.close(optimizer, running=inside)
        seen, engine.unseen = backwards - engine.unseen, False  # a pass found at the step set gradients another way
        if window > 1 and engine.late_backward:
            engine.tracker.eager_versions = True
        engine.state.steps += 1
        check = self._classify(view, step, window, backwards, accumulate, inside, seen)
        check.optimizer = optimizer
        check.measured = measure
        if check.checked:
            if measure:
                self._measure(view, check, grad_scale)
            request = extras(check) if extras is not None else None
            if request is not None:
                checked = set(check.checked)
                missing = set(check.missing)
                pairs = [(i, None if i in missing else g) for i, g in zip(view.indices, view.grads) if i in checked]
                check.stats = measure_stats(request, [i for i, _ in pairs], [g for _, g in pairs])
            self._explain(check)
        self._decide(check)
        engine.updates.before_step(optimizer, check, view.indices, view.params)  # the step goes ahead
        return check

    def _gather(self, optimizer: torch.optim.Optimizer) -> _View:
        engine = self.engine
        indices, params = engine.registry.optimizer_params(optimizer)
        engine.sync_size()
        kept, kept_none = engine.tracker.take_for_step(engine.registry.params)
        none: Optional[list[int]] = None
        if kept is not None:
            if engine.registry.is_all(indices):
                grads, none = kept, kept_none
            else:
                grads = [kept[i] for i in indices]
        else:
            grads = list(map(_GRAD, params))
        return _View(indices, params, grads, none_positions(grads) if none is None else none)

    def _classify(
        self, view: _View, step: int, window: int, backwards: int, accumulate: Optional[int], inside: bool,
        seen: int,
    ) -> StepCheck:
        engine = self.engine
        self._assigned = []
        indices, params, grads = view.indices, view.params, view.grads
        # inside a backward pass, its arrivals are not recorded yet: a gradient present now is what it gave
        tracking = engine.tracking and not inside
        if not view.none and tracking and engine.arrivals.all_arrived(window, engine.windows.optimizers <= 1):
            # the healthy step: every gradient there, every micro-batch gave every parameter one
            engine.state.add_uniform(indices, steps=1, micro_batches=window)
            return StepCheck(step, window, backwards, accumulate, indices, [], [])
        skip_empty = any(o.skip_empty_shards for o in engine.observers)
        rewritten = any(o.rewrites_grads for o in engine.observers)
        # frozen parameters (and, under FSDP1, parameters with no shard here) have no .grad by design
        frozen = [j for j in view.none if not params[j].requires_grad or (skip_empty and not params[j].numel())]
        if frozen:
            frozen_set = set(frozen)
            none = [j for j in view.none if j not in frozen_set]
        else:
            none = view.none
        if tracking:
            covers_all = engine.windows.optimizers <= 1
            zero, short = engine.arrivals.take(indices, window, covers_all)
        else:  # no backward brackets: a gradient present at the step is all that can be known
            if engine.tracking:  # the window restarts all the same
                engine.arrivals.restart(indices, engine.windows.optimizers <= 1)
            zero = [indices[j] for j in none]
            short = dict.fromkeys(zero, window) if window else {}
        zero_set = set(zero)
        missing: list[int] = []
        leftover: list[int] = []
        stale: list[int] = []
        excluded = {indices[j] for j in frozen}
        # no backward pass, yet some gradients are there: they were set some other way (torch.autograd.grad)
        set_otherwise = seen == 0 and len(view.none) < len(indices)
        for j in none:
            index = indices[j]
            missing.append(index)
            if index not in zero_set:
                engine.state.explain(index, CLEARED, _ZEROED_DETAIL if view.zeroed else _CLEARED_DETAIL)
            elif seen == 0:
                detail = _SET_OTHERWISE_DETAIL if set_otherwise else _no_backward_detail(window, engine)
                engine.state.explain(index, NO_BACKWARD, detail)
        if tracking and zero and not view.zeroed:
            position = self._positions(indices)
            for index in zero:
                j = position.get(index)
                grad = grads[j] if j is not None else None
                if grad is None:
                    continue
                if not params[j].requires_grad:  # frozen, holding an old (zeroed) gradient: not checked
                    excluded.add(index)
                elif seen == 0:
                    missing.append(index)
                    engine.state.explain(index, NO_BACKWARD, _no_backward_detail(window, engine) + _STALE_GRAD)
                elif engine.tracker.unchanged_since_backward(index, grad):
                    missing.append(index)
                    leftover.append(index)
                    known = engine.state.causes.get(index)
                    if known is None or known[0] is None:  # until a cause is known (reading values is a sync)
                        old = _holds_values(grad)
                        if old:
                            stale.append(index)
                        engine.state.explain(index, None, _STALE_DETAIL if old else _LEFTOVER_DETAIL)
                elif window and short.get(index) == window and not rewritten:  # no pass reached it; set by hand
                    missing.append(index)
                    self._assigned.append(index)  # explained after diagnosis, which may know why nothing reached it
        view.excluded = excluded
        checked = self._subset(indices, excluded) if excluded else indices
        missing_set = set(missing)
        if excluded:
            short = {i: n for i, n in short.items() if i not in excluded}
        intermittent = [i for i in short if i not in missing_set]
        # count
        engine.state.add_uniform(checked, steps=1, micro_batches=window)
        if missing:
            engine.state.add("none_steps", missing, 1)
        if short:
            engine.state.add("none_micro_batches", list(short), torch.tensor(list(short.values()), dtype=torch.int64))
        return StepCheck(
            step, window, backwards, accumulate, checked, missing, intermittent, leftover=leftover, stale=stale
        )

    def _measure(self, view: _View, check: StepCheck, grad_scale: Optional[Tensor]) -> None:
        engine = self.engine
        if not check.missing and len(check.checked) == len(view.indices):
            indices, grads = view.indices, view.grads  # every gradient is there: the lists as they are
        else:
            indices = self._subset(view.indices, view.excluded.union(check.missing))
            if not indices:
                return
            position = self._positions(view.indices)
            grads = [view.grads[position[i]] for i in indices]
        check.norms = engine.measurement.measure(indices, grads, grad_scale)  # type: ignore[arg-type]

    def _explain(self, check: StepCheck) -> None:
        engine = self.engine
        if (check.missing or check.intermittent) and engine.diagnosis is not None:
            for index, (cause, detail) in engine.diagnosis.explain(check).items():
                engine.state.explain(index, cause, detail)
        assigned, self._assigned = self._assigned, []
        for index in assigned:
            engine.state.explain(index, None, _ASSIGNED_DETAIL)
        if engine.diagnosis is not None and not engine.diagnosis.idle:
            engine.diagnosis.after_check(check)

    def _decide(self, check: StepCheck) -> None:
        engine = self.engine
        if engine.config.strict:
            for observer in engine.observers:  # shard-local or rank-dependent gradients: ranks decide together
                check.missing = observer.decide(check.missing)
        if check.missing:
            if engine.config.strict:
                engine.end_diagnosis()  # the run stops here: no instrument may outlive it
                engine.updates.stopped = True  # its end (a close() after this error) raises nothing more
                message, names = engine.describe_missing(check), engine.names(check.missing)
                raise GradGuardError(message, names, check.step, engine.report())
            new = [i for i in check.missing if i not in engine.state.warned]
            if new:
                engine.state.warned.update(new)
                engine.warn(engine.describe_missing(check, only=new))
        for observer in engine.observers:
            observer.after_check(check)

    # ------------------------------------------------------------------ derived index lists
    def _subset(self, indices: list[int], without: set[int]) -> list[int]:
        """``indices`` minus ``without``, as the same list object whenever the same subset comes back (the lazy
        counts and the norm plans are keyed by list identity)."""
        return self._lists.get(indices, frozenset(without), lambda: [i for i in indices if i not in without])

    def _positions(self, indices: list[int]) -> dict[int, int]:
        """Registry index -> position in ``indices``."""
        return self._lists.get(indices, "positions", lambda: {index: j for j, index in enumerate(indices)})


class _DerivedLists:
    """A few values derived from index lists, found again by the list's identity; bounded."""

    def __init__(self) -> None:
        self._values: dict[tuple[int, Any], tuple[list[int], Any]] = {}

    def get(self, source: list[int], kind: Any, build: Callable[[], Any]) -> Any:
        key = (id(source), kind)
        hit = self._values.get(key)
        if hit is not None and hit[0] is source:  # holding `source` keeps its id from being reused meanwhile
            return hit[1]
        if len(self._values) >= _MAX_LISTS:
            self._values.clear()
        value = build()
        self._values[key] = (source, value)
        return value


def _holds_values(grad: Tensor) -> bool:
    """Whether a gradient is not all zeros (an old gradient, rather than what zero_grad(set_to_none=False) left)."""
    try:
        values = grad.coalesce().values() if grad.is_sparse else grad
        return bool(values.detach().ne(0).any())
    except Exception:  # noqa: BLE001 - a tensor type without these operations: say what is most common
        return False


def _no_backward_detail(window: int, engine: GradGuardEngine) -> str:
    # an adapter that sees backward passes only from inside autograd knows those that reached the model, no others
    seen = "no backward pass reached the model" if engine.late_backward else "no backward pass ran"
    within = f" in the {window} micro-batch{'es' if window != 1 else ''}" if window else ""
    return f"{seen}{within} before this optimizer step ({engine.no_backward_hint})"
