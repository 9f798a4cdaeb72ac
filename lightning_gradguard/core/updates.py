"""Weights that never move: a parameter that receives gradients, but that the optimizer's steps do not change.

Two ways, told apart by what a step leaves behind, without reading a parameter's values:

* ``zero_lr``: its param group's learning rate is 0 (a group frozen by its learning rate: a config typo, a
  scheduler that holds it at 0). torch's optimizers still write such a parameter (``p.add_(update, alpha=-0.0)``),
  so its version counter moves; the learning rate tells. It is read at every step that ran: one dictionary read
  per param group.
* ``skipped_by_optimizer``: the step left the parameter's version counter where it was, while it moved the counters
  of other parameters of the same optimizer (a custom or wrapped optimizer that skips a group or a parameter).
  Versions are read before and after the first two steps of each optimizer, then every :data:`OBSERVE_GAP`-th
  step: two reads of 0.1 us per parameter tensor, on one step in fifty. The steps are counted over the whole
  training (a resumed run continues the count), so a resumed run observes the very steps an uninterrupted one would.

A step counts only once it ran: the step check records what it saw, and a step post-hook
(``optimizer.register_step_post_hook``) counts when ``step()`` returns. A step the AMP ``GradScaler`` skips (an
overflow) never calls ``optimizer.step()`` and is not counted. The counts are the per-parameter counters
``update_steps``, ``zero_lr_steps``, ``version_steps`` and ``untouched_steps`` (:mod:`~lightning_gradguard.core.state`).

The verdict waits for the end of the run (:meth:`UpdateWatch.finish`): a learning-rate warmup that starts at 0
(for one step, or for a whole epoch), or a decay that ends at 0, leaves a parameter still for some steps, and only a
parameter that did not move at *any* counted step of the run is reported: a warning, or a note when the run counted
one step only (a one-step run with a warmup from 0 looks the same as a group frozen at 0). In strict mode the
warnings become the error the adapter raises once the report is written.

Silent by design (the version counter cannot tell): a step that moves *no* parameter's version counter (fused
kernels such as ``fused=True``, whose groups are left out; updates written through ``p.data``; extension kernels
that write through raw pointers; an LBFGS step that converged), and a parameter whose gradient was zero at every
measured step (the zero-gradient count says why it did not move). Strict mode stopped at a step raises nothing more
at the end (:attr:`UpdateWatch.stopped`).
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from operator import attrgetter, eq
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import Tensor

from lightning_gradguard.errors import GradGuardError
from lightning_gradguard.isolation import internal_error
from lightning_gradguard.report import NOTE, WARNING, Finding

if TYPE_CHECKING:
    from lightning_gradguard.core.engine import GradGuardEngine
    from lightning_gradguard.core.observer import StepCheck

ZERO_LR = "zero_lr"
SKIPPED = "skipped_by_optimizer"
UPDATE_KINDS = (ZERO_LR, SKIPPED)

FIRST_OBSERVED = 2  # versions are compared across the first steps of each optimizer ...
OBSERVE_GAP = 50  # ... then across every this-many-th
_MAX_CACHED = 32  # param-group member lists kept by identity
_MAX_NAMES = 8  # names per explanation in a message

_VERSION = attrgetter("_version")


class _Watched:
    """One optimizer of this run: its post-hook, the observation cadence, and what the check saw of the step in
    progress until the post-hook counts it (``step`` is None when no checked step is pending)."""

    __slots__ = ("ref", "handle", "position", "step", "checked", "indices", "params", "versions", "suspects")

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.ref = weakref.ref(optimizer)
        self.handle: Any = None
        self.position: Optional[int] = None  # its checked steps before this one, over the whole training
        self.drop()

    def drop(self) -> None:
        """Nothing pending (never hold a parameter past the step)."""
        self.step: Optional[int] = None
        self.checked: list[int] = []
        self.indices: Optional[list[int]] = None  # the parameters whose versions were read (when they were)
        self.params: Optional[list[Tensor]] = None
        self.versions: Optional[list[int]] = None
        self.suspects: list[tuple[int, Tensor, int]] = []  # (index, parameter, version) of those still suspected


class UpdateWatch:
    """Counts, per parameter, the steps that did not move it; owned by the engine (see the module docstring).

    Example::

        watch = UpdateWatch(engine)
        watch.before_step(optimizer, check, indices, params)   # from the step check
        optimizer.step()                                        # the post-hook counts
        error = watch.finish()                                  # the run ended: findings, warning or strict error

    """

    def __init__(self, engine: GradGuardEngine) -> None:
        self.engine = engine
        self.enabled = True
        self.stopped = False  # strict mode stopped the run at a step: the verdict at its end raises nothing more
        self.last_step = 0
        self._watched: dict[int, _Watched] = {}
        self._members: dict[tuple[int, int, int], tuple[list[int], list[int]]] = {}
        self._warned: set[tuple[str, str]] = set()
        # untouched at an observed step (a sample): read around every step until one moves them (a warm-up that
        # held them still at the observed steps); a write outside step() (weight clipping) does not clear them
        self._suspects: set[int] = set()
        self._moved: set[int] = set()

    # ------------------------------------------------------------------ lifecycle
    def start_run(self) -> None:
        """A run begins: hooks are put on again as optimizers step; the cadence restarts; the verdict of an earlier
        run is dropped (it is taken again at this run's end, over all the counts)."""
        self.close()
        self._watched.clear()
        self.stopped = False
        self.engine.found.replace(UPDATE_KINDS, [], warn=False)
        self._suspects, self._moved = set(), set()

    def close(self) -> None:
        """Remove every post-hook and drop what a step left pending (the optimizers stay known for :meth:`finish`)."""
        for watched in self._watched.values():
            if watched.handle is not None:
                watched.handle.remove()
                watched.handle = None
            watched.drop()

    # ------------------------------------------------------------------ the step
    def before_step(self, optimizer: Any, check: StepCheck, indices: list[int], params: list[Tensor]) -> None:
        """The check of ``optimizer``'s step passed (``indices``/``params``: its parameters, as gathered)."""
        if not self.enabled:
            return
        try:
            self._capture(optimizer, check, indices, params)
        except Exception as err:  # noqa: BLE001 - this check must never stop the step check
            self._fail(err)

    def _capture(self, optimizer: Any, check: StepCheck, indices: list[int], params: list[Tensor]) -> None:
        watched = self._watched.get(id(optimizer))
        if watched is None or watched.handle is None or watched.ref() is not optimizer:
            watched = self._watch(optimizer)
            if watched is None:
                return
        elif watched.step == check.step:
            return  # a second check inside one step (an adapter that checks more than once): the first one counts
        self.last_step = watched.step = check.step
        watched.checked, watched.indices, watched.params, watched.versions = check.checked, None, None, None
        if watched.position is None:  # once a run: the count the checkpoint carried on (the check counted this step)
            steps = self.engine.state.values("steps")
            watched.position = int(steps[check.checked].max()) - 1 if check.checked else 0
        else:
            watched.position += 1
        if watched.position < FIRST_OBSERVED or watched.position % OBSERVE_GAP == 0:
            watched.indices, watched.params = self._candidates(optimizer, check, indices, params)
            watched.versions = list(map(_VERSION, watched.params))
        if self._suspects:
            registry = self.engine.registry.params
            watched.suspects = [(i, registry[i], registry[i]._version) for i in self._suspects - self._moved]

    def _watch(self, optimizer: Any) -> Optional[_Watched]:
        register = getattr(optimizer, "register_step_post_hook", None)
        if register is None or not isinstance(optimizer, torch.optim.Optimizer):
            return None  # not a torch optimizer: its steps cannot be seen
        ref = weakref.ref(self)
        watched = _Watched(optimizer)

        def stepped(opt: Any, args: Any, kwargs: Any) -> None:
            watch = ref()
            if watch is not None and watched.step is not None:  # not a step the guard did not check
                watch.stepped(opt)

        watched.handle = register(stepped)
        if len(self._watched) >= _MAX_CACHED:  # optimizers re-created within a run: forget the ones that are gone
            for key in [key for key, old in self._watched.items() if old.ref() is None]:
                del self._watched[key]
        self._watched[id(optimizer)] = watched
        return watched

    def _candidates(
        self, optimizer: Any, check: StepCheck, indices: list[int], params: list[Tensor]
    ) -> tuple[list[int], list[Tensor]]:
        """The parameters whose versions tell something: checked, with a gradient, outside fused groups."""
        registry = self.engine.registry
        skip = set(check.missing)
        for group in optimizer.param_groups:
            if group.get("fused"):  # a fused kernel writes without moving version counters
                skip.update(registry.find(p) for p in group["params"])
        shards = any(o.skip_empty_shards for o in self.engine.observers)  # FSDP1: a shard may be empty here
        if not skip and not shards and check.checked is indices:
            return indices, params
        keep = set(check.checked).difference(skip)
        pairs = [(i, p) for i, p in zip(indices, params) if i in keep and (not shards or p.numel())]
        return [i for i, _ in pairs], [p for _, p in pairs]

    def stepped(self, optimizer: Any) -> None:
        """``optimizer.step()`` returned (its post-hook): count the step the check saw."""
        watched = self._watched.get(id(optimizer))
        if not self.enabled or watched is None or watched.step is None:
            return
        try:
            self._count(optimizer, watched)
        except Exception as err:  # noqa: BLE001 - never break the user's optimizer.step()
            self._fail(err)
        finally:
            watched.drop()

    def _count(self, optimizer: Any, watched: _Watched) -> None:
        state = self.engine.state
        checked = watched.checked
        state.add_uniform(checked, update_steps=1)
        groups = optimizer.param_groups
        zero = [g for g, group in enumerate(groups) if _is_zero(group.get("lr"))]
        if zero and len(zero) == len(groups):  # a warmup from 0 scales every group alike: one pending count
            state.add_uniform(checked, zero_lr_steps=1)
        else:
            for g in zero:
                members = self._group_members(checked, groups[g]["params"])
                if members:
                    state.add_uniform(members, zero_lr_steps=1)
        for index, param, version in watched.suspects:
            if param._version != version:
                self._moved.add(index)
        if watched.versions is not None:
            self._compare(watched)

    def _compare(self, watched: _Watched) -> None:
        before, indices = watched.versions, watched.indices
        after = list(map(_VERSION, watched.params))  # type: ignore[arg-type]
        if after == before:
            return  # the step moved no version counter at all: it cannot tell a skip from a write around them
        state = self.engine.state
        if indices is watched.checked:
            state.add_uniform(indices, version_steps=1)
        else:
            state.add("version_steps", indices, 1)
        if any(map(eq, before, after)):  # type: ignore[arg-type]  # in C: the usual step moved every one
            untouched = [i for i, same in zip(indices, map(eq, before, after)) if same]  # type: ignore[arg-type]
            state.add("untouched_steps", untouched, 1)
            self._suspects.update(untouched)

    def _group_members(self, checked: list[int], group_params: list[Tensor]) -> list[int]:
        """The checked parameters of one param group, as the same list step after step (pending counts)."""
        key = (id(checked), id(group_params), len(group_params))
        hit = self._members.get(key)
        if hit is not None and hit[0] is checked:  # holding `checked` keeps its id from being reused meanwhile
            return hit[1]
        if len(self._members) >= _MAX_CACHED:
            self._members.clear()
        inside = set(checked)
        found = (self.engine.registry.find(p) for p in group_params)
        members = [i for i in found if i is not None and i in inside]
        self._members[key] = (checked, members)
        return members

    def _fail(self, err: Exception) -> None:
        self.enabled = False
        self.close()
        self.engine.warn(internal_error(
            f"GradGuard: internal error in the check for weights that never move ({type(err).__name__}: {err}); it "
            "is turned off for the rest of this run, training continues. Please report this at the project's issue "
            "tracker."
        ))

    # ------------------------------------------------------------------ the verdict
    def finish(self) -> Optional[GradGuardError]:
        """The run ended: the parameters that never moved become findings of the engine (earlier ones of these
        kinds are replaced). Outside strict mode new warnings are warned about once; in strict mode the error to
        raise once the report is written comes back (None when there is nothing to raise)."""
        self.close()
        engine = self.engine
        try:
            found = self.findings()
        except Exception as err:  # noqa: BLE001 - a verdict that failed must not lose the report
            self._fail(err)
            return None
        engine.found.replace(UPDATE_KINDS, found, warn=False)  # warned below, in words of its own
        warnings = [f for f in found if f.severity != NOTE]
        if not warnings:
            return None
        if engine.config.strict:
            if self.stopped:
                return None
            return GradGuardError(never_moved_message(warnings), [f.name for f in warnings], self.last_step)
        new = [f for f in warnings if (f.kind, f.name) not in self._warned]
        if new:
            self._warned.update((f.kind, f.name) for f in new)
            engine.warn(never_moved_message(new))
        return None

    def findings(self) -> list[Finding]:
        """A finding for each parameter that had a gradient but never moved at a counted step of the run so far."""
        self.engine.sync_size()
        self.engine.flush()  # the measured counts (zero gradients) are added up lazily
        state, registry = self.engine.state, self.engine.registry
        v = {name: state.values(name) for name in (
            "steps", "none_steps", "update_steps", "zero_lr_steps", "version_steps", "untouched_steps",
            "measured_steps", "zero_steps")}
        allowed = torch.tensor(registry.allowed, dtype=torch.bool).reshape(-1)
        had_grad = (v["steps"] > 0) & (v["none_steps"] < v["steps"]) & ~allowed  # never a gradient: "missing"
        frozen = had_grad & (v["update_steps"] > 0) & (v["zero_lr_steps"] == v["update_steps"])
        always_zero = (v["measured_steps"] > 0) & (v["zero_steps"] == v["measured_steps"])
        skipped = had_grad & ~frozen & ~always_zero & (v["version_steps"] > 0)
        skipped &= v["untouched_steps"] == v["version_steps"]
        for i in self._moved:  # a step between the observed ones wrote it (see _suspects)
            if i < len(skipped):
                skipped[i] = False
        flagged = (frozen | skipped).nonzero().flatten().tolist()
        if not flagged:
            return []
        where = self._where(set(flagged))
        found = []
        for i in flagged:
            name = registry.names[i]
            if frozen[i]:
                n = int(v["update_steps"][i])
                found.append(Finding(ZERO_LR, name, _zero_lr_detail(where.get(i), n), WARNING if n > 1 else NOTE))
            else:
                n = int(v["version_steps"][i])
                found.append(Finding(SKIPPED, name, _skipped_detail(where.get(i), n), WARNING if n > 1 else NOTE))
        return found

    def _where(self, indices: set[int]) -> dict[int, tuple[str, int, dict[str, Any]]]:
        """Registry index -> (optimizer class, param group index, the group) for the optimizers of this run."""
        where: dict[int, tuple[str, int, dict[str, Any]]] = {}
        for watched in self._watched.values():
            optimizer = watched.ref()
            if optimizer is None:
                continue
            for g, group in enumerate(optimizer.param_groups):
                for param in group["params"]:
                    index = self.engine.registry.find(param)
                    if index in indices and index not in where:
                        where[index] = (type(optimizer).__name__, g, group)
        return where


# ---------------------------------------------------------------------------------------------- wording
def _is_zero(lr: Any) -> bool:
    if type(lr) is float or isinstance(lr, int):
        return lr == 0
    if isinstance(lr, Tensor) and lr.device.type == "cpu" and lr.numel() == 1:
        return lr.item() == 0
    return False  # None (a relative-step Adafactor), or a learning rate on the device (reading it would sync)


def _lr(value: Any) -> str:
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    return f"{value:g}" if isinstance(value, (int, float)) else repr(value)


def _steps(n: int) -> str:
    return "the only optimizer step of this run" if n == 1 else f"each of its {n} optimizer steps"


def _zero_lr_detail(where: Optional[tuple[str, int, dict[str, Any]]], n: int) -> str:
    group = f"param group {where[1]} of {where[0]}" if where is not None else "its param group"
    initial = where[2].get("initial_lr") if where is not None else None
    scheduled = initial is not None and not _is_zero(initial)
    if scheduled:
        text = f"{group} had lr=0 at {_steps(n)}: its learning-rate scheduler held it there (initial_lr={_lr(initial)})"
    else:
        text = f"{group} has lr=0: its learning rate was 0 at {_steps(n)}"
    if n == 1:
        return (f"{text}, so it received a gradient but did not move; a warmup that starts at 0 looks the same "
                "(a longer run tells them apart)")
    if scheduled:
        fix = ("check the scheduler: a warmup from 0 that did not end within this run (more warmup steps than the "
               "run has, or stepped per epoch in a one-epoch run), or a decay that reached 0 at once")
    else:
        fix = "give the group a learning rate > 0, or freeze its parameters on purpose with requires_grad=False"
    return f"{text}, so it received gradients but never moved; fix: {fix}"


def _skipped_detail(where: Optional[tuple[str, int, dict[str, Any]]], n: int) -> str:
    owner = f"{where[0]}.step()" if where is not None else "the optimizer's step()"
    when = "at the only step of this run" if n == 1 else f"at each of the {n} steps"
    text = (f"{owner} left it untouched {when} GradGuard observed (its version counter did not change, while other "
            "parameters' did), although it had a gradient")
    if where is not None:
        text += f"; it is in param group {where[1]} (lr={_lr(where[2].get('lr'))})"
    if n == 1:
        return text
    return (f"{text}; fix: check the optimizer's step(): a custom or wrapped optimizer that skips this group or "
            "parameter; to freeze it on purpose, set requires_grad=False")


def never_moved_message(findings: list[Finding]) -> str:
    """The warning (and strict mode's error) naming the parameters that never moved, grouped by explanation."""
    shared: dict[tuple[str, str], list[str]] = defaultdict(list)
    for finding in findings:
        shared[(finding.kind, finding.detail)].append(finding.name)
    n = len(findings)
    lines = [f"GradGuard: {n} trainable parameter{'s' if n != 1 else ''} never moved in this run:"]
    for (kind, detail), names in shared.items():
        more = len(names) - _MAX_NAMES
        lines.append(f"  {', '.join(names[:_MAX_NAMES])}{f' and {more} more' if more > 0 else ''}  [{kind}] {detail}")
    return "\n".join(lines)
