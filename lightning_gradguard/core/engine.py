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
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from lightning_gradguard.config import GuardConfig
from lightning_gradguard.core.arrivals import ArrivalTracker
from lightning_gradguard.core.audit import OptimizerAudit
from lightning_gradguard.core.check import StepChecker
from lightning_gradguard.core.diagnosis import Diagnosis
from lightning_gradguard.core.findings import Findings
from lightning_gradguard.core.measure import Measurement, StatsRequest
from lightning_gradguard.core.messages import skipped_batches_note
from lightning_gradguard.core.observer import EngineObserver, StepCheck
from lightning_gradguard.core.registry import ParamRegistry
from lightning_gradguard.core.saved import SavedCounts
from lightning_gradguard.core.state import GuardState
from lightning_gradguard.core.updates import UpdateWatch
from lightning_gradguard.core.windows import ArrivalCounts, Windows
from lightning_gradguard.errors import GradGuardError, GradGuardWarning
from lightning_gradguard.report import Finding, GradReport

NO_BACKWARD_HINT = "backward() was not called before the optimizer step, or the loss does not depend on the model"
_EAGER_VERSIONS_MAX = 2048  # parameter tensors up to which plain loops read versions after every backward pass
class GradGuardEngine:
    """Detects, counts and explains missing gradients; knows nothing of Lightning.

    Args:
        config: validated settings.
        warn: called with a message when a parameter first misses a gradient outside strict mode (adapters pass
            a rank-zero warning).
        micro_batch_per_backward: every backward pass starts a micro-batch (loops that never call
            :meth:`start_micro_batch`).
        no_backward_hint: what, in the adapter's framework, leaves a step without a backward pass (the end of
            the ``no_backward`` detail).

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
        no_backward_hint: str = NO_BACKWARD_HINT,
    ) -> None:
        self.config = config
        self.no_backward_hint = no_backward_hint
        self.warn: Callable[[str], None] = warn or _default_warn
        self.micro_batch_per_backward = micro_batch_per_backward
        self.registry = ParamRegistry(config.allow_none)
        self.state = GuardState()
        self.windows = Windows()
        self.measurement = Measurement(self.state, config.norm_type)
        self.module: Optional[torch.nn.Module] = None
        self.diagnosis: Optional[Diagnosis] = None  # created by bind(module=...): explains unused/no_grad/detached
        # what the backward passes gave (owned here; the step check reads them)
        self.tracker = ArrivalTracker()
        self.arrivals = ArrivalCounts()
        self.observers: list[EngineObserver] = []  # see observe()
        self.tracking = False  # True once a before/after backward bracket was seen
        self._in_backward = False
        self._late_backward = False
        self._marked = False  # mark_gradients() took the snapshot the next backward pass is compared with
        self.unseen = False  # the window about to be checked ends in a backward pass found at its step (see below)
        self._checker = StepChecker(self)
        self.updates = UpdateWatch(self)  # weights that never move: lr=0 groups, steps that skip a parameter
        self.saved = SavedCounts(self)  # what a checkpoint holds, and a state loaded before bind()
        self.optimizer_audit = OptimizerAudit(self.registry)  # not_in_optimizer, kept true while the run changes
        self.found = Findings(self.registry, self.optimizer_audit, lambda message: self.warn(message))
        self._skip_reason = ("the training loop skipped them", "")

    # ------------------------------------------------------------------ lifecycle
    def bind(self, named_parameters: Iterable[tuple[str, Tensor]], module: Optional[torch.nn.Module] = None) -> None:
        """Register the model's parameters by name (call once the model is built, before the first step).

        ``module`` (the root model) lets diagnosis instrument forward passes and audit attributes.
        """
        if module is not None:
            self.module = self.registry.module = module
        self.registry.bind(named_parameters)
        self.sync_size()
        self.saved.apply_pending()
        if self.module is not None and self.diagnosis is None:
            self.diagnosis = Diagnosis(self)
            self.diagnosis.start_run()

    def start_run(
        self, reuse_backward_read: bool = False, late_backward: bool = False, verify_backward_read: bool = False
    ) -> None:
        """Begin a training run (a ``fit``): windows restart, the counts carry on.

        Args:
            reuse_backward_read: the adapter knows that no code can change any ``.grad`` between
                :meth:`after_backward` and :meth:`check_step` (Lightning's automatic optimization with no hook in
                between): the step check then reuses the gradients read after backward instead of reading every
                ``.grad`` again.
            late_backward: the adapter notices a backward pass only once it runs (plain loops): the versions of
                the gradients a backward pass leaves are read right then, for :meth:`keep_baseline`.
            verify_backward_read: reuse the read after backward only if the ``.grad`` attributes still hold the
                tensors read then (a loop the adapter does not drive can set ``p.grad = None`` in between; see
                :meth:`~lightning_gradguard.core.arrivals.ArrivalTracker.take_kept`).

        """
        self.windows.start_run()
        self.optimizer_audit.start_run()
        self.updates.start_run()
        self.arrivals.reset()
        self.tracker.reset()
        self._in_backward = False
        self.tracker.reuse_read = reuse_backward_read
        self.tracker.verify_read = verify_backward_read
        self._late_backward = late_backward
        # small models: reading the versions after every backward pass costs next to nothing; big ones read them
        # once accumulation shows that a backward pass will follow without zero_grad (see keep_baseline)
        self.tracker.eager_versions = late_backward and len(self.registry) <= _EAGER_VERSIONS_MAX
        if self.diagnosis is not None:
            self.diagnosis.start_run()  # the first steps of every run are watched

    @property
    def late_backward(self) -> bool:
        """Whether the adapter notices backward passes only once they run (see :meth:`start_run`)."""
        return self._late_backward

    @property
    def reuse_backward_read(self) -> bool:
        """Whether the step check reuses the gradients read after backward (see :meth:`start_run`)."""
        return self.tracker.reuse_read

    def observe(self, observer: EngineObserver) -> None:
        """Take part in the step protocol (see :class:`~lightning_gradguard.core.observer.EngineObserver`)."""
        if observer not in self.observers:
            self.observers.append(observer)

    def unobserve(self, observer: EngineObserver) -> None:
        if observer in self.observers:
            self.observers.remove(observer)

    def sync_size(self) -> None:
        """Grow the state to the registry (an optimizer's unregistered tensors may join it at any step)."""
        size = len(self.registry)
        if size != self.state.size:
            self.state.resize(size)
            self.arrivals.resize(size)

    # ------------------------------------------------------------------ micro-batches and backward passes
    def start_micro_batch(self) -> None:
        self.windows.micro_batch += 1
        if self.diagnosis is not None and not self.diagnosis.idle:
            self.diagnosis.start_micro_batch()

    def cancel_micro_batch(self) -> None:
        """Take back the last :meth:`start_micro_batch`: that batch never ran (no forward, no backward)."""
        self.windows.micro_batch -= 1

    def drop_skipped_micro_batch(self) -> bool:
        """Take back the micro-batch in progress if it ran no backward pass because the training loop skipped it on
        purpose (Lightning's ``training_step`` returning None), once the run has trained: it belongs to no window.
        Returns whether it did."""
        return self.windows.drop_empty()

    def restart_window(self, optimizer: torch.optim.Optimizer, in_progress: bool = False) -> None:
        """Start ``optimizer``'s accumulation window at the next micro-batch (call before that micro-batch starts).

        Plain loops: when every gradient of an optimizer is None at the start of a backward pass, ``zero_grad``
        cleared them, so the micro-batches since its last step (another optimizer's backward in a GAN loop, a
        step the AMP scaler skipped) contribute nothing to its next step and must not count against it.
        """
        if self.windows.restart(optimizer, in_progress):  # in_progress: at the micro-batch whose backward is next
            indices, _ = self.registry.optimizer_params(optimizer)
            self.sync_size()
            self.arrivals.restart(indices, covers_all=self.windows.optimizers <= 1)

    def gradients_zeroed(self, optimizer: torch.optim.Optimizer) -> None:
        """``optimizer``'s gradients were just zeroed in place (``zero_grad(set_to_none=False)``): if its step comes
        before another backward pass, that step applies zeros, and its gradients count as cleared."""
        if not self._in_backward:
            self.windows.zeroed(optimizer)

    def optimizer_joined(self, optimizer: torch.optim.Optimizer) -> None:
        """``optimizer`` was created after the run began (a second training stage, a new one each epoch) and is about
        to take its first step: its accumulation window begins at the latest step of any optimizer."""
        self.windows.join(optimizer)

    def mark_gradients(self, cleared: Optional[torch.optim.Optimizer] = None) -> None:
        """The gradients as they are now are what the next backward pass starts from.

        Adapters that notice a backward pass only once it runs (plain loops) call this earlier, at a point where no
        gradient changes until the backward pass starts (before the forward pass, after ``zero_grad``): by the time
        the adapter notices the backward pass, parameters used only in the loss may have received theirs already.
        ``cleared``: an optimizer whose ``zero_grad()`` just set every gradient to None: they are not read.
        """
        known_none = self.registry.optimizer_params(cleared)[0] if cleared is not None else None
        self.sync_size()
        self.tracker.before_backward(self.registry.params, known_none)
        self._marked = True

    def keep_baseline(self) -> None:
        """No gradient changed since the last backward pass ended (the next micro-batch of an accumulation window):
        the next backward pass is compared with what that one left, without reading every ``.grad`` again."""
        self.sync_size()
        self.tracker.keep_baseline(self.registry.params)
        self._marked = True

    def before_backward(
        self,
        loss: Any = None,
        cleared: Optional[torch.optim.Optimizer] = None,
        new_micro_batch: bool = False,
    ) -> None:
        """Call right before a backward pass; ``loss`` (the tensor backward starts from) enables diagnosis.

        Args:
            loss: the tensor the backward pass starts from (or its ``grad_fn``), when the adapter sees it.
            cleared: an optimizer whose ``zero_grad()`` with ``set_to_none=True`` ran since the previous backward
                pass (the Lightning adapter knows it from ``on_before_zero_grad``): its gradients are not read again.
            new_micro_batch: this backward pass starts a micro-batch whose forward pass already ran (adapters that
                learn of a micro-batch only at its backward pass).

        """
        diagnosis = self.diagnosis
        if diagnosis is not None and not diagnosis.idle:  # first: a micro-batch started below keeps its records
            diagnosis.before_backward(loss)
        if self.micro_batch_per_backward or new_micro_batch:
            self.start_micro_batch()
        if not self._marked:
            self.mark_gradients(cleared)
        self._marked = False
        self._in_backward = True

    @property
    def in_backward(self) -> bool:
        """A backward pass the adapter saw start has not ended: an optimizer stepping now steps from inside it (from a
        gradient hook, the optimizer-in-backward pattern)."""
        return self._in_backward

    def after_backward(self, diagnose: bool = True) -> None:
        """Count the backward pass and which parameters it gave a gradient (once per micro-batch)."""
        self.windows.backwards += 1
        self.windows.backward_micro_batch = self.windows.micro_batch
        self.state.backwards += 1
        if not self._in_backward:  # the adapter saw no start of this backward: arrivals are not known
            if self.diagnosis is not None:
                self.diagnosis.after_backward(None)
            return
        self._in_backward = False
        self.tracking = True
        self.sync_size()
        missed = self.tracker.after_backward(self.registry.params, keep=self.tracker.reuse_read)
        if len(missed) < self.optimizer_audit.fewest_missed:  # a first gradient of the run reached some parameter
            self.optimizer_audit.saw_backward(len(missed))
        micro_batch = self.windows.micro_batch
        for observer in self.observers:
            observer.after_backward(micro_batch, missed)
        if diagnose and self.diagnosis is not None and not self.diagnosis.idle:
            self.diagnosis.after_backward(missed)
        self.arrivals.record(micro_batch, missed)

    def backward_unseen(self, optimizer: torch.optim.Optimizer) -> bool:
        """At ``optimizer``'s step: no backward pass was seen since the gradients were marked, yet one of its
        parameters holds a new gradient tensor (a pass that never reached the hooked outputs, such as a loss built
        with ``torch.autograd.grad(..., create_graph=True)``, or a gradient assigned by hand)."""
        if self._in_backward or not self._marked:
            return False
        return self.tracker.new_since_mark(self.registry.params, self.registry.optimizer_params(optimizer)[0])

    def bracket_unseen(self) -> None:
        """Count what :meth:`backward_unseen` found as a micro-batch's backward pass (no cause is diagnosed in it:
        its forward pass was not seen; the check words what it missed as gradients set another way)."""
        self.windows.micro_batch += 1
        self._marked, self._in_backward = False, True
        self.after_backward(diagnose=False)
        self.unseen = True

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
        return self._checker.check(optimizer, step, accumulate, measure, grad_scale, extras)

    def skip_empty_window(self, optimizer: torch.optim.Optimizer, reason: str, advice: str = "") -> bool:
        """End ``optimizer``'s window without a check when no backward pass ran in it although earlier ones of the run
        did: the training loop skipped those batches on purpose (``reason``: how, in the adapter's words, such as
        "training_step returned None"; ``advice``: what to do if it is not meant to happen). Nothing is counted
        against the parameters; the report carries a note with the number of such steps. Returns whether the window
        was skipped (if not, check the step as usual: a run that never ran a backward pass is a bug, not a skip).
        """
        windows = self.windows
        if windows.backwards_since_step(optimizer) or not windows.run_backwards:
            return False
        windows.close(optimizer)
        self.tracker.take_kept()
        self.state.skipped_steps += 1
        self._skip_reason = (reason, advice)
        return True

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
        self.windows.expect(optimizers)
        return self.found.audit(self.module, optimizers)

    def follow_audit(self, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        """Take the ``not_in_optimizer`` check again now (the step check calls this when the optimizers' layout or
        the parameters that receive gradients changed; ``optimizer``: the one about to step)."""
        self.found.follow(optimizer)

    @property
    def findings(self) -> list[Finding]:
        """The findings of the run so far (owned by :attr:`found`)."""
        return self.found.items

    def evaluation(self, running: bool) -> None:
        """An evaluation loop between training steps starts (``running``) or ends: it must compute exactly what it
        computes without the guard (see :meth:`~lightning_gradguard.core.diagnosis.instruments.Instruments.suspend`)."""
        if self.diagnosis is not None:
            self.diagnosis.evaluation(running)

    def end_diagnosis(self) -> None:
        """Remove every diagnosis instrument now (a run ends or raised); safe to call at any time."""
        if self.diagnosis is not None:
            self.diagnosis.close()
        self.optimizer_audit.close()
        self.updates.close()

    def finish_run(self) -> Optional[GradGuardError]:
        """The run ended normally (the end of fit, ``close()``): parameters that had gradients but never moved
        become findings (:mod:`~lightning_gradguard.core.updates`), warned about once. In strict mode, returns the
        error the adapter raises once it has written the report."""
        return self.updates.finish()

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
        self.sync_size()  # an optimizer's unregistered tensors may have joined the registry since
        self.flush()
        if self.optimizer_audit.following:  # the findings as of now (reports are rare: a full look is cheap enough)
            self.follow_audit()
        params = self.state.param_reports(self.registry.names, self.registry.allowed)
        findings = list(self.findings)
        if self.state.skipped_steps:
            findings.append(skipped_batches_note(self.state.skipped_steps, *self._skip_reason))
        note = self.found.never_stepped(self.windows.never_stepped(), params, self.state.steps)
        if note is not None:
            findings.append(note)
        report = GradReport(self.state.steps, self.state.backwards, params, findings)
        for observer in self.observers:
            observer.add_to_report(report)
        return report

    # ------------------------------------------------------------------ resumable state
    def state_dict(self) -> dict[str, Any]:
        """Counts by parameter name, so that a resumed run continues them exactly."""
        return self.saved.state_dict()

    @property
    def holds_unbound_counts(self) -> bool:
        """Counts were loaded (:meth:`load_state_dict`) but no parameter is bound yet to give them names."""
        return self.saved.unbound

    def load_state_dict(self, state: Any) -> None:
        """Continue from a :meth:`state_dict` (applied at :meth:`bind` when no parameter is bound yet).

        Raises:
            ValueError: ``state`` is not a GradGuard state; nothing changed.

        """
        self.saved.load(state)


def _default_warn(message: str) -> None:
    warnings.warn(message, GradGuardWarning, stacklevel=3)
