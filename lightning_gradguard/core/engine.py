"""The framework-free core: where a missing gradient is detected and counted.

Adapters (the Lightning callback, Fabric, a plain loop) translate their hooks into four calls:

* :meth:`GradGuardEngine.start_micro_batch` when a training batch begins,
* :meth:`GradGuardEngine.before_backward` / :meth:`GradGuardEngine.after_backward` around each backward pass,
* :meth:`GradGuardEngine.check_step` right before ``optimizer.step()``.

Everything per step reads host-side metadata (``.grad is None``, ``requires_grad``, version counters) and updates
counter vectors with a few tensor operations. Gradient values are read only by the norm kernels, whose results
stay on the device until a logging step (see :mod:`lightning_gradguard.core.norms`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from lightning_gradguard.config import GuardConfig
from lightning_gradguard.core.arrivals import ArrivalTracker, none_positions
from lightning_gradguard.core.audit import AUDIT_KINDS, audit_model
from lightning_gradguard.core.causes import CLEARED, NO_BACKWARD
from lightning_gradguard.core.diagnosis import Diagnosis
from lightning_gradguard.core.norms import NormGroup, per_param_norms
from lightning_gradguard.core.registry import ParamRegistry
from lightning_gradguard.errors import GradGuardError, GradGuardWarning
from lightning_gradguard.report import Finding, GradReport, ParamReport

_COUNTERS = ("steps", "none_steps", "micro_batches", "none_micro_batches")
_STATE_VERSION = 1


@dataclass
class StepCheck:
    """What one optimizer step looked like. Indices are registry indices."""

    step: int
    window: int  # micro-batches since this optimizer's previous step
    backwards: int  # backward passes in that window
    accumulate: Optional[int]  # the accumulate_grad_batches setting in effect, if the adapter knows it
    checked: list[int]
    missing: list[int]  # no gradient at this step
    intermittent: list[int]  # a gradient at the step, but some micro-batches of the window gave none
    norms: list[tuple[list[int], NormGroup]] = field(default_factory=list)  # (registry indices, group)


class GradGuardEngine:
    """Detects, counts and explains missing gradients; knows nothing of Lightning.

    Args:
        config: validated settings.
        warn: called with a message when a parameter first misses a gradient outside strict mode
            (adapters pass a rank-zero warning).

    Example::

        engine = GradGuardEngine(GuardConfig())
        engine.bind(model.named_parameters())
        engine.start_micro_batch(); engine.before_backward()
        loss.backward()
        engine.after_backward()
        engine.check_step(optimizer, step=0)
        optimizer.step()

    """

    def __init__(self, config: GuardConfig, warn: Optional[Callable[[str], None]] = None) -> None:
        self.config = config
        self.registry = ParamRegistry(config.allow_none)
        self._warn = warn or (lambda message: warnings.warn(message, GradGuardWarning, stacklevel=3))
        self.explainer: Optional[Callable[[StepCheck], dict[int, tuple[str, str]]]] = None
        self.findings: list[Finding] = []
        self.arrivals = ArrivalTracker()
        self.auto_micro_batch = False  # plain loops: every backward starts a micro-batch
        self.module: Optional[torch.nn.Module] = None
        self.diagnosis: Optional[Diagnosis] = None  # created by bind(module=...): explains unused/no_grad/detached
        self.leftover: set[int] = set()  # parameters whose .grad was found to be a leftover no backward touched
        # strategy adapters (lightning_gradguard.training.distributed); all optional, all off in a single process
        self.skip_empty_shards = False  # FSDP1: a parameter with no data on this rank is not checked on this rank
        self.arrival_observer: Optional[Callable[[int, list[int]], None]] = None  # (micro-batch, indices missed)
        self.strict_vote: Optional[Callable[[list[int]], list[int]]] = None  # strict decision taken by all ranks
        self.report_hooks: list[Callable[[GradReport], None]] = []  # add what the adapters know to a report
        # True when the adapter knows that no code can change any .grad between after_backward and check_step
        # (Lightning's automatic optimization without hooks in between): the step check then uses the gradients
        # read after the backward pass instead of reading every .grad again (10k tensors: 0.9 ms a step)
        self.reuse_backward_read = False
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget every count (the registry and findings stay)."""
        self.steps = 0
        self.backwards = 0
        self._micro_batch = 0
        self._tracking = False  # True once a before/after backward bracket was seen
        self._in_backward = False
        self._recorded_in = -1  # the last micro-batch an arrival was recorded in
        self._last_step: dict[int, tuple[int, int]] = {}  # optimizer id -> (micro-batch, backward) at its last step
        self._run_start = (0, 0)  # (micro-batch, backward) where the current run began: an optimizer's first window
        size = len(self.registry)
        self._counts = {name: torch.zeros(size, dtype=torch.int64) for name in _COUNTERS}
        self._arrived = torch.zeros(size, dtype=torch.int64)  # micro-batches with an arrival since last check
        self._arrived_in = torch.full((size,), -1, dtype=torch.int64)  # last micro-batch with an arrival
        self._nonfinite: dict[torch.device, Tensor] = {}
        self.causes: dict[int, tuple[Optional[str], Optional[str]]] = {}
        self._warned: set[int] = set()
        self._index_cache: dict[Any, Any] = {}  # index lists -> int64 tensors (by content and by identity)
        self._whole: tuple[Any, int, bool] = (None, 0, False)  # (index list, registry size, list is 0..size-1)
        self._pending_state: Optional[dict[str, Any]] = None

    def start_run(self) -> None:
        """Begin a new training run (a new ``fit``): windows restart, the counts carry on.

        Optimizers are new objects in a new run, so without this their first window would span every micro-batch
        since the previous run, and an arrival recorded there would be counted again.
        """
        self._micro_batch = 0
        self._in_backward = False
        self._recorded_in = -1
        self._last_step = {}
        self._run_start = (0, self.backwards)
        self._arrived.zero_()
        self._arrived_in.fill_(-1)
        self.arrivals.reset()
        if self.diagnosis is not None:
            self.diagnosis.start_run()  # the first steps of every run are watched

    def bind(self, named_parameters: Iterable[tuple[str, Tensor]], module: Optional[torch.nn.Module] = None) -> None:
        """Register the model's parameters by name (call once the model is built, before the first step).

        ``module`` (the root model) lets diagnosis instrument forward passes and audit attributes.
        """
        if module is not None:
            self.module = module
        self.registry.bind(named_parameters)
        self._grow()
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self.load_state_dict(state)
        if self.module is not None and self.diagnosis is None:
            self.diagnosis = Diagnosis(self)
            if self.explainer is None:
                self.explainer = self.diagnosis.explain
            self.diagnosis.start_run()

    def _grow(self) -> None:
        size = len(self.registry)
        old = self._arrived.numel()
        if size == old:
            return
        extra = size - old
        for name, counter in self._counts.items():
            self._counts[name] = torch.cat([counter, counter.new_zeros(extra)])
        self._arrived = torch.cat([self._arrived, self._arrived.new_zeros(extra)])
        self._arrived_in = torch.cat([self._arrived_in, self._arrived_in.new_full((extra,), -1)])
        for device, counter in self._nonfinite.items():
            self._nonfinite[device] = torch.cat([counter, counter.new_zeros(extra)])
        self._index_cache.clear()

    # ------------------------------------------------------------------ micro-batches and backward passes
    def start_micro_batch(self) -> None:
        self._micro_batch += 1
        if self.diagnosis is not None:
            self.diagnosis.start_micro_batch()

    def cancel_micro_batch(self) -> None:
        """Take back the last :meth:`start_micro_batch`: that batch never ran (no forward, no backward)."""
        self._micro_batch -= 1

    def restart_window(self, optimizer: torch.optim.Optimizer) -> None:
        """Start ``optimizer``'s accumulation window at the next micro-batch (call before that micro-batch starts).

        Plain loops: when every gradient of an optimizer is None at the start of a backward pass, ``zero_grad``
        cleared them, so the micro-batches since its last step (another optimizer's backward in a GAN loop, a
        step the AMP scaler skipped) contribute nothing to its next step and must not count against it.
        """
        now = (self._micro_batch, self.backwards)
        if self._last_step.get(id(optimizer)) == now:
            return  # nothing happened since its last step: the window is fresh (the common zero_grad-each-step loop)
        indices, _ = self.registry.optimizer_params(optimizer)
        self._grow()
        self._last_step[id(optimizer)] = now
        if indices:
            idx = self._as_index(indices)
            self._arrived[idx] = 0
            self._arrived_in[idx] = -1

    def before_backward(
        self, loss: Optional[Tensor] = None, cleared: Optional[torch.optim.Optimizer] = None
    ) -> None:
        """Call right before a backward pass; ``loss`` (the tensor backward starts from) enables diagnosis.

        ``cleared``: an optimizer whose ``zero_grad()`` with ``set_to_none=True`` ran since the previous backward
        pass (the Lightning adapter knows it from ``on_before_zero_grad``). Its parameters' gradients are then not
        read again here: on a model with 10k tensors that read costs 0.5-2 ms per step.
        """
        if self.diagnosis is not None:  # first: a micro-batch started below must keep this forward's records
            self.diagnosis.before_backward(loss)
        if self.auto_micro_batch:
            self.start_micro_batch()
        known_none = self.registry.optimizer_params(cleared)[0] if cleared is not None else None
        self._grow()
        self.arrivals.before_backward(self.registry.params, known_none)
        self._in_backward = True

    def after_backward(self) -> None:
        """Count the backward pass and which parameters it gave a gradient (once per micro-batch)."""
        self.backwards += 1
        if not self._in_backward:  # the adapter saw no start of this backward: arrivals are not known
            if self.diagnosis is not None:
                self.diagnosis.after_backward(None)
            return
        self._in_backward = False
        self._tracking = True
        self._grow()
        missed = self.arrivals.after_backward(self.registry.params, keep=self.reuse_backward_read)
        if self.arrival_observer is not None:
            self.arrival_observer(self._micro_batch, missed)
        if self.diagnosis is not None:
            self.diagnosis.after_backward(missed)
        mb = self._micro_batch
        if not missed and self._recorded_in != mb:  # the common case: every parameter, first backward of the batch
            self._arrived += 1
            self._arrived_in.fill_(mb)
        else:
            arrived = torch.ones(len(self.registry), dtype=torch.bool)
            if missed:
                arrived[self._as_index(missed)] = False
            # a parameter counts once per micro-batch however many backward passes it ran
            arrived &= self._arrived_in != mb
            self._arrived += arrived
            self._arrived_in[arrived] = mb
        self._recorded_in = mb

    # ------------------------------------------------------------------ the step check
    def check_step(
        self,
        optimizer: torch.optim.Optimizer,
        step: int,
        accumulate: Optional[int] = None,
        measure: bool = False,
        grad_scale: Optional[Tensor] = None,
    ) -> StepCheck:
        """Check the parameters ``optimizer`` is about to update; call right before ``optimizer.step()``.

        Args:
            optimizer: the optimizer about to step; only its parameters are checked.
            step: the global step, for messages and the report.
            accumulate: the ``accumulate_grad_batches`` in effect, for messages.
            measure: also compute per-parameter norms and non-finite counts (on the device, no sync).
            grad_scale: the loss scale the gradients still carry (AMP with a fused optimizer), as a tensor;
                norms are divided by it.

        Raises:
            GradGuardError: in strict mode, when a checked parameter has no gradient.

        """
        indices, params = self.registry.optimizer_params(optimizer)
        self._grow()
        key = id(optimizer)
        last_mb, last_bw = self._last_step.get(key, self._run_start)
        window = max(self._micro_batch - last_mb, 1 if self.backwards > last_bw else 0)
        backwards = self.backwards - last_bw
        self._last_step[key] = (self._micro_batch, self.backwards)
        self.steps += 1

        kept, kept_none = self.arrivals.take_kept()
        none_pos: Optional[list[int]] = None
        if kept is not None and self.reuse_backward_read and len(kept) == len(self.registry):
            if self._is_whole_registry(indices):
                grads, none_pos = kept, kept_none
            else:
                grads = [kept[i] for i in indices]
        else:
            grads = [p.grad for p in params]
        # positions (into this optimizer's list) of parameters without .grad; frozen ones are not checked
        if none_pos is None:
            none_pos = none_positions(grads)
        # ... nor, under FSDP1, those whose shard on this rank is empty (their .grad is None there by design)
        empty = self.skip_empty_shards
        frozen = {j for j in none_pos if not params[j].requires_grad or (empty and not params[j].numel())}
        if frozen:
            none_pos = [j for j in none_pos if j not in frozen]
            positions = [j for j in range(len(indices)) if j not in frozen]
        else:
            positions = range(len(indices))  # a range, not a list: 10k parameters, every step
        checked = [indices[j] for j in positions] if frozen else indices
        if not checked:
            return StepCheck(step, window, backwards, accumulate, [], [], [])
        row = {j: n for n, j in enumerate(positions)} if frozen else None  # position -> row in `checked`
        # one optimizer over the whole model (the common case): plain views instead of gathers and scatters
        whole = not frozen and self._is_whole_registry(checked)
        idx: Any = slice(None) if whole else self._as_index(checked)

        if self._tracking:
            arrived = self._arrived[idx].clone() if whole else self._arrived[idx]
            self._arrived[idx] = 0
            # a new window starts now, even inside the same micro-batch (several steps per training_step, as a
            # WGAN critic does): the next backward's arrival counts for it
            self._arrived_in[idx] = -1
        else:  # no backward brackets: a gradient present at the step is all that can be known
            arrived = torch.full((len(checked),), window, dtype=torch.int64)
            if none_pos:
                arrived[[row[j] if row else j for j in none_pos]] = 0

        missing: list[int] = []
        for j in none_pos:
            index = indices[j]
            missing.append(index)
            if arrived[row[j] if row else j] > 0:
                self._set_cause(index, CLEARED, "it received a gradient in backward, but .grad was None at the "
                                "optimizer step: something called zero_grad() (or set .grad = None) in between")
            elif backwards == 0:
                self._set_cause(index, NO_BACKWARD, _no_backward_detail(window))
        unchecked: list[int] = []  # rows of `checked` that turn out not to be checked after all
        if self._tracking:
            # a gradient that is present although nothing arrived: a leftover, or one the user assigned
            for n in (arrived == 0).nonzero().flatten().tolist():
                j = positions[n]
                grad = grads[j]
                if grad is None:
                    continue
                if not params[j].requires_grad:  # frozen, holding an old (zeroed) gradient: not checked
                    unchecked.append(n)
                    continue
                index = indices[j]
                if backwards == 0:
                    missing.append(index)
                    self._set_cause(index, NO_BACKWARD, _no_backward_detail(window) + "; .grad still holds a "
                                    "gradient from an earlier step, which the optimizer is about to apply again")
                elif self.arrivals.unchanged_since_backward(index, grad):
                    missing.append(index)
                    self._set_leftover_detail(index)
        missing_set = set(missing)
        none_mb = (window - arrived).clamp_(min=0)
        counted: Any = 1  # how many steps each row counts: 1, or 0 for the unchecked rows
        if unchecked:
            counted = torch.ones(len(checked), dtype=torch.int64)
            counted[unchecked] = 0
            none_mb *= counted
        intermittent = [
            checked[n] for n in none_mb.nonzero().flatten().tolist() if checked[n] not in missing_set
        ]

        counts = self._counts
        counts["steps"][idx] += counted
        counts["micro_batches"][idx] += window * counted
        counts["none_micro_batches"][idx] += none_mb
        if missing:
            counts["none_steps"][self._as_index(missing)] += 1

        result = StepCheck(step, window, backwards, accumulate, checked, missing, intermittent)
        if measure:
            if not missing and not frozen:  # every gradient is there: measure the lists as they are
                result.norms = self._measure(indices, grads, grad_scale)
            else:
                present = [j for j in positions if grads[j] is not None and indices[j] not in missing_set]
                if present:
                    result.norms = self._measure(
                        [indices[j] for j in present], [grads[j] for j in present], grad_scale
                    )
        if (missing or intermittent) and self.explainer is not None:
            for index, (cause, detail) in self.explainer(result).items():
                self._set_cause(index, cause, detail)
        if self.diagnosis is not None:
            self.diagnosis.after_check(result)
        if self.config.strict and self.strict_vote is not None:
            # shard-local gradients: ranks see different Nones, and all must raise together or none may
            result.missing = self.strict_vote(missing)
        if result.missing:
            self._on_missing(result)
        return result

    def _is_whole_registry(self, indices: list[int]) -> bool:
        """Whether ``indices`` is every registered parameter in registry order."""
        known, size, whole = self._whole
        if known is not indices or size != len(self.registry):  # the registry hands back the same list each step
            size = len(self.registry)
            whole = len(indices) == size and indices == list(range(size))
            self._whole = (indices, size, whole)
        return whole

    def _measure(
        self, indices: list[int], grads: list[Tensor], grad_scale: Optional[Tensor] = None
    ) -> list[tuple[list[int], NormGroup]]:
        out = []
        for group in per_param_norms(grads, self.config.norm_type):
            reg = [indices[p] for p in group.positions]
            device = group.norms.device
            if grad_scale is not None:  # the norm of unscaled gradients; Inf/NaN stay what they are
                group.norms = group.norms / grad_scale.to(device=device, dtype=group.norms.dtype, non_blocking=True)
            counter = self._nonfinite.get(device)
            if counter is None:
                counter = self._nonfinite[device] = torch.zeros(len(self.registry), dtype=torch.int64, device=device)
            counter.index_add_(0, self._as_index(reg, device), (~torch.isfinite(group.norms)).to(torch.int64))
            out.append((reg, group))
        return out

    def _on_missing(self, result: StepCheck) -> None:
        if self.config.strict:
            self.end_diagnosis()  # the run stops here: no instrument may outlive it
            raise GradGuardError(self.describe_missing(result), self.names(result.missing), result.step, self.report())
        new = [i for i in result.missing if i not in self._warned]
        if new:
            self._warned.update(new)
            self._warn(self.describe_missing(result, only=new))

    # ------------------------------------------------------------------ causes and messages
    def _set_cause(self, index: int, cause: Optional[str], detail: Optional[str]) -> None:
        current = self.causes.get(index)
        # the first explanation wins; a later one only fills in what was unknown
        if current is None or current[0] is None:
            self.causes[index] = (cause, detail)

    def _set_leftover_detail(self, index: int) -> None:
        self.leftover.add(index)
        self._set_cause(index, None, "no backward pass gave it a gradient, but .grad is not None: it holds a tensor "
                        "left by zero_grad(set_to_none=False) (or an earlier step), so the optimizer still applies "
                        "it (momentum, weight decay)")

    # ------------------------------------------------------------------ diagnosis and static findings
    def audit(self, optimizers: Iterable[torch.optim.Optimizer] = ()) -> list[Finding]:
        """Check the bound model and ``optimizers`` for trainable tensors nothing will train (call at fit start).

        Findings (``unregistered``, ``not_in_optimizer``; see :mod:`lightning_gradguard.core.audit`) replace those of an
        earlier audit in :attr:`findings` and are warned about once. Returns the new findings.
        """
        found = audit_model(self.module, list(optimizers), self.registry)
        self.findings[:] = [f for f in self.findings if f.kind not in AUDIT_KINDS] + found
        if found:
            lines = [f"GradGuard found {len(found)} problem{'s' if len(found) != 1 else ''} in the training set-up:"]
            lines += [f"  [{f.kind}] {f.name}: {f.detail}" for f in found]
            self._warn("\n".join(lines))
        return found

    def end_diagnosis(self) -> None:
        """Remove every diagnosis instrument now (a run ends or raised); safe to call at any time."""
        if self.diagnosis is not None:
            self.diagnosis.close()

    def names(self, indices: Sequence[int]) -> list[str]:
        return [self.registry.names[i] for i in indices]

    def describe_missing(self, result: StepCheck, only: Optional[Sequence[int]] = None) -> str:
        """A message naming the parameters without a gradient, grouped by module, with causes and hints."""
        from lightning_gradguard.core.messages import missing_message

        return missing_message(self, result, only)

    # ------------------------------------------------------------------ reading out
    def nonfinite_counts(self) -> Tensor:
        """Per-parameter non-finite step counts on the host (one copy per device: call rarely)."""
        total = torch.zeros(len(self.registry), dtype=torch.int64)
        for counter in self._nonfinite.values():
            total[: counter.numel()] += counter.cpu()
        return total

    def report(self) -> GradReport:
        """The report as it stands: every parameter checked at least once, and the findings."""
        counts = {name: c.tolist() for name, c in self._counts.items()}
        nonfinite = self.nonfinite_counts().tolist()
        params: dict[str, ParamReport] = {}
        for i, name in enumerate(self.registry.names):
            if counts["steps"][i] == 0 or self.registry.allowed[i]:
                continue
            cause, detail = self.causes.get(i, (None, None))
            p = ParamReport(
                steps=counts["steps"][i],
                none_steps=counts["none_steps"][i],
                micro_batches=counts["micro_batches"][i],
                none_micro_batches=counts["none_micro_batches"][i],
                nonfinite_steps=nonfinite[i],
            )
            if p.missing or p.intermittent:
                p.cause, p.detail = cause, detail
            params[name] = p
        report = GradReport(self.steps, self.backwards, params, list(self.findings))
        for hook in self.report_hooks:
            hook(report)
        return report

    # ------------------------------------------------------------------ resumable state
    def state_dict(self) -> dict[str, Any]:
        """Counts by parameter name, so a resumed run continues them exactly."""
        report = self.report()
        return {
            "version": _STATE_VERSION,
            "steps": self.steps,
            "backwards": self.backwards,
            "params": {
                name: [p.steps, p.none_steps, p.micro_batches, p.none_micro_batches, p.nonfinite_steps, p.cause,
                       p.detail]
                for name, p in report.params.items()
            },
            "warned": self.names(sorted(self._warned)),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not len(self.registry):  # not bound yet: apply at bind()
            self._pending_state = dict(state)
            return
        # the checkpoint's counts replace whatever this engine counted before (a guard reused for a resumed fit)
        for counter in self._counts.values():
            counter.zero_()
        self.causes = {}
        self._nonfinite = {}
        self.steps = int(state.get("steps", 0))
        self.backwards = int(state.get("backwards", 0))
        known = {name: i for i, name in enumerate(self.registry.names)}
        restored = torch.zeros(len(self.registry), dtype=torch.int64)
        for name, values in state.get("params", {}).items():
            i = known.get(name)
            if i is None:
                continue
            for counter_name, value in zip(_COUNTERS, values[:4]):
                self._counts[counter_name][i] = int(value)
            restored[i] = int(values[4])
            if values[5] is not None or values[6] is not None:
                self.causes[i] = (values[5], values[6])
        if restored.any():
            self._nonfinite = {torch.device("cpu"): restored}
        self._warned = {known[n] for n in state.get("warned", []) if n in known}
        self._run_start = (self._micro_batch, self.backwards)  # restored backward passes belong to no window here

    # ------------------------------------------------------------------ helpers
    def _as_index(self, indices: list[int], device: Optional[torch.device] = None) -> Tensor:
        device = device or torch.device("cpu")
        # big index lists repeat every step (all parameters of an optimizer): cache them; and on an accelerator
        # every list, because a blocking host-to-device copy would synchronize the device at every step
        if indices and (len(indices) > 64 or device.type != "cpu"):
            # the registry hands back the very same list each step: find it by identity before hashing 10k ints
            same = self._index_cache.get((device, id(indices)))
            if same is not None and same[0] is indices:
                return same[1]
            key = (device, len(indices), indices[0], indices[-1], hash(tuple(indices)))
            cached = self._index_cache.get(key)
            if cached is None:
                if len(self._index_cache) > 64:  # fresh lists (missing, measured) must not pile up
                    self._index_cache.clear()
                cached = torch.tensor(indices, dtype=torch.int64)
                if device.type != "cpu":  # pageable memory is staged before the call returns: no device sync
                    cached = cached.to(device, non_blocking=True)
                self._index_cache[key] = cached
            self._index_cache[(device, id(indices))] = (indices, cached)  # holding the list keeps its id unique
            return cached
        return torch.tensor(indices, dtype=torch.int64, device=device)


def _no_backward_detail(window: int) -> str:
    return (
        f"no backward pass ran in the {window} micro-batch{'es' if window != 1 else ''} before this optimizer step "
        "(training_step returned None, or the optimizer stepped without manual_backward)"
    )

