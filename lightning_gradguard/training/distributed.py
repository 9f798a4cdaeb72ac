"""Global counts, norms and strict decisions across ranks, with at most one collective per logging step.

Each rank's engine counts what its own ``p.grad`` shows. Where that differs from what the whole job did, this
module corrects the counts with **one** ``all_reduce`` (a packed float64 vector) at logging steps and at the end
of fit, never on other steps:

* **DDP** (``local_micro_batches``): at the optimizer step the gradients are the all-reduced ones, identical on
  every rank, and so are the step counts and norms. Per micro-batch they are not (``no_sync``, and DDP's write-back
  of the window's averaged gradient): :mod:`~lightning_gradguard.training.rank_arrivals` records which parameters
  this rank's backward passes reached in each micro-batch, one bit per rank per (micro-batch, parameter) in the
  reduction. A micro-batch counts as "no gradient" only when no rank gave one (as in a single process over the same
  data); one where some ranks did and others did not is reported with the ranks that did not (``rank_dependent``).
* **FSDP / FSDP2** (``shard_local_grads``): a gradient holds this rank's shard, so a norm is combined from the
  ranks' ``norm ** p`` sums; a parameter's gradient is non-finite at a step when any shard is. Under FSDP1 a rank
  whose shard of a parameter is empty does not check it, and the counts of the ranks that hold it are the global
  ones.

Strict mode must stop every rank at the same step, or the ranks that go on wait forever in their next collective.
Ranks can see different Nones at a step (FSDP1 shards; a ``zero_grad`` or ``p.grad = None`` run on one rank only),
so :meth:`RankLedger.decide` takes the decision together: one scalar all-reduce per step in strict mode, and the
list of parameters only at a step where some rank has one. Every rank then raises the same error.

The counters are combined as :mod:`lightning_gradguard.core.state` declares them: ``same`` counters are taken from
the ranks that hold the parameter (FSDP1); ``any`` and ``all`` counters are flagged per measured step: a step counts
when any rank's shard flags it (a non-finite value), or when the parameter was measured and no rank's shard dissents
(an all-zero gradient is zero in every shard; a rank whose shard of it is empty does not dissent).

The packing of per-rank flags into the one all-reduce is :mod:`lightning_gradguard.training.collective`'s.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_gradguard.core.norms import NormGroup
from lightning_gradguard.core.observer import EngineObserver, StepCheck
from lightning_gradguard.core.state import ALL_RANKS, DEVICE_COUNTERS, HOST_COUNTERS, SAME
from lightning_gradguard.training.collective import Collective, pack_flags, unpack_flags
from lightning_gradguard.training.rank_arrivals import RankArrivals
from lightning_gradguard.training.strategies import DDP, StrategyInfo

if TYPE_CHECKING:
    from lightning_gradguard.core.engine import GradGuardEngine

# counters every rank that checks a parameter counts alike, and counters flagged per measured step from norms
_SAME_COUNTERS = tuple(c.name for c in HOST_COUNTERS if c.combine == SAME)
_FLAG_COUNTERS = DEVICE_COUNTERS


# ---------------------------------------------------------------------- the ledger
class RankLedger(EngineObserver):
    """Keeps what this rank saw and makes the engine's counts, norms and strict decisions global.

    Args:
        engine: the rank's engine; the ledger installs its hooks on it.
        info: the strategy (see :func:`~lightning_gradguard.training.strategies.describe_strategy`).
        collective: the process group to reduce over.

    Example::

        ledger = RankLedger(engine, describe_strategy(trainer), Collective())
        ledger.start_micro_batch()
        ...  # engine.check_step(...)
        ledger.after_check(check, measured=True)
        ledger.reduce([check])  # on every rank, at logging steps only

    """

    def __init__(
        self, engine: GradGuardEngine, info: StrategyInfo, collective: Collective, joinable: Any = None
    ) -> None:
        self.engine = engine
        self.info = info
        self.collective = collective
        self.world_size = collective.world_size
        self.rank = collective.rank
        # DDP: what each rank's backward passes reached, per micro-batch (see rank_arrivals)
        self.arrivals = RankArrivals(engine, self.world_size, self.rank) if info.local_micro_batches else None
        self._flags: list[Tensor] = []  # per measured step: this rank's flags of the declared flag counters
        self.reductions = 0  # collectives made (for tests and benchmarks)
        self.votes = 0
        # DDP without find_unused_parameters, and a parameter here got no gradient: the reducer's bucket all-reduces
        # are still pending, and any collective of ours would be matched against them (gloo aborts the process). No
        # more collectives: DDP's own error, at its next one, ends the run as it would without the guard.
        self.stalled = False
        self._may_stall = info.name == DDP and not info.find_unused_parameters
        self.skip_empty_shards = info.none_is_local  # FSDP1: a parameter with no shard here is checked elsewhere
        self.rewrites_grads = info.local_micro_batches  # DDP's reducer writes the averaged gradients back
        # DDP's join() (uneven inputs): a rank out of data answers only DDP's own collectives, so ours would be
        # matched against them (gloo aborts). From the first sight of it each rank keeps its own counts.
        self._joinable = joinable
        self.joined = False
        engine.observe(self)

    def detach(self) -> None:
        """Leave the engine's protocol and take the hooks off the parameters (a new fit builds a new ledger)."""
        self.release_hooks()
        self.engine.unobserve(self)

    def release_hooks(self) -> None:
        """Take the per-parameter autograd hooks off (end of fit: the model may train on without the guard);
        what the ledger learned stays readable."""
        if self.arrivals is not None:
            self.arrivals.release()

    # ------------------------------------------------------------------ recording (no communication)
    def start_micro_batch(self) -> None:
        """Call as a micro-batch starts (before its forward pass)."""
        if self.arrivals is not None and not self._under_join():
            self.arrivals.start_micro_batch()

    def _under_join(self) -> bool:
        """Whether the model trains under DDP's ``join()`` (see :attr:`joined`); the first time, what waits for a
        reduction is dropped: the ranks' columns no longer line up."""
        if self.joined:
            return True
        config = getattr(self._joinable, "_join_config", None)
        if config is None or not getattr(config, "enable", False):
            return False
        self.joined = True
        if self.arrivals is not None:
            self.arrivals.drop()
        self._flags = []
        return True

    def _stalls(self, missing: Sequence[int]) -> bool:
        """DDP without find_unused_parameters: whether a parameter of ``missing`` got nothing from this rank's last
        backward pass, which leaves DDP's reducer waiting (see :attr:`stalled`). A gradient cleared after the backward
        pass (a zero_grad on one rank) was reduced: the ranks can still vote."""
        if not (self._may_stall and missing and self.arrivals is not None):
            return False
        return self.arrivals.missed_last(missing)

    def after_backward(self, micro_batch: int, missed: Sequence[int]) -> None:
        if self.arrivals is not None:
            self.arrivals.after_backward(missed)

    def after_check(self, check: StepCheck) -> None:
        """After every optimizer-step check (every rank measures on the same steps)."""
        if not self.stalled and self._stalls(check.missing):  # before the column of the window closes
            self.stalled = True
        if self.arrivals is not None:
            self.arrivals.close_window(check)
        if check.measured and self.info.shard_local_grads:
            self._flags.append(self._step_flags(check))

    def _step_flags(self, check: StepCheck) -> Tensor:
        """``[1 + counter, parameter]``: which parameters this rank measured at this step, then per counter measured
        from norms its flag (``any`` counters) or its dissent (``all`` counters: measured here, not flagged)."""
        flags = torch.zeros(1 + len(_FLAG_COUNTERS), len(self.engine.registry), dtype=torch.bool,
                            device=self.collective.device)
        for indices, group in check.norms:
            idx = torch.tensor(indices, dtype=torch.int64, device=flags.device)
            norms = group.norms.to(flags.device, non_blocking=True)
            flags[0, idx] = True
            for row, counter in enumerate(_FLAG_COUNTERS, start=1):
                flag = counter.from_norms(norms)  # type: ignore[misc]
                flags[row, idx] = flag.logical_not_() if counter.combine == ALL_RANKS else flag
        return flags

    # ------------------------------------------------------------------ the one collective of a logging step
    def pending(self, checks: Sequence[StepCheck] = ()) -> bool:
        """Whether :meth:`reduce` has anything to reduce (the same answer on every rank)."""
        shard_norms = self.info.shard_local_grads and bool(checks)
        columns = self.arrivals is not None and bool(self.arrivals.closed)
        return bool(columns or self._flags or shard_norms or self.info.none_is_local)

    def reduce(self, checks: Sequence[StepCheck] = ()) -> None:
        """Make the counts global and the norms of ``checks`` (this logging step's checks) global: one all-reduce.

        Call on every rank at the same point (logging steps, end of fit); it does nothing when there is nothing
        to reduce, which is the same on every rank.
        """
        if self.stalled or self._under_join() or not self.pending(checks):
            return
        size = len(self.engine.registry)
        segments: list[tuple[str, Tensor]] = []
        columns = self.arrivals is not None and bool(self.arrivals.closed)
        if columns:
            words, arrived = self.arrivals.segment(size)  # type: ignore[union-attr]
            segments.append(("arrivals", words))
        flags = self._flags
        if flags:
            local_flags = torch.stack([_pad_columns(f, size) for f in flags])  # [steps, counters, params], on device
            steps, kinds, _ = local_flags.shape
            segments.append(("flags", pack_flags(local_flags.reshape(steps * kinds, size), self.rank, self.world_size)))
        p = self.engine.config.norm_type
        norms_local = None
        if self.info.shard_local_grads and checks:
            norms_local, measured = self._local_norms(checks, size, p)
            if not math.isinf(p):
                segments.append(("norms", norms_local))
            segments.append(("measured", measured))
        if self.info.none_is_local:
            held = torch.tensor([float(bool(param.numel())) for param in self.engine.registry.params])
            segments.append(("held", held))
            self.engine.flush()
            for name in _SAME_COUNTERS:
                segments.append((name, self.engine.state.values(name).to(torch.float64) * held))
            missing = torch.zeros(size, dtype=torch.float64)
            for check in checks:
                if check.missing:
                    missing[check.missing] = 1.0
            segments.append(("missing", missing))

        # one vector on the collective's device; its result comes back to the host in one copy
        device = self.collective.device
        flat = torch.cat([t.reshape(-1).to(device=device, dtype=torch.float64, non_blocking=True) for _, t in segments])
        total = self.collective.sum(flat)
        self.reductions += 1
        result: dict[str, Tensor] = {}
        offset = 0
        for name, tensor in segments:
            n = tensor.numel()
            result[name] = total[offset : offset + n].view(tensor.shape)
            offset += n

        if columns:
            self.arrivals.apply(result["arrivals"], arrived, checks)  # type: ignore[union-attr]
        if flags:
            self._apply_flags(result["flags"], local_flags)
            self._flags = []
        if "measured" in result:
            if math.isinf(p):  # a max does not add up: one more collective, only for norm_type="inf" when sharded
                self.reductions += 1
                global_norms = self.collective.max(norms_local)
            else:
                global_norms = result["norms"].clamp(min=0) ** (1.0 / p)
            self._write_norms(checks, global_norms, result["measured"])
        if self.info.none_is_local:
            self._apply_held_counts(result)
            present = (result["missing"] > 0).nonzero().flatten().tolist()
            for check in checks:
                check.missing = present if check is checks[0] else []

    def _local_norms(self, checks: Sequence[StepCheck], size: int, p: float) -> tuple[Tensor, Tensor]:
        powered = torch.zeros(size, dtype=torch.float64, device=self.collective.device)
        measured = torch.zeros(size, dtype=torch.float64)
        for check in checks:
            for indices, group in check.norms:
                norms = group.norms.to(self.collective.device, torch.float64, non_blocking=True)
                idx = torch.tensor(indices, dtype=torch.int64, device=powered.device)
                powered[idx] = norms if math.isinf(p) else norms.abs() ** p
                measured[indices] = 1.0
        return powered, measured

    def _apply_flags(self, words: Tensor, local: Tensor) -> None:
        steps, kinds, size = local.shape
        cells = unpack_flags(words, steps * kinds, self.world_size).reshape(steps, kinds, size).to(local.device)
        index = torch.arange(size, device=local.device)
        measured_anywhere, measured_here = cells[:, 0] != 0, local[:, 0]
        for k, counter in enumerate(_FLAG_COUNTERS, start=1):
            if counter.combine == ALL_RANKS:
                counted = measured_anywhere & (cells[:, k] == 0)
                own = measured_here & ~local[:, k]
            else:
                counted, own = cells[:, k] != 0, local[:, k]
            # the global count minus what this rank counted, added on the device: no host copy
            self.engine.state.add_device(counter.name, index, (counted.sum(0) - own.to(torch.int64).sum(0)))

    def _write_norms(self, checks: Sequence[StepCheck], norms: Tensor, measured: Tensor) -> None:
        indices = (measured > 0).nonzero().flatten().tolist()
        if not indices:
            return
        device = checks[0].norms[0][1].norms.device if checks[0].norms else torch.device("cpu")
        group = NormGroup(list(range(len(indices))), norms[indices].to(device=device, dtype=torch.float32))
        for check in checks:  # the logging step's metrics read the union of all checks' norms
            check.norms = [(indices, group)] if check is checks[0] else []

    def _apply_held_counts(self, result: dict[str, Tensor]) -> None:
        held = result["held"]
        known = held > 0
        if not known.any():
            return
        for name in _SAME_COUNTERS:
            # the ranks that hold a parameter agree on its counts; the others did not check it
            self.engine.state.assign(name, known, torch.round(result[name][known] / held[known]))

    # ------------------------------------------------------------------ strict mode: one decision for all ranks
    def decide(self, missing: list[int]) -> list[int]:
        """The parameters missing on any rank: every rank gets the same list, so all raise at the same step or none.

        A rank-dependent ``zero_grad`` or an FSDP shard makes ranks see different Nones; a rank that raised alone
        would leave the others waiting in their next collective. One scalar all-reduce per step, and the list
        itself only at a step where some rank has one.
        """
        if self._under_join():  # no collective can be matched: each rank decides from its own gradients
            return missing
        if self.stalled or self._stalls(missing):
            self.stalled = True  # this rank raises alone (see __init__)
            return missing
        self.votes += 1
        if not self.collective.sum(torch.tensor([float(bool(missing))], dtype=torch.float64)).item():
            return []
        flags = torch.zeros(len(self.engine.registry), dtype=torch.float64)
        if missing:
            flags[missing] = 1.0
        return (self.collective.sum(flags) > 0).nonzero().flatten().tolist()

    # ------------------------------------------------------------------ reading out
    def rank_dependent(self) -> dict[str, dict[str, Any]]:
        """Parameters some ranks gave a gradient in a micro-batch and others did not, by name (DDP)."""
        return self.arrivals.rank_dependent() if self.arrivals is not None else {}


def _pad_columns(flags: Tensor, size: int) -> Tensor:
    """``[counters, params]`` flags widened to ``size`` parameters (the registry grew since they were taken)."""
    if flags.shape[-1] >= size:
        return flags[..., :size]
    return torch.cat([flags, flags.new_zeros(*flags.shape[:-1], size - flags.shape[-1])], dim=-1)
