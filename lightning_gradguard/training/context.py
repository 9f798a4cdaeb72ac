"""How the model trains, as far as it changes what a gradient means: precision, strategy and ranks.

The Lightning callback builds one :class:`TrainingContext` per fit (in ``on_train_start``, once the strategy has
wrapped the model) and asks it, at each hook, for what depends on precision or strategy: the loss scale to divide
norms by, whether this micro-batch's backward pass is all-reduced, when the one collective of a logging step is
due, what to add to the report and to an exception. Everything strategy-specific stays in
:mod:`~lightning_gradguard.training.precision`, :mod:`~lightning_gradguard.training.strategies`,
:mod:`~lightning_gradguard.training.distributed` and :mod:`~lightning_gradguard.training.ddp_reducer`; the engine
stays framework-free.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Callable, Optional

from torch import Tensor

from lightning_gradguard.core.causes import ZERO
from lightning_gradguard.core.messages import fsdp_zero_detail
from lightning_gradguard.core.observer import EngineObserver
from lightning_gradguard.output.metrics import PREFIX
from lightning_gradguard.report import DistributedInfo, GradReport
from lightning_gradguard.training.collective import Collective
from lightning_gradguard.training.ddp_reducer import DDP_UNFINISHED_REDUCTION, unreduced_parameters
from lightning_gradguard.training.distributed import RankLedger
from lightning_gradguard.training.precision import LossScaleTracker, find_scaler, precision_name
from lightning_gradguard.training.strategies import DDP, DEEPSPEED, FSDP, SINGLE, StrategyInfo, describe_strategy

if TYPE_CHECKING:
    import torch

    from lightning_gradguard.core.engine import GradGuardEngine
    from lightning_gradguard.core.observer import StepCheck

AMP_SKIPPED_TAG = f"{PREFIX}/amp_skipped_steps"
_REWORDED = "DDP expected the gradient reduction of the prior iteration to have finished"
_DEFAULT_REDUCE_EVERY = 50


class TrainingContext(EngineObserver):
    """Precision and strategy knowledge for one fit, on top of a framework-free engine.

    Args:
        engine: the guard's engine (the context installs its hooks on it).
        info: the strategy.
        precision: the precision setting, e.g. ``"16-mixed"``.
        scaler: the AMP ``GradScaler``, if one is active.
        collective: the process group, when the run has several ranks.
        warn: a rank-zero warning function.
        restored: state saved by :meth:`state_dict` (a checkpoint, or the previous fit of a reused guard).
        ddp_fix: how the user turns on DDP's search for unused parameters in their framework (the Trainer's
            strategy name by default), for the warning before DDP's unused-parameter error.
        joinable: the ``DistributedDataParallel`` module of a hand-written loop, whose ``join()`` (uneven inputs)
            the loop may enter: from then on no rank makes a collective of the guard's.

    Example::

        context = TrainingContext.from_trainer(trainer, engine)
        scale = context.grad_scale(optimizer)
        check = engine.check_step(optimizer, step, grad_scale=scale)
        context.after_check(check, measured=True)

    """

    def __init__(
        self,
        engine: GradGuardEngine,
        info: StrategyInfo,
        precision: str = "32-true",
        scaler: Any = None,
        collective: Optional[Collective] = None,
        warn: Optional[Callable[[str], None]] = None,
        restored: Optional[dict[str, Any]] = None,
        ddp_fix: str = "strategy='ddp_find_unused_parameters_true'",
        joinable: Any = None,
    ) -> None:
        self.engine = engine
        self.ddp_fix = ddp_fix
        self.info = info
        self.precision = precision
        self._warn = warn or (lambda message: None)
        self.scale = LossScaleTracker(scaler) if scaler is not None else None
        if self.scale is not None and restored:
            self.scale.load_state_dict(restored)
        self.ledger = RankLedger(engine, info, collective, joinable) if collective is not None else None
        self.last_missing: list[int] = []
        self.trainable_before_wrap: Optional[dict[int, bool]] = None  # DDP's numbering (see ddp_reducer)
        self._warned_ddp = False
        engine.observe(self)
        statement = info.unchecked()
        if statement:
            self._warn(f"GradGuard: {statement}.")

    @classmethod
    def from_trainer(
        cls,
        trainer: Any,
        engine: GradGuardEngine,
        warn: Optional[Callable[[str], None]] = None,
        restored: Optional[dict[str, Any]] = None,
    ) -> TrainingContext:
        """Read precision and strategy from a Lightning Trainer (after the strategy wrapped the model)."""
        info = describe_strategy(trainer)
        collective = None
        if info.distributed and info.name != DEEPSPEED and Collective.available():
            collective = Collective(device=getattr(trainer.strategy, "root_device", None))
        return cls(engine, info, precision_name(trainer), find_scaler(trainer), collective, warn, restored)

    def detach(self) -> None:
        """Leave the engine's protocol (the next fit builds a new context)."""
        self.engine.unobserve(self)
        if self.ledger is not None:
            self.ledger.detach()

    # ------------------------------------------------------------------ what the callback asks
    @property
    def checks_gradients(self) -> bool:
        """False where ``p.grad`` does not hold the gradients (DeepSpeed): the guard then checks nothing."""
        return self.info.grads_visible

    @property
    def reduces(self) -> bool:
        """Whether counts and norms are reduced across ranks (a collective at logging steps)."""
        return self.ledger is not None

    @property
    def measure_every_step(self) -> bool:
        """Under a GradScaler, overflows are what non-finite counts are for: read gradients at every step."""
        return self.scale is not None

    def start_micro_batch(self) -> None:
        """Call as a training batch starts (under DDP each micro-batch's own gradients are recorded)."""
        if self.ledger is not None:
            self.ledger.start_micro_batch()

    def grad_scale(self, optimizer: torch.optim.Optimizer) -> Optional[Tensor]:
        """The loss scale ``optimizer``'s gradients still carry at its step (fused optimizers under 16-mixed)."""
        return self.scale.at_step(optimizer) if self.scale is not None else None

    def after_check(self, check: StepCheck) -> None:
        self.last_missing = list(check.missing)
        if check.missing and self.info.name == DDP and self.info.distributed and not self.info.find_unused_parameters:
            self._warn_ddp_unused(check)

    def reduce_due(self, stepped: int, every: Optional[int]) -> bool:
        """Whether the optimizer step numbered ``stepped`` (0-based) ends a reduction interval.

        Logging steps always are; without a logger the Trainer's ``log_every_n_steps`` (or 50) sets the cadence,
        so what waits for the collective stays bounded.
        """
        if self.ledger is None:
            return False
        every = every or _DEFAULT_REDUCE_EVERY
        return (stepped + 1) % every == 0

    def reduce(self, checks: Sequence[StepCheck] = ()) -> None:
        """The logging step's collective (on every rank): counts and the norms of ``checks`` become global."""
        if self.ledger is not None:
            self.ledger.reduce(checks)

    def settle(self) -> None:
        if self.scale is not None:
            self.scale.settle()

    def log_scalars(self) -> dict[str, Tensor]:
        """Device scalars for the logging step (copied to the host together with the norms)."""
        if self.scale is None:
            return {}
        self.scale.settle()
        skipped = self.scale.skipped_tensor()
        if skipped is None:
            return {}
        return {"amp_skipped_steps": skipped + self.scale._restored}

    def finish(self) -> None:
        """End of fit, on every rank: settle the scaler's last step and make the final counts global."""
        self.settle()
        self.reduce(())
        self.release()

    def release(self) -> None:
        """Take the per-parameter hooks off the model (end of fit, or a fit that raised); the report stays."""
        if self.ledger is not None:
            self.ledger.release_hooks()

    # ------------------------------------------------------------------ report, checkpoint, exceptions
    def add_to_report(self, report: GradReport) -> None:
        if self.info.name == FSDP:
            for p in report.params.values():
                if p.cause == ZERO:
                    p.detail = fsdp_zero_detail(p.zero_steps)
        if self.scale is not None:
            report.amp_skipped_steps = self.scale.skipped_steps()
        if self.info.distributed or self.info.name not in (SINGLE, DDP):
            report.distributed = DistributedInfo(
                strategy=self.info.name,
                world_size=self.info.world_size,
                rank_dependent=self.ledger.rank_dependent() if self.ledger is not None else {},
                unchecked=self._unchecked(),
            )

    def _unchecked(self) -> Optional[str]:
        if self.ledger is None or not self.ledger.joined:
            return self.info.unchecked()
        return (
            f"under DDP's join() (uneven inputs) the ranks' counts are not combined: this is rank {self.info.rank}'s "
            "own view (DDP's all-reduce still gives every rank the gradients of all), strict mode decides on each "
            "rank from its own gradients, and rank-dependent arrivals are not recorded"
        )

    def state_dict(self) -> dict[str, Any]:
        return self.scale.state_dict() if self.scale is not None else {}

    def on_exception(self, trainer: Any, exception: BaseException) -> None:
        """Name the parameters behind DDP's "not used in producing the loss" error (Lightning drops DDP's list)."""
        message = next((a for a in exception.args if isinstance(a, str)), "")
        if self.info.name != DDP or DDP_UNFINISHED_REDUCTION not in message:
            return
        registry = self.engine.registry
        names = [registry.names[i] for i in self.last_missing]
        model = getattr(trainer.strategy, "model", None) or trainer.model
        rank, params = unreduced_parameters(message, model, self.trainable_before_wrap)
        for param in params:
            index = registry.find(param)
            name = registry.names[index] if index is not None else f"<parameter of shape {tuple(param.shape)}>"
            if name not in names:
                names.append(name)
        if not names:
            return
        # Lightning's DDPStrategy.on_exception (called after the callbacks) replaces DDP's message with its own and
        # drops the indices; apply it first, then add the names to the message it leaves
        trainer.strategy.on_exception(exception)
        where = f"rank {rank if rank is not None else self.info.rank}"
        addition = (
            f"\n\nGradGuard: these parameters received no gradient on {where}, so DDP could not finish reducing "
            f"the gradients: {', '.join(names)}. Make them take part in the loss, or use "
            "strategy='ddp_find_unused_parameters_true' if they are unused on purpose."
        )
        args = list(exception.args)
        first = next(i for i, a in enumerate(args) if isinstance(a, str))
        # if the phrase is still there (a strategy subclass that does not rewrite), reword it so that no later
        # rewrite matches and drops the names
        args[first] = args[first].replace(DDP_UNFINISHED_REDUCTION, _REWORDED) + addition
        exception.args = tuple(args)

    def _warn_ddp_unused(self, check: StepCheck) -> None:
        if self._warned_ddp:
            return
        self._warned_ddp = True
        names = ", ".join(self.engine.names(check.missing))
        self._warn(
            "GradGuard: under DDP with find_unused_parameters=False a parameter without a gradient stops DDP's "
            "gradient reduction: these ranks' gradients were not averaged at this step, and the next forward pass "
            "fails with DDP's 'Expected to have finished reduction in the prior iteration' error (Lightning: "
            f"'parameters that were not used in producing the loss'). Parameters: {names}. Make them take part in "
            f"the loss, or use {self.ddp_fix}."
        )
