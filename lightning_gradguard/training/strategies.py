"""Which training strategy runs the model, and what a ``None`` gradient means under it.

A ``None`` in ``p.grad`` means different things under different strategies:

* single device, DDP: the parameter received no gradient. Under DDP the gradients at the optimizer step are the
  all-reduced ones, so every rank sees the same Nones; only the micro-batches that merely accumulate (``no_sync``)
  see this rank's own gradients.
* FSDP (``use_orig_params=True``): each original parameter is a 1-D view of this rank's shard. A parameter with no
  data on this rank has a None gradient there by design, and a parameter unused while others of its FSDP unit are
  used gets a zero gradient, not None. Norms are shard-local.
* FSDP2 (``fully_shard``, ``ModelParallelStrategy``): gradients are DTensors, None means unused (on every rank);
  norms of the local shards must be combined across ranks.
* DeepSpeed ZeRO: gradients do not live in ``p.grad`` at all (they are partitioned into DeepSpeed's buffers), so
  ``None`` means nothing.

:func:`describe_strategy` reads this from a Lightning Trainer; the rest of the guard asks the returned
:class:`StrategyInfo` instead of testing strategy classes itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

SINGLE = "single"
DDP = "ddp"
FSDP = "fsdp"
FSDP2 = "fsdp2"
DEEPSPEED = "deepspeed"
OTHER = "other"


@dataclass(frozen=True)
class StrategyInfo:
    """What the guard needs to know about how gradients are distributed.

    Attributes:
        name: ``"single"``, ``"ddp"``, ``"fsdp"``, ``"fsdp2"``, ``"deepspeed"`` or ``"other"``.
        world_size: the number of processes that train together.
        rank: this process's global rank.
        find_unused_parameters: DDP's setting, or ``static_graph=True``, which tolerates unused parameters
            as well (None for other strategies).
        zero_stage: DeepSpeed's ZeRO stage (None for other strategies).
        use_orig_params: FSDP's setting (None for other strategies).

    """

    name: str = SINGLE
    world_size: int = 1
    rank: int = 0
    find_unused_parameters: Optional[bool] = None
    zero_stage: Optional[int] = None
    use_orig_params: Optional[bool] = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def grads_visible(self) -> bool:
        """Whether ``p.grad`` holds the gradients at the optimizer step (False under DeepSpeed)."""
        return self.name != DEEPSPEED

    @property
    def shard_local_grads(self) -> bool:
        """Whether each rank's ``p.grad`` holds only its shard: norms need a reduction across ranks."""
        return self.distributed and self.name in (FSDP, FSDP2)

    @property
    def none_is_local(self) -> bool:
        """Whether a None gradient may mean "no data on this rank" (FSDP1): ranks then see different Nones."""
        return self.distributed and self.name == FSDP

    @property
    def local_micro_batches(self) -> bool:
        """Whether the micro-batches that only accumulate see this rank's own gradients (DDP ``no_sync``)."""
        return self.distributed and self.name == DDP

    def unchecked(self) -> Optional[str]:
        """A plain statement of what the guard cannot check under this strategy; None when it checks everything."""
        if self.name == DEEPSPEED:
            stage = f"ZeRO stage {self.zero_stage}" if self.zero_stage is not None else "ZeRO"
            return (
                f"under DeepSpeed ({stage}) gradients live in DeepSpeed's partitioned buffers, not in p.grad, so "
                "GradGuard does not check missing gradients, micro-batch arrivals, per-parameter norms or non-finite "
                "gradients there (DeepSpeed itself logs the global gradient norm and skips overflowing steps); run a "
                "short debugging fit with strategy='ddp' to check them"
            )
        if self.name == FSDP and self.use_orig_params is False:
            return (
                "under FSDP with use_orig_params=False the optimizer holds FSDP's flattened parameters, so GradGuard "
                "checks those (names ending in _flat_param) and not your parameters; pass use_orig_params=True"
            )
        if self.name == FSDP:
            return (
                "under FSDP (use_orig_params=True) a parameter that is unused while other parameters of its FSDP unit "
                "are used receives a zero gradient from FSDP, not None: GradGuard reports it as a gradient that was "
                "zero at every measured step (cause 'zero'), not as a missing one; norms and counts are global"
            )
        if self.name == OTHER and self.distributed:
            return (
                "GradGuard does not know this strategy: counts and norms are those of rank 0's gradients, and a "
                "None gradient is reported as missing"
            )
        return None


