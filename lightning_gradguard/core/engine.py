"""The framework-free core: where a missing gradient is detected.

Adapters (the Lightning callback, Fabric, a plain loop) translate their hooks into four calls:

* :meth:`GradGuardEngine.start_micro_batch` when a training batch begins,
* :meth:`GradGuardEngine.before_backward` / :meth:`GradGuardEngine.after_backward` around each backward pass,
* :meth:`GradGuardEngine.check_step` right before ``optimizer.step()``.

The step check runs in four named phases: **gather** (the optimizer's parameters and their ``.grad``), **classify**
(which are checked, missing or intermittent, and the engine's own causes: ``cleared``, ``no_backward``), **count**
(:mod:`~lightning_gradguard.core.state`) and **measure** (:mod:`~lightning_gradguard.core.measure`, only when asked).
Causes that need the forward pass come from :mod:`~lightning_gradguard.core.diagnosis`. Everything per step reads
host-side metadata (``.grad is None``, ``requires_grad``, version counters); gradient values are read only by the
norm kernels, whose results stay on the device.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import fields
from operator import attrgetter
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from lightning_gradguard.config import GuardConfig
from lightning_gradguard.core.arrivals import ArrivalTracker, none_positions
from lightning_gradguard.core.audit import AUDIT_KINDS, NOT_IN_OPTIMIZER, OptimizerAudit, find_unregistered
from lightning_gradguard.core.causes import CLEARED, NO_BACKWARD
from lightning_gradguard.core.diagnosis import Diagnosis
from lightning_gradguard.core.measure import Measurement, StatsRequest, measure_stats
from lightning_gradguard.core.observer import EngineObserver, StepCheck
from lightning_gradguard.core.registry import ParamRegistry
from lightning_gradguard.core.state import GuardState
from lightning_gradguard.core.windows import ArrivalCounts, Windows
from lightning_gradguard.errors import GradGuardError, GradGuardWarning
from lightning_gradguard.report import NOTE, Finding, GradReport, ParamReport

_GRAD = attrgetter("grad")
_MAX_LISTS = 16  # derived index lists kept by identity (checked and measured subsets)
_CLEARED_DETAIL = (
    "it received a gradient in backward, but .grad was None at the optimizer step: something called zero_grad() "
    "(or set .grad = None) in between"
)
_LEFTOVER_DETAIL = (
    "no backward pass gave it a gradient, but .grad is not None: it holds a tensor left by "
    "zero_grad(set_to_none=False) (or an earlier step), so the optimizer still applies it (momentum, weight decay)"
)


class _View:
    """The gather phase's result: the optimizer's checked candidates and their gradients."""

    __slots__ = ("indices", "params", "grads", "none", "excluded")

    def __init__(self, indices: list[int], params: list[Tensor], grads: list[Optional[Tensor]], none: list[int]):
        self.indices = indices
        self.params = params
        self.grads = grads
        self.none = none  # positions (into indices) whose .grad is None
        self.excluded: set[int] = set()  # registry indices the classify phase found not checked (frozen)


class GradGuardEngine:
    """Detects, counts and explains missing gradients; knows nothing of Lightning.

    Args:
        config: validated settings.
        warn: called with a message when a parameter first misses a gradient outside strict mode (adapters pass
            a rank-zero warning).
        micro_batch_per_backward: every backward pass starts a micro-batch (loops that never call
            :meth:`start_micro_batch`).

    Example::

        engine = GradGuardEngine(GuardConfig())
        engine.bind(model.named_parameters(), module=model)
        engine.start_micro_batch(); engine.before_backward(loss)
        loss.backward()
        engine.after_backward()
        engine.check_step(optimizer, step=0)
        optimizer.step()

    """

    def __init__(
        self,
        config: GuardConfig,
        warn: Optional[Callable[[str], None]] = None,
        *,
        micro_batch_per_backward: bool = False,
    ) -> None:
        self.config = config
        self.warn: Callable[[str], None] = warn or _default_warn
        self.micro_batch_per_backward = micro_batch_per_backward
        self.registry = ParamRegistry(config.allow_none)
        self.state = GuardState()
        self.windows = Windows()
        self.measurement = Measurement(self.state, config.norm_type)
        self.findings: list[Finding] = []
        self.module: Optional[torch.nn.Module] = None
        self.diagnosis: Optional[Diagnosis] = None  # created by bind(module=...): explains unused/no_grad/detached
        self._tracker = ArrivalTracker()
        self._arrivals = ArrivalCounts()
        self._observers: list[EngineObserver] = []
        self._tracking = False  # True once a before/after backward bracket was seen
        self._in_backward = False
        self._reuse_read = False
        self._marked = False  # mark_gradients() took the snapshot the next backward pass is compared with
        self._lists = _DerivedLists()
        self._pending_state: Optional[Any] = None
        self.optimizer_audit = OptimizerAudit(self.registry)  # not_in_optimizer, kept true while the run changes
        self._warned_findings: set[tuple[str, str]] = set()
        self._checked_patterns = False

    # ------------------------------------------------------------------ lifecycle
    def bind(self, named_parameters: Iterable[tuple[str, Tensor]], module: Optional[torch.nn.Module] = None) -> None:
        """Register the model's parameters by name (call once the model is built, before the first step).

        ``module`` (the root model) lets diagnosis instrument forward passes and audit attributes.
        """
        if module is not None:
            self.module = module
        self.registry.bind(named_parameters)
        self._sync_size()
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self.load_state_dict(state)
        if self.module is not None and self.diagnosis is None:
            self.diagnosis = Diagnosis(self)
            self.diagnosis.start_run()

    def start_run(self, reuse_backward_read: bool = False) -> None:
        """Begin a training run (a ``fit``): windows restart, the counts carry on.

        Args:
            reuse_backward_read: the adapter knows that no code can change any ``.grad`` between
                :meth:`after_backward` and :meth:`check_step` (Lightning's automatic optimization with no hook in
                between): the step check then reuses the gradients read after backward instead of reading every
                ``.grad`` again.

        """
        self.windows.start_run()
        self.optimizer_audit.start_run()
        self._arrivals.reset()
        self._tracker.reset()
        self._in_backward = False
        self._reuse_read = reuse_backward_read
        if self.diagnosis is not None:
            self.diagnosis.start_run()  # the first steps of every run are watched

    @property
    def reuse_backward_read(self) -> bool:
        """Whether the step check reuses the gradients read after backward (see :meth:`start_run`)."""
        return self._reuse_read

    def observe(self, observer: EngineObserver) -> None:
        """Take part in the step protocol (see :class:`~lightning_gradguard.core.observer.EngineObserver`)."""
        if observer not in self._observers:
            self._observers.append(observer)

    def unobserve(self, observer: EngineObserver) -> None:
        if observer in self._observers:
            self._observers.remove(observer)

    def _sync_size(self) -> None:
        size = len(self.registry)
        if size != self.state.size:
            self.state.resize(size)
            self._arrivals.resize(size)

    # ------------------------------------------------------------------ micro-batches and backward passes
    def start_micro_batch(self) -> None:
        self.windows.micro_batch += 1
        if self.diagnosis is not None:
            self.diagnosis.start_micro_batch()

    def cancel_micro_batch(self) -> None:
        """Take back the last :meth:`start_micro_batch`: that batch never ran (no forward, no backward)."""
        self.windows.micro_batch -= 1

    def restart_window(self, optimizer: torch.optim.Optimizer) -> None:
        """Start ``optimizer``'s accumulation window at the next micro-batch (call before that micro-batch starts).

        Plain loops: when every gradient of an optimizer is None at the start of a backward pass, ``zero_grad``
        cleared them, so the micro-batches since its last step (another optimizer's backward in a GAN loop, a
        step the AMP scaler skipped) contribute nothing to its next step and must not count against it.
        """
        if self.windows.restart(optimizer):
            indices, _ = self.registry.optimizer_params(optimizer)
            self._sync_size()
            self._arrivals.restart(indices, covers_all=self.windows.optimizers <= 1)

    def mark_gradients(self, cleared: Optional[torch.optim.Optimizer] = None) -> None:
        """The gradients as they are now are what the next backward pass starts from.

        Adapters that notice a backward pass only once it runs (plain loops) call this earlier, at a point where no
        gradient changes until the backward pass starts (before the forward pass, after ``zero_grad``): by the time
        the adapter notices the backward pass, parameters used only in the loss may have received theirs already.
        ``cleared``: an optimizer whose ``zero_grad()`` just set every gradient to None: they are not read.
        """
        known_none = self.registry.optimizer_params(cleared)[0] if cleared is not None else None
        self._sync_size()
        self._tracker.before_backward(self.registry.params, known_none)
        self._marked = True

    def before_backward(
        self,
        loss: Optional[Tensor] = None,
        cleared: Optional[torch.optim.Optimizer] = None,
        new_micro_batch: bool = False,
    ) -> None:
        """Call right before a backward pass; ``loss`` (the tensor backward starts from) enables diagnosis.

        Args:
            loss: the tensor the backward pass starts from, when the adapter sees it.
            cleared: an optimizer whose ``zero_grad()`` with ``set_to_none=True`` ran since the previous backward
                pass (the Lightning adapter knows it from ``on_before_zero_grad``): its gradients are not read again.
            new_micro_batch: this backward pass starts a micro-batch whose forward pass already ran (adapters that
                learn of a micro-batch only at its backward pass).

        """
        if self.diagnosis is not None:  # first: a micro-batch started below must keep this forward's records
            self.diagnosis.before_backward(loss)
        if self.micro_batch_per_backward or new_micro_batch:
            self.start_micro_batch()
        if not self._marked:
            self.mark_gradients(cleared)
        self._marked = False
        self._in_backward = True

    def after_backward(self) -> None:
        """Count the backward pass and which parameters it gave a gradient (once per micro-batch)."""
        self.windows.backwards += 1
        self.state.backwards += 1
        if not self._in_backward:  # the adapter saw no start of this backward: arrivals are not known
            if self.diagnosis is not None:
                self.diagnosis.after_backward(None)
            return
        self._in_backward = False
        self._tracking = True
        self._sync_size()
        missed = self._tracker.after_backward(self.registry.params, keep=self._reuse_read)
        if len(missed) < self.optimizer_audit.fewest_missed:  # a first gradient of the run reached some parameter
            self.optimizer_audit.saw_backward(len(missed))
        micro_batch = self.windows.micro_batch
        for observer in self._observers:
            observer.after_backward(micro_batch, missed)
        if self.diagnosis is not None:
            self.diagnosis.after_backward(missed)
        self._arrivals.record(micro_batch, missed)

    # ------------------------------------------------------------------ the step check
    def check_step(
        self,
        optimizer: torch.optim.Optimizer,
        step: int,
        accumulate: Optional[int] = None,
        measure: bool = False,
        grad_scale: Optional[Tensor] = None,
        extras: Optional[Callable[[StepCheck], Optional[StatsRequest]]] = None,
    ) -> StepCheck:
        """Check the parameters ``optimizer`` is about to update; call right before ``optimizer.step()``.

        Args:
            optimizer: the optimizer about to step; only its parameters are checked.
            step: the global step, for messages and the report.
            accumulate: the ``accumulate_grad_batches`` in effect, for messages.
            measure: also compute per-parameter norms and the counters measured from them (on the device, no sync).
            grad_scale: the loss scale the gradients still carry (AMP with a fused optimizer), as a tensor;
                norms are divided by it.
            extras: asked with the classified check (so that a picture can be drawn at the first missing
                gradient): what else to measure at this step (the dashboard's statistics).

        Raises:
            GradGuardError: in strict mode, when a checked parameter has no gradient.

        """
        view = self._gather(optimizer)
        audit = self.optimizer_audit
        if audit.following and (audit.due or audit.version != self.registry.layout_version):
            self.follow_audit(optimizer)  # param groups or trainable parameters changed: three reads otherwise
        window, backwards = self.windows.close(optimizer)
        self.state.steps += 1
        check = self._classify(view, step, window, backwards, accumulate)
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
        return check

    def _gather(self, optimizer: torch.optim.Optimizer) -> _View:
        indices, params = self.registry.optimizer_params(optimizer)
        self._sync_size()
        kept, kept_none = self._tracker.take_kept()
        none: Optional[list[int]] = None
        if kept is not None and self._reuse_read and len(kept) == len(self.registry):
            if self.registry.is_all(indices):
                grads, none = kept, kept_none
            else:
                grads = [kept[i] for i in indices]
        else:
            grads = list(map(_GRAD, params))
        return _View(indices, params, grads, none_positions(grads) if none is None else none)

    def _classify(self, view: _View, step: int, window: int, backwards: int, accumulate: Optional[int]) -> StepCheck:
        indices, params, grads = view.indices, view.params, view.grads
        skip_empty = any(o.skip_empty_shards for o in self._observers)
        # frozen parameters (and, under FSDP1, parameters with no shard here) have no .grad by design
        frozen = [j for j in view.none if not params[j].requires_grad or (skip_empty and not params[j].numel())]
        if frozen:
            frozen_set = set(frozen)
            none = [j for j in view.none if j not in frozen_set]
        else:
            none = view.none
        if self._tracking:
            covers_all = self.windows.optimizers <= 1
            zero, short = self._arrivals.take(indices, window, covers_all)
        else:  # no backward brackets: a gradient present at the step is all that can be known
            zero = [indices[j] for j in none]
            short = dict.fromkeys(zero, window) if window else {}
        zero_set = set(zero)
        missing: list[int] = []
        leftover: list[int] = []
        excluded = {indices[j] for j in frozen}
        for j in none:
            index = indices[j]
            missing.append(index)
            if index not in zero_set:
                self.state.explain(index, CLEARED, _CLEARED_DETAIL)
            elif backwards == 0:
                self.state.explain(index, NO_BACKWARD, _no_backward_detail(window))
        if self._tracking and zero:
            position = self._positions(indices)
            for index in zero:
                j = position.get(index)
                grad = grads[j] if j is not None else None
                if grad is None:
                    continue
                if not params[j].requires_grad:  # frozen, holding an old (zeroed) gradient: not checked
                    excluded.add(index)
                elif backwards == 0:
                    missing.append(index)
                    self.state.explain(index, NO_BACKWARD, _no_backward_detail(window) + "; .grad still holds a "
                                       "gradient from an earlier step, which the optimizer is about to apply again")
                elif self._tracker.unchanged_since_backward(index, grad):
                    missing.append(index)
                    leftover.append(index)
                    self.state.explain(index, None, _LEFTOVER_DETAIL)
        view.excluded = excluded
        checked = self._subset(indices, excluded) if excluded else indices
        missing_set = set(missing)
        if excluded:
            short = {i: n for i, n in short.items() if i not in excluded}
        intermittent = [i for i in short if i not in missing_set]
        # count
        self.state.add_uniform(checked, steps=1, micro_batches=window)
        if missing:
            self.state.add("none_steps", missing, 1)
        if short:
            self.state.add("none_micro_batches", list(short), torch.tensor(list(short.values()), dtype=torch.int64))
        return StepCheck(step, window, backwards, accumulate, checked, missing, intermittent, leftover=leftover)

    def _measure(self, view: _View, check: StepCheck, grad_scale: Optional[Tensor]) -> None:
        if not check.missing and len(check.checked) == len(view.indices):
            indices, grads = view.indices, view.grads  # every gradient is there: the lists as they are
        else:
            indices = self._subset(view.indices, view.excluded.union(check.missing))
            if not indices:
                return
            position = self._positions(view.indices)
            grads = [view.grads[position[i]] for i in indices]
        check.norms = self.measurement.measure(indices, grads, grad_scale)  # type: ignore[arg-type]

    def _explain(self, check: StepCheck) -> None:
        if (check.missing or check.intermittent) and self.diagnosis is not None:
            for index, (cause, detail) in self.diagnosis.explain(check).items():
                self.state.explain(index, cause, detail)
        if self.diagnosis is not None:
            self.diagnosis.after_check(check)

    def _decide(self, check: StepCheck) -> None:
        if self.config.strict:
            for observer in self._observers:  # shard-local or rank-dependent gradients: ranks decide together
                check.missing = observer.decide(check.missing)
        if check.missing:
            if self.config.strict:
                self.end_diagnosis()  # the run stops here: no instrument may outlive it
                raise GradGuardError(self.describe_missing(check), self.names(check.missing), check.step, self.report())
            new = [i for i in check.missing if i not in self.state.warned]
            if new:
                self.state.warned.update(new)
                self.warn(self.describe_missing(check, only=new))
        for observer in self._observers:
            observer.after_check(check)

    # ------------------------------------------------------------------ derived index lists
    def _subset(self, indices: list[int], without: set[int]) -> list[int]:
        """``indices`` minus ``without``, as the same list object whenever the same subset comes back (the lazy
        counts and the norm plans are keyed by list identity)."""
        return self._lists.get(indices, frozenset(without), lambda: [i for i in indices if i not in without])

    def _positions(self, indices: list[int]) -> dict[int, int]:
        """Registry index -> position in ``indices``."""
        return self._lists.get(indices, "positions", lambda: {index: j for j, index in enumerate(indices)})

    # ------------------------------------------------------------------ diagnosis and static findings
    def audit(self, optimizers: Iterable[torch.optim.Optimizer] = ()) -> list[Finding]:
        """Check the bound model and ``optimizers`` for trainable tensors nothing will train (call at fit start).

        Findings (``unregistered``, ``not_in_optimizer``; see :mod:`lightning_gradguard.core.audit`) replace those of
        an earlier audit in :attr:`findings`; each warning is warned about once (notes are not). From here on the
        ``not_in_optimizer`` check follows the run by itself: the step check takes it again when an optimizer's
        param groups or the set of parameters that receive gradients change. An ``allow_none`` pattern that matches
        no parameter is warned about once, with the closest names. Returns the new findings.
        """
        optimizers = list(optimizers)
        found = find_unregistered(self.module) if self.module is not None else []
        found += self.optimizer_audit.start(optimizers) if optimizers else []
        self.optimizer_audit.following = bool(optimizers)
        self.findings[:] = [f for f in self.findings if f.kind not in AUDIT_KINDS] + found
        self._warn_findings(found)
        if not self._checked_patterns:
            self._checked_patterns = True
            self._warn_unmatched_patterns()
        return found

    def follow_audit(self, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        """Take the ``not_in_optimizer`` check again now (the step check calls this when the optimizers' layout or
        the parameters that receive gradients changed; ``optimizer``: the one about to step)."""
        try:
            found = self.optimizer_audit.follow(optimizer)
        except Exception as err:  # noqa: BLE001 - the audit must never stop the step check
            self.optimizer_audit.following = False
            self.warn(
                f"GradGuard: internal error in the optimizer audit ({type(err).__name__}: {err}); it is turned off "
                "for the rest of this run, training continues. Please report this at the project's issue tracker."
            )
            return
        self.findings[:] = [f for f in self.findings if f.kind != NOT_IN_OPTIMIZER] + found
        self._warn_findings(found)

    def _warn_findings(self, found: list[Finding]) -> None:
        new = [f for f in found if f.severity != NOTE and (f.kind, f.name) not in self._warned_findings]
        if not new:
            return
        self._warned_findings.update((f.kind, f.name) for f in new)
        lines = [f"GradGuard found {len(new)} problem{'s' if len(new) != 1 else ''} in the training set-up:"]
        lines += [f"  [{f.kind}] {f.name}: {f.detail}" for f in new]
        self.warn("\n".join(lines))

    def _warn_unmatched_patterns(self) -> None:
        from lightning_gradguard.core.messages import unmatched_pattern_message

        for pattern in self.registry.unmatched_patterns():
            self.warn(unmatched_pattern_message(pattern, self.registry.names))

    def end_diagnosis(self) -> None:
        """Remove every diagnosis instrument now (a run ends or raised); safe to call at any time."""
        if self.diagnosis is not None:
            self.diagnosis.close()
        self.optimizer_audit.close()

    def names(self, indices: Sequence[int]) -> list[str]:
        return [self.registry.names[i] for i in indices]

    def describe_missing(self, check: StepCheck, only: Optional[Sequence[int]] = None) -> str:
        """A message naming the parameters without a gradient, grouped by module, with causes and hints."""
        from lightning_gradguard.core.messages import missing_message

        return missing_message(self, check, only)

    # ------------------------------------------------------------------ reading out
    def flush(self) -> None:
        """Bring every pending count into the state (before a reduction across ranks reads it)."""
        self.measurement.flush()
        self.state.flush()

    def report(self) -> GradReport:
        """The report as it stands: every parameter checked at least once, and the findings."""
        self._sync_size()  # an optimizer's unregistered tensors may have joined the registry since
        self.flush()
        if self.optimizer_audit.following:  # the findings as of now (reports are rare: a full look is cheap enough)
            self.follow_audit()
        table = self.state.table()
        known = {f.name for f in fields(ParamReport)}
        counters = [name for name in table if name in known]
        params: dict[str, ParamReport] = {}
        for i, name in enumerate(self.registry.names):
            if table["steps"][i] == 0 or self.registry.allowed[i]:
                continue
            p = ParamReport(**{counter: table[counter][i] for counter in counters})
            if p.missing or p.intermittent:
                p.cause, p.detail = self.state.causes.get(i, (None, None))
            params[name] = p
        report = GradReport(self.state.steps, self.state.backwards, params, list(self.findings))
        for observer in self._observers:
            observer.add_to_report(report)
        return report

    # ------------------------------------------------------------------ resumable state
    def state_dict(self) -> dict[str, Any]:
        """Counts by parameter name, so that a resumed run continues them exactly."""
        self._sync_size()
        self.flush()
        steps = self.state.values("steps")
        allowed = self.registry.allowed
        return self.state.state_dict(self.registry.names, keep=lambda i: bool(steps[i]) and not allowed[i])

    def load_state_dict(self, state: Any) -> None:
        """Continue from a :meth:`state_dict` (applied at :meth:`bind` when no parameter is bound yet).

        Raises:
            ValueError: ``state`` is not a GradGuard state; nothing changed.

        """
        if not len(self.registry):
            from lightning_gradguard.core.state import parse_state

            parse_state(state)  # fail now, not at bind
            self._pending_state = state
            return
        # the checkpoint's counts replace whatever this engine counted before (a guard reused for a resumed fit)
        self.state.load_state_dict(state, {name: i for i, name in enumerate(self.registry.names)})
        self.measurement.reset()
        self.windows.restart_counts()  # restored backward passes belong to no window here


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


def _default_warn(message: str) -> None:
    warnings.warn(message, GradGuardWarning, stacklevel=3)


def _no_backward_detail(window: int) -> str:
    return (
        f"no backward pass ran in the {window} micro-batch{'es' if window != 1 else ''} before this optimizer step "
        "(training_step returned None, or the optimizer stepped without manual_backward)"
    )