def describe_strategy(trainer: Any) -> StrategyInfo:
    """Read a Lightning Trainer's strategy (call after the strategy has wrapped the model, e.g. in
    ``on_train_start``).

    Example::

        info = describe_strategy(trainer)
        if info.shard_local_grads: ...

    """
    strategy = trainer.strategy
    world_size = int(getattr(trainer, "world_size", 1) or 1)
    rank = int(getattr(trainer, "global_rank", 0) or 0)
    kind = _kind(strategy)
    if kind == DDP:
        model = getattr(strategy, "model", None)
        find_unused = getattr(model, "find_unused_parameters", None)
        if find_unused is None:
            kwargs = getattr(strategy, "_ddp_kwargs", {})
            find_unused = bool(kwargs.get("find_unused_parameters", False) or kwargs.get("static_graph", False))
        return StrategyInfo(DDP, world_size, rank, find_unused_parameters=bool(find_unused) or _static_graph(model))
    if kind == FSDP:
        use_orig = getattr(strategy, "kwargs", {}).get("use_orig_params", True)
        return StrategyInfo(FSDP, world_size, rank, use_orig_params=bool(use_orig))
    if kind == DEEPSPEED:
        config = getattr(strategy, "config", None) or {}
        stage = (config.get("zero_optimization") or {}).get("stage") if isinstance(config, dict) else None
        return StrategyInfo(DEEPSPEED, world_size, rank, zero_stage=stage)
    return StrategyInfo(kind, world_size, rank)


def _static_graph(model: Any) -> bool:
    """DDP's ``static_graph=True`` learns the unused parameters in the first iteration and reduces without them,
    as ``find_unused_parameters=True`` does: a parameter without a gradient does not stop the reduction."""
    return getattr(model, "static_graph", False) is True


def class_names(obj: Any) -> set[str]:
    """The names of ``obj``'s classes: wrappers are recognized by name, so that no optional import is needed."""
    return {cls.__name__ for cls in type(obj).__mro__}


def describe_module(model: Any) -> StrategyInfo:
    """The strategy of a hand-written loop, from the wrapper torch.distributed put around ``model``.

    ``DistributedDataParallel``, ``FullyShardedDataParallel`` (FSDP1) and ``fully_shard`` (FSDP2) modules are
    recognized by class name; anything else, or no initialized process group, is a single process as far as the
    guard can tell (each process checks its own gradients).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return StrategyInfo()
    world_size, rank = dist.get_world_size(), dist.get_rank()
    names = class_names(model)
    if "DistributedDataParallel" in names:
        tolerant = bool(getattr(model, "find_unused_parameters", False)) or _static_graph(model)
        return StrategyInfo(DDP, world_size, rank, find_unused_parameters=tolerant)
    if "FullyShardedDataParallel" in names:
        return StrategyInfo(FSDP, world_size, rank, use_orig_params=bool(getattr(model, "_use_orig_params", False)))
    if "FSDPModule" in names:
        return StrategyInfo(FSDP2, world_size, rank)
    return StrategyInfo()


def _kind(strategy: Any) -> str:
    try:
        from lightning.pytorch.strategies import (
            DDPStrategy,
            DeepSpeedStrategy,
            FSDPStrategy,
            ModelParallelStrategy,
            SingleDeviceStrategy,
        )
    except ImportError:  # pragma: no cover - an old Lightning without one of them
        return _kind_by_name(strategy)
    if isinstance(strategy, DeepSpeedStrategy):  # a DDPStrategy subclass: test it first
        return DEEPSPEED
    if isinstance(strategy, DDPStrategy):
        return DDP
    if isinstance(strategy, FSDPStrategy):
        return FSDP
    if isinstance(strategy, ModelParallelStrategy):
        return FSDP2
    if isinstance(strategy, SingleDeviceStrategy):
        return SINGLE
    return _kind_by_name(strategy)


def _kind_by_name(strategy: Any) -> str:
    names = class_names(strategy)
    for name, kind in (
        ("DeepSpeedStrategy", DEEPSPEED),
        ("DDPStrategy", DDP),
        ("FSDPStrategy", FSDP),
        ("ModelParallelStrategy", FSDP2),
        ("SingleDeviceStrategy", SINGLE),
    ):
        if name in names:
            return kind
    return OTHER
