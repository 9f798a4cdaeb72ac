"""Multi-process scenarios that ``tests/test_distributed.py`` runs in real process groups (gloo, CPU).

Each process runs ``python distributed_scenarios.py OUT_DIR SCENARIO [SCENARIO ...]`` with the environment
variables ``torchrun`` would set (``LOCAL_RANK``, ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), so
Lightning's DDP takes the processes as given instead of launching its own. Scenarios run one after another in the
same process group and each writes ``OUT_DIR/<scenario>.rank<r>.json`` with what that rank saw; the test asserts
on those files. Several scenarios share one launch because starting the processes is the slow part.
"""

from __future__ import annotations

import atexit
import faulthandler
import json
import os
import sys
import time
import traceback
import warnings
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.plugins.precision import MixedPrecision
from models import RecordingLogger  # the script's own directory is on sys.path
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import GradGuard, GradGuardError

IN_DIM = 4
SCENARIOS: dict[str, Callable[[str], dict[str, Any]]] = {}


def scenario(fn: Callable[[str], dict[str, Any]]) -> Callable[[str], dict[str, Any]]:
    SCENARIOS[fn.__name__] = fn
    return fn


# ---------------------------------------------------------------------- shared pieces
def loader(n_batches: int, seed: int, batch_size: int = 2) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_batches * batch_size, IN_DIM, generator=g)
    y = torch.randn(n_batches * batch_size, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def trainer(root: str, strategy: Any = "ddp_find_unused_parameters_true", devices: int = 2, **kwargs) -> Trainer:
    options = dict(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=root,
        use_distributed_sampler=False,  # each rank gets the loader it is given: the data per rank is the test's
    )
    options.update(kwargs)
    return Trainer(**options)


def counts(report) -> dict[str, list]:
    """The report's numbers and causes per parameter (details may mention a rank or a step, so they are left out)."""
    return {
        name: [p.steps, p.none_steps, p.micro_batches, p.none_micro_batches, p.nonfinite_steps, p.cause]
        for name, p in report.params.items()
    }


def never_moved(report) -> list[str]:
    """The findings about weights that never move (every healthy run: none, on any rank)."""
    return [f"{f.kind}: {f.name}" for f in report.findings if f.kind in ("zero_lr", "skipped_by_optimizer")]


# ---------------------------------------------------------------------- a usage table
# which ranks use each branch at each position of a 3-micro-batch accumulation window
USAGE = {
    "shared_even": [{0, 1}, set(), {0, 1}],  # every rank, positions 0 and 2: intermittent everywhere alike
    "rank0_only": [{0}, {0}, {0}],  # rank 0 only: a gradient in every micro-batch, from rank 0's data
    "alternating": [{0}, {1}, set()],  # rank 0, then rank 1, then nobody: globally missing once per window
    "early_only": [{0, 1}, {0, 1}, set()],  # unused in the synchronizing micro-batch, used before it
    "unused": [set(), set(), set()],
}
ACCUMULATE = 3


class UsageModel(LightningModule):
    """A shared layer plus one branch per :data:`USAGE` row, used by the ranks the table names.

    ``single_process``: the same model run in one process over the same micro-batches: a branch is used when
    any rank would have used it (the union of the ranks' data).
    """

    def __init__(self, single_process: bool = False, usage: dict = USAGE, accumulate: int = ACCUMULATE) -> None:
        super().__init__()
        self.single_process, self.usage, self.accumulate = single_process, usage, accumulate
        self.shared = nn.Linear(IN_DIM, 1)
        self.branches = nn.ModuleDict({name: nn.Linear(IN_DIM, 1) for name in usage})

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self.shared(x)
        position = batch_idx % self.accumulate
        for name, rows in self.usage.items():
            users = rows[position]
            if (bool(users) if self.single_process else self.global_rank in users):
                out = out + self.branches[name](x)
        return F.mse_loss(out, y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


# ---------------------------------------------------------------------- DDP scenarios
@scenario
def usage_table(root: str) -> dict[str, Any]:
    """DDP with accumulation: global counts, rank-dependent parameters, one collective per logging step."""
    guard = GradGuard(summary=False, log_every_n_steps=2)
    logger = RecordingLogger()
    t = trainer(root, callbacks=[guard], accumulate_grad_batches=ACCUMULATE, logger=logger, log_every_n_steps=2)
    model = UsageModel()
    t.fit(model, loader(4 * ACCUMULATE, seed=t.global_rank))
    report = guard.report()
    return {
        "hooks_left": sum(bool(getattr(p, "_post_accumulate_grad_hooks", None)) for p in model.parameters()),
        "counts": counts(report),
        "distributed": report.to_dict().get("distributed"),
        "never_moved": never_moved(report),
        "reductions": guard._context.ledger.reductions,
        "logged_steps": [step for step, _ in logger.rows],
        "logged_none_steps": [
            {k: v for k, v in m.items() if k.startswith("gradguard/none_steps/")} for _, m in logger.rows
        ],
        "logged_intermittent": [m["gradguard/intermittent_params"] for _, m in logger.rows
                                if "gradguard/intermittent_params" in m],
        "steps": report.steps,
    }


class UnusedEverywhere(LightningModule):
    """``used`` takes part in the loss on every rank, ``unused`` never does; ``late`` only from step ``late_from``."""

    def __init__(self, late_from: int = 10**9) -> None:
        super().__init__()
        self.late_from = late_from
        self.used = nn.Linear(IN_DIM, 1)
        self.unused = nn.Linear(IN_DIM, 1)
        self.late = nn.Linear(IN_DIM, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self.used(x)
        if batch_idx < self.late_from:
            out = out + self.late(x)
        return F.mse_loss(out, y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class FrozenAfterWrap(LightningModule):
    """``first`` is frozen at the second batch, after DDP numbered it among the parameters it reduces."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(IN_DIM, 1)
        self.second = nn.Linear(IN_DIM, 1)

    def on_train_batch_start(self, batch, batch_idx):
        if batch_idx == 1:
            self.first.requires_grad_(False)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.first(x) + self.second(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@scenario
def ddp_frozen_after_wrap(root: str) -> dict[str, Any]:
    """Plain ``ddp``, a layer frozen mid-run: DDP's error names it by its index in DDP's own numbering."""
    t = trainer(root, strategy="ddp", callbacks=[GradGuard(summary=False)])
    try:
        t.fit(FrozenAfterWrap(), loader(4, seed=80 + t.global_rank))
    except Exception as err:  # noqa: BLE001 - the scenario reports what the user would see
        return {"error": str(err)}
    return {"error": None}


class NormRecorder(Callback):
    """The reference norms: each parameter's gradient norm at the step, read after GradGuard (DDP: synchronized)."""

    def __init__(self) -> None:
        self.norms: list[dict[str, float]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.norms.append(
            {n: float(p.grad.double().norm()) for n, p in pl_module.named_parameters() if p.grad is not None}
        )


@scenario
def unused_everywhere(root: str) -> dict[str, Any]:
    """DDP without accumulation: an unused parameter on every rank; norms logged by rank zero are the global ones."""
    guard, logger, recorder = GradGuard(summary=False, log_every_n_steps=1), RecordingLogger(), NormRecorder()
    t = trainer(root, callbacks=[guard, recorder], logger=logger, log_every_n_steps=1)
    t.fit(UnusedEverywhere(), loader(4, seed=10 + t.global_rank))
    report = guard.report()
    prefix = "gradguard/norm/"
    return {
        "counts": counts(report),
        "distributed": report.to_dict().get("distributed"),
        "never_moved": never_moved(report),
        "logged_norms": [{k[len(prefix):]: v for k, v in m.items() if k.startswith(prefix)} for _, m in logger.rows],
        "reference_norms": recorder.norms,
        "reductions": guard._context.ledger.reductions,
    }


@scenario
def amp_overflow(root: str) -> dict[str, Any]:
    """DDP with 16-mixed on the CPU: an overflow on one rank makes every rank skip the step (one count)."""

    class Overflow(UnusedEverywhere):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * 1e38 if batch_idx == 1 and self.global_rank == 1 else loss

    guard = GradGuard(summary=False)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    t = trainer(root, callbacks=[guard], plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    t.fit(Overflow(), loader(3, seed=20 + t.global_rank))
    report = guard.report()
    return {"counts": counts(report), "amp_skipped_steps": report.amp_skipped_steps, "ok": report.ok}


@scenario
def manual_gan(root: str) -> dict[str, Any]:
    """Manual optimization under DDP: two optimizers, toggle_optimizer, clipping, LR schedulers."""
    sys.path.insert(0, os.path.dirname(__file__))
    from test_precision import ManualAmpGAN

    guard = GradGuard(summary=False)
    t = trainer(root, callbacks=[guard])
    t.fit(ManualAmpGAN(clear_head={1}), loader(3, seed=30 + t.global_rank))
    report = guard.report()
    return {"counts": counts(report), "steps": report.steps, "missing": report.missing}


@scenario
def strict_together(root: str) -> dict[str, Any]:
    """Strict mode: ``late`` stops receiving a gradient at step 2 on every rank; both ranks raise at step 2."""
    guard = GradGuard(strict=True, allow_none=["unused.*"], summary=False)
    t = trainer(root, callbacks=[guard])
    started = time.monotonic()
    try:
        t.fit(UnusedEverywhere(late_from=2), loader(5, seed=40 + t.global_rank))
    except GradGuardError as err:
        return {"raised": True, "step": err.step, "params": err.params, "seconds": time.monotonic() - started}
    return {"raised": False}


@scenario
def plain_ddp_unused(root: str) -> dict[str, Any]:
    """Plain ``ddp`` with an unused layer: Lightning's error must name the parameters (Lightning #17212).

    Logging at every step puts GradGuard's reduction between DDP's unfinished reduction and Lightning's error: it
    must neither hang nor change the error.
    """
    guard = GradGuard(summary=False)
    t = trainer(root, strategy="ddp", callbacks=[guard], logger=RecordingLogger(), log_every_n_steps=1)
    try:
        t.fit(UnusedEverywhere(), loader(4, seed=50 + t.global_rank))
    except Exception as err:  # noqa: BLE001 - the scenario reports what the user would see
        report = guard.report()
        return {"error": str(err), "type": type(err).__name__, "missing": report.missing, "counts": counts(report),
                "reductions": guard._context.ledger.reductions}
    return {"error": None}


# ---------------------------------------------------------------------- hand-written loops: Fabric and torch DDP
class UsageNet(nn.Module):
    """:class:`UsageModel` as a plain module (same parameter names) for loops that call it themselves."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank
        self.shared = nn.Linear(IN_DIM, 1)
        self.branches = nn.ModuleDict({name: nn.Linear(IN_DIM, 1) for name in USAGE})

    def forward(self, x, position: int):
        out = self.shared(x)
        for name, rows in USAGE.items():
            if self.rank in rows[position]:
                out = out + self.branches[name](x)
        return out


def _accumulating_loop(model, optimizer, data, backward, no_sync) -> None:
    """The loop both adapters watch: ``ACCUMULATE`` micro-batches per step, all but the last under ``no_sync``."""
    for i, (x, y) in enumerate(data):
        position = i % ACCUMULATE
        last = position == ACCUMULATE - 1
        with no_sync(not last):
            backward(F.mse_loss(model(x, position), y))
        if last:
            optimizer.step()
            optimizer.zero_grad()


def _fabric_usage_net() -> tuple[Any, UsageNet, Any, Any]:
    """Fabric DDP (finding unused parameters) on the launch's two ranks: (fabric, net, model, optimizer)."""
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp_find_unused_parameters_true")
    fabric.launch()
    torch.manual_seed(0)
    net = UsageNet(fabric.global_rank)
    model, optimizer = fabric.setup(net, torch.optim.SGD(net.parameters(), lr=0.01))
    return fabric, net, model, optimizer


@scenario
def fabric_usage(root: str) -> dict[str, Any]:
    """``watch_fabric`` under Fabric DDP with ``no_backward_sync`` accumulation: the Trainer's global counts."""
    from lightning_gradguard import watch_fabric

    fabric, net, model, optimizer = _fabric_usage_net()
    guard = watch_fabric(fabric, model, optimizer, summary=False, log_every_n_steps=2)
    data = loader(4 * ACCUMULATE, seed=fabric.global_rank)  # the data of the Trainer's usage_table, per rank

    def no_sync(enabled: bool):
        return fabric.no_backward_sync(model, enabled=enabled)

    _accumulating_loop(model, optimizer, data, fabric.backward, no_sync)
    reductions_before_close = guard.context.ledger.reductions
    report = guard.close()
    return {
        "counts": counts(report),
        "distributed": report.to_dict().get("distributed"),
        "never_moved": never_moved(report),
        "reductions_before_close": reductions_before_close,
        "reductions": guard.context.ledger.reductions,
        "hooks_left": sum(bool(getattr(p, "_post_accumulate_grad_hooks", None)) for p in net.parameters()),
        "writes": guard.writes,
    }


@scenario
def torch_ddp_usage(root: str) -> dict[str, Any]:
    """``watch`` on a model wrapped in torch's ``DistributedDataParallel`` in a hand-written loop: the same counts."""
    from contextlib import nullcontext

    from torch.nn.parallel import DistributedDataParallel

    from lightning_gradguard import watch

    torch.manual_seed(0)
    rank = dist.get_rank()
    model = DistributedDataParallel(UsageNet(rank), find_unused_parameters=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = watch(model, optimizer, summary=False, log_every_n_steps=2)

    def no_sync(enabled: bool):
        return model.no_sync() if enabled else nullcontext()

    _accumulating_loop(model, optimizer, loader(4 * ACCUMULATE, seed=rank), lambda loss: loss.backward(), no_sync)
    report = guard.close()
    return {
        "counts": counts(report),  # the user's names: no "module." from the wrapper
        "distributed": report.to_dict().get("distributed"),
        "never_moved": never_moved(report),
        "reductions": guard.context.ledger.reductions,
    }


class UsedAndUnused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(IN_DIM, 1)
        self.unused = nn.Linear(IN_DIM, 1)

    def forward(self, x):
        return self.used(x)


@scenario
def torch_ddp_unused(root: str) -> dict[str, Any]:
    """torch DDP without find_unused_parameters and an unused layer: GradGuard names it (rank zero, once) at the
    first step, before DDP's own error at the next forward pass, and says how to fix it in plain torch."""
    from torch.nn.parallel import DistributedDataParallel

    from lightning_gradguard import watch

    torch.manual_seed(0)
    model = DistributedDataParallel(UsedAndUnused())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    error = None
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        guard = watch(model, optimizer, summary=False)
        try:
            for x, y in loader(3, seed=70 + dist.get_rank()):
                F.mse_loss(model(x), y).backward()
                optimizer.step()
                optimizer.zero_grad()
        except RuntimeError as err:
            error = str(err)
        report = guard.close()
    return {
        "error": error,
        "warnings": [str(w.message) for w in record if "GradGuard" in str(w.message)],
        "missing": report.missing,
        "steps": report.steps,
    }


@scenario
def torch_ddp_join(root: str) -> dict[str, Any]:
    """A hand-written DDP loop with uneven inputs under ``model.join()``, logging every 2 steps: the rank with less
    data leaves the loop early and answers only DDP's collectives, so the guard makes none of its own from the
    moment it sees the join (the run finishes on both ranks) and each rank reports what it saw."""
    from torch.nn.parallel import DistributedDataParallel

    from lightning_gradguard import watch

    torch.manual_seed(0)
    rank = dist.get_rank()
    model = DistributedDataParallel(UsedAndUnused(), find_unused_parameters=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = watch(model, optimizer, summary=False, log_every_n_steps=2)
    even = list(loader(3, seed=80 + rank))
    uneven = list(loader(3 if rank == 0 else 7, seed=90 + rank))
    for x, y in even:  # before the join: reduced as usual
        F.mse_loss(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    reductions_before = guard.context.ledger.reductions
    with model.join():
        for x, y in uneven:
            F.mse_loss(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
    report = guard.close()
    return {
        "steps": report.steps,
        "missing": report.missing,
        "none_steps": report.params["unused.weight"].none_steps,
        "unchecked": report.to_dict()["distributed"]["unchecked"],
        "reductions": [reductions_before, guard.context.ledger.reductions],
    }


@scenario
def fabric_strict_together(root: str) -> dict[str, Any]:
    """Strict ``watch_fabric``: a branch nobody uses makes both ranks raise at the first step, before it runs."""
    from lightning_gradguard import watch_fabric

    fabric, net, model, optimizer = _fabric_usage_net()
    guard = watch_fabric(fabric, model, optimizer, strict=True, summary=False)
    before = net.shared.weight.detach().clone()
    started = time.monotonic()
    try:
        for x, y in loader(3, seed=60 + fabric.global_rank):
            fabric.backward(F.mse_loss(model(x, 0), y))
            optimizer.step()
            optimizer.zero_grad()
    except GradGuardError as err:
        return {"raised": True, "step": err.step, "params": err.params, "seconds": time.monotonic() - started,
                "weights_unchanged": bool(torch.equal(before, net.shared.weight.detach()))}
    finally:
        guard.close()
    return {"raised": False}


# ---------------------------------------------------------------------- sharded scenarios
class Gate(nn.Module):
    """A one-element parameter: as its own FSDP unit, its shard lives on rank 0 only."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return x * self.scale


class ShardedNet(nn.Module):
    def __init__(self, spare: bool = True) -> None:
        super().__init__()
        self.a = nn.Linear(IN_DIM, 3)
        self.b = nn.Linear(3, 1)
        self.gate = Gate()  # never called: unused, and held by rank 0 only
        if spare:
            self.spare = nn.Linear(IN_DIM, 2)  # never called: unused, held by both ranks

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def _global_batch(step: int, world: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    batches = []
    for rank in range(world):
        g = torch.Generator().manual_seed(1000 * step + rank)
        batches.append((torch.randn(2, IN_DIM, generator=g), torch.randn(2, 1, generator=g)))
    return batches


def _process_group() -> tuple[int, int]:
    """(rank, world size), joining the launch's gloo group if no scenario has yet."""
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def _fsdp1(spare: bool) -> nn.Module:
    """:class:`ShardedNet` under plain torch FSDP1 on the CPU, one unit per Linear and per Gate."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    return FSDP(ShardedNet(spare=spare), device_id=torch.device("cpu"), use_orig_params=True,
                auto_wrap_policy=ModuleWrapPolicy({Gate, nn.Linear}))


@scenario
def fsdp1_engine(root: str) -> dict[str, Any]:
    """Plain torch FSDP1 (use_orig_params=True) on the CPU driving the engine directly, with the rank ledger."""
    from lightning_gradguard.config import GuardConfig
    from lightning_gradguard.core.engine import GradGuardEngine
    from lightning_gradguard.core.registry import clean_name
    from lightning_gradguard.training.collective import Collective
    from lightning_gradguard.training.distributed import RankLedger
    from lightning_gradguard.training.strategies import StrategyInfo

    rank, world = _process_group()
    results: dict[str, Any] = {}
    # strict: only `gate` is unused, and only rank 0 holds it: rank 1 sees nothing missing, yet must raise too
    for strict in (False, True):
        torch.manual_seed(0)
        reference = ShardedNet(spare=not strict)
        model = _fsdp1(spare=not strict)
        reference.load_state_dict(_full_state(model))
        names = [n for n, _ in model.named_parameters()]
        local_sizes = {clean_name(n): p.numel() for n, p in model.named_parameters()}
        engine = GradGuardEngine(GuardConfig.create(strict=strict), warn=lambda message: None)
        engine.bind(model.named_parameters(), module=None)
        ledger = RankLedger(engine, StrategyInfo("fsdp", world, rank, use_orig_params=True), Collective())
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        reference_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
        logged, expected, raised = [], [], None
        for step in range(3):
            batches = _global_batch(step, world)
            x, y = batches[rank]
            engine.start_micro_batch()
            optimizer.zero_grad()
            loss = F.mse_loss(model(x), y)
            engine.before_backward(loss)
            loss.backward()
            engine.after_backward()
            try:
                check = engine.check_step(optimizer, step=step, measure=True)
            except GradGuardError as err:
                raised = {"step": err.step, "params": err.params}
                break
            ledger.reduce([check])  # every step is a logging step here (the engine told the ledger of the check)
            logged.append({engine.registry.names[i]: float(n) for ind, g in check.norms for i, n in zip(ind, g.norms)})
            optimizer.step()
            # the reference: the same weights, the gradient of the mean loss over both ranks' data, unsharded
            reference_opt.zero_grad()
            sum(F.mse_loss(reference(bx), by) for bx, by in batches).div(world).backward()
            expected.append({n: float(p.grad.norm()) for n, p in reference.named_parameters() if p.grad is not None})
            reference_opt.step()
        results["strict" if strict else "plain"] = {
            "names": [engine.registry.names[i] for i in range(len(engine.registry))],
            "raw_names": names,
            "local_sizes": local_sizes,
            "counts": counts(engine.report()),
            "logged": logged,
            "expected": expected,
            "raised": raised,
            "reductions": ledger.reductions,
            "votes": ledger.votes,
        }
        ledger.detach()
    return results


@scenario
def fsdp1_watch(root: str) -> dict[str, Any]:
    """``watch()`` on a plain torch FSDP1 model: empty shards are not missing, strict decisions are collective."""
    from lightning_gradguard import watch

    rank, world = _process_group()
    results: dict[str, Any] = {}
    for strict in (False, True):
        torch.manual_seed(0)
        model = _fsdp1(spare=not strict)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        guard = watch(model, optimizer, strict=strict, summary=False, log_every_n_steps=1)
        raised = None
        try:
            for step in range(3):
                x, y = _global_batch(step, world)[rank]
                optimizer.zero_grad()
                F.mse_loss(model(x), y).backward()
                optimizer.step()
        except GradGuardError as err:
            raised = {"step": err.step, "params": err.params}
        report = guard.close()
        results["strict" if strict else "plain"] = {
            "counts": counts(report),
            "raised": raised,
            "distributed": report.to_dict().get("distributed"),
            "never_moved": never_moved(report),
            "reductions": guard.context.ledger.reductions,
            "findings": sorted({f.kind for f in report.findings}),
        }
    # use_orig_params=False: the modules keep their original parameters as views into the flat ones
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    torch.manual_seed(0)
    model = FSDP(ShardedNet(spare=False), device_id=torch.device("cpu"), use_orig_params=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = watch(model, optimizer, summary=False)
    for step in range(2):
        x, y = _global_batch(step, world)[rank]
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
        optimizer.step()
    report = guard.close()
    results["flat"] = {"steps": report.steps, "findings": sorted({f.kind for f in report.findings})}
    return results


class SharedUnit(nn.Module):
    """One FSDP unit holding a used embedding, a used head and an unused layer.

    FSDP gives ``unused`` zeros, not None, because other parameters of its unit were used. Flattened and split in
    two, the unit puts the embedding's first 15 values on rank 0 and its last value, the head and ``unused`` on
    rank 1; the tokens are all 0, so rank 1's shard of the (used) embedding is zero at every step: only the ranks
    together can tell which parameter's gradient is zero.
    """

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(8, 2)
        self.used = nn.Linear(2, 1)
        self.unused = nn.Linear(2, 1)

    def forward(self, tokens):
        return self.used(self.emb(tokens)).squeeze(-1)


@scenario
def fsdp1_shared_unit(root: str) -> dict[str, Any]:
    """``watch()`` on one FSDP1 unit with an unused layer: its gradient is zeros, found as such on every rank."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from lightning_gradguard import watch
    from lightning_gradguard.core.registry import clean_name

    rank, _ = _process_group()
    torch.manual_seed(0)
    model = FSDP(SharedUnit(), device_id=torch.device("cpu"), use_orig_params=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = watch(model, optimizer, summary=False, log_every_n_steps=2)
    for _ in range(4):
        optimizer.zero_grad()
        model(torch.zeros(2, 3, dtype=torch.int64)).pow(2).mean().backward()
        optimizer.step()
    local = {clean_name(n): p for n, p in model.named_parameters()}
    report = guard.close()
    return {
        "report": report.to_dict(),
        "summary": report.summary(),
        "local_numel": {n: p.numel() for n, p in local.items()},
        "local_zero": {n: bool(p.grad is not None and p.grad.numel() and not p.grad.any()) for n, p in local.items()},
    }


def _full_state(model) -> dict[str, torch.Tensor]:
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    config = FullStateDictConfig(offload_to_cpu=False, rank0_only=False)
    with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, config):
        state = model.state_dict()
    return {k.replace("_fsdp_wrapped_module.", ""): v.clone() for k, v in state.items()}


class FSDP2Model(LightningModule):
    """``fully_shard`` per layer through ``ModelParallelStrategy``; ``unused`` is never called.

    ``poison_step``: at that step, rank 1 writes a NaN into its local shard of ``net.0.weight``'s gradient (after
    backward), so only one shard is non-finite.
    """

    def __init__(self, poison_step: int = -1) -> None:
        super().__init__()
        self.poison_step = poison_step
        self.net = nn.Sequential(nn.Linear(IN_DIM, 3), nn.Tanh(), nn.Linear(3, 1))
        self.unused = nn.Linear(IN_DIM, 1)
        self.reference: list[dict[str, float]] = []

    def configure_model(self):
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        fully_shard(self.net[0], mesh=mesh)
        fully_shard(self.net[2], mesh=mesh)
        fully_shard(self, mesh=mesh)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)

    def on_after_backward(self):
        if self.global_step == self.poison_step and self.global_rank == 1:
            local = self.net[0].weight.grad.to_local()
            if local.numel():
                local.view(-1)[0] = float("nan")

    def on_before_optimizer_step(self, optimizer):
        # the reference norms: full_tensor() is a collective, every rank calls it for the same parameters
        self.reference.append(
            {n: float(p.grad.full_tensor().double().norm()) for n, p in self.named_parameters() if p.grad is not None}
        )
        if self.global_step == self.poison_step:  # keep the weights finite for the steps after
            for p in self.parameters():
                if p.grad is not None:
                    p.grad.to_local().nan_to_num_(0.0)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@scenario
def fsdp2_lightning(root: str) -> dict[str, Any]:
    """FSDP2 through Lightning's ModelParallelStrategy on the CPU (gloo): DTensor gradients."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    guard, logger = GradGuard(summary=False, log_every_n_steps=1), RecordingLogger()
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    t = trainer(root, strategy=strategy, callbacks=[guard], logger=logger, log_every_n_steps=1)
    model = FSDP2Model(poison_step=2)
    t.fit(model, loader(3, seed=60 + t.global_rank))
    report = guard.report()
    prefix = "gradguard/norm/"
    return {
        "counts": counts(report),
        "distributed": report.to_dict().get("distributed"),
        "never_moved": never_moved(report),
        "logged_norms": [{k[len(prefix):]: v for k, v in m.items() if k.startswith(prefix)} for _, m in logger.rows],
        "reference_norms": model.reference,
        "local_shapes": {n: list(p.to_local().shape) for n, p in model.named_parameters()},
    }


@scenario
def fsdp2_watch(root: str) -> dict[str, Any]:
    """``watch()`` on a model sharded with torch's ``fully_shard`` (FSDP2, DTensor gradients) in a plain loop."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lightning_gradguard import watch

    rank, world = _process_group()
    torch.manual_seed(0)
    model = ShardedNet()  # `gate` and `spare` are never called
    mesh = init_device_mesh("cpu", (world,))
    for module in (model.a, model.b, model.gate, model.spare, model):
        fully_shard(module, mesh=mesh)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    log_dir = os.path.join(root, "tb")
    guard = watch(model, optimizer, log_dir=log_dir, summary=False, log_every_n_steps=1)
    reference = []
    for step in range(3):
        x, y = _global_batch(step, world)[rank]
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
        # the full gradients' norms (full_tensor() is a collective: every rank, the same parameters)
        reference.append({n: float(p.grad.full_tensor().double().norm()) for n, p in model.named_parameters()
                          if p.grad is not None})
        optimizer.step()
    report = guard.close()
    logged: list[dict[str, float]] = []
    if rank == 0:
        events = EventAccumulator(log_dir, size_guidance={"scalars": 0})
        events.Reload()
        prefix = "gradguard/norm/"
        for step in range(3):
            logged.append({tag[len(prefix):]: e.value for tag in events.Tags()["scalars"] if tag.startswith(prefix)
                           for e in events.Scalars(tag) if e.step == step})
    return {
        "counts": counts(report),
        "distributed": report.to_dict().get("distributed"),
        "never_moved": never_moved(report),
        "reference": reference,
        "logged": logged,
        "local_numel": {n: p.to_local().numel() for n, p in model.named_parameters()},
    }


# ---------------------------------------------------------------------- strict mode, a None on one rank only
# Rank 1 alone loses a gradient at DROP_STEP (``p.grad = None``, or a ``zero_grad`` it alone runs between backward
# and step). Every rank must raise the same GradGuardError at that step, and nothing GradGuard does afterwards
# (on_exception, close(), __exit__, interpreter exit) may start a collective the other rank is not also making:
# after each raise the ranks make collectives of their own, shaped like GradGuard's (one float64, then a vector),
# with values that only add up when each rank's call met the other rank's same call. A stray GradGuard collective
# on one rank pairs with the other rank's and shows as a wrong sum, or leaves a rank waiting (the launch's limit).
DROP_STEP = 2
REPEATS = 5


def _user_collective() -> bool:
    """The user's own collective after the raise: the ranks must meet in it, with nothing of GradGuard's between."""
    rank = dist.get_rank()
    scalar = torch.tensor([1000.0 * (rank + 1)], dtype=torch.float64)  # the shape of GradGuard's strict vote
    dist.all_reduce(scalar)
    vector = torch.full((5,), 10.0 * (rank + 1), dtype=torch.float64)
    dist.all_reduce(vector)
    return scalar.item() == 3000.0 and vector.tolist() == [30.0] * 5


def _raised(err: BaseException, started: float, ledger: Any) -> dict[str, Any]:
    return {
        "type": type(err).__name__,
        "step": getattr(err, "step", None),
        "params": getattr(err, "params", None),
        "first_line": str(err).splitlines()[0] if str(err) else "",
        "seconds": time.monotonic() - started,
        "votes": ledger.votes if ledger is not None else None,
        "reductions": ledger.reductions if ledger is not None else None,
    }


def _repeat(run: Callable[[int], dict[str, Any]]) -> dict[str, Any]:
    runs = []
    for attempt in range(REPEATS):
        result = run(attempt)
        result["user_collective"] = _user_collective()
        runs.append(result)
    return {"runs": runs}


class DropOnRank1(UnusedEverywhere):
    """``late`` loses its gradient on rank 1 only, at DROP_STEP (``p.grad = None`` after backward)."""

    def on_after_backward(self):
        if self.global_rank == 1 and self.global_step == DROP_STEP:
            self.late.weight.grad = None
            self.late.bias.grad = None


class ZeroGradOnRank1(LightningModule):
    """Manual optimization: rank 1 alone runs ``zero_grad`` between ``manual_backward`` and ``step`` at DROP_STEP."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.layer = nn.Linear(IN_DIM, 1)

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        x, y = batch
        self.manual_backward(F.mse_loss(self.layer(x), y))
        if self.global_rank == 1 and batch_idx == DROP_STEP:
            optimizer.zero_grad()
        optimizer.step()
        optimizer.zero_grad()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _trainer_strict(root: str, model_class: type, strategy: str, **guard_options: Any) -> dict[str, Any]:
    def run(attempt: int) -> dict[str, Any]:
        guard = GradGuard(strict=True, summary=False, **guard_options)
        t = trainer(os.path.join(root, str(attempt)), strategy=strategy, callbacks=[guard])
        started = time.monotonic()
        try:
            t.fit(model_class(), loader(5, seed=80 + t.global_rank))
        except GradGuardError as err:
            return {"raised": _raised(err, started, guard._context.ledger)}
        return {"raised": None}

    return _repeat(run)


@scenario
def trainer_strict_grad_none(root: str) -> dict[str, Any]:
    return _trainer_strict(root, DropOnRank1, "ddp_find_unused_parameters_true", allow_none=["unused.*"])


@scenario
def trainer_strict_zero_grad(root: str) -> dict[str, Any]:
    return _trainer_strict(root, ZeroGradOnRank1, "ddp")


class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(IN_DIM, 1)
        self.late = nn.Linear(IN_DIM, 1)

    def forward(self, x):
        return self.used(x) + self.late(x)


def _drop_on_rank1(model: nn.Module, optimizer: torch.optim.Optimizer, how: str) -> None:
    if dist.get_rank() != 1:
        return
    if how == "zero_grad":
        optimizer.zero_grad()
    else:
        model.late.weight.grad = None
        model.late.bias.grad = None


@scenario
def fabric_strict_grad_none(root: str) -> dict[str, Any]:
    """Fabric DDP: ``p.grad = None`` on rank 1 between ``fabric.backward`` and the step; ``close()`` in ``finally``."""
    from lightning.fabric import Fabric

    from lightning_gradguard import watch_fabric

    def run(attempt: int) -> dict[str, Any]:
        fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp")
        fabric.launch()
        torch.manual_seed(0)
        net = TwoLayers()
        model, optimizer = fabric.setup(net, torch.optim.SGD(net.parameters(), lr=0.01))
        guard = watch_fabric(fabric, model, optimizer, strict=True, summary=False)
        started = time.monotonic()
        try:
            for step, (x, y) in enumerate(loader(5, seed=90 + fabric.global_rank)):
                fabric.backward(F.mse_loss(model(x), y))
                if step == DROP_STEP:
                    _drop_on_rank1(net, optimizer, "grad_none")
                optimizer.step()
                optimizer.zero_grad()
        except GradGuardError as err:
            return {"raised": _raised(err, started, guard.context.ledger)}
        finally:
            guard.close()  # every rank, at the same point: its collective is matched
        return {"raised": None}

    return _repeat(run)


def _torch_ddp_strict(how: str, close: str) -> dict[str, Any]:
    """torch DDP in a plain loop; rank 1 drops gradients at DROP_STEP; the guard ends as ``close`` says:
    ``with`` (``__exit__``), ``finally`` (``close()`` on every rank) or ``exit`` (left open for interpreter exit)."""
    from contextlib import nullcontext

    from torch.nn.parallel import DistributedDataParallel

    from lightning_gradguard import watch

    _process_group()

    def run(attempt: int) -> dict[str, Any]:
        torch.manual_seed(0)
        net = TwoLayers()
        model = DistributedDataParallel(net)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        guard = watch(model, optimizer, strict=True, summary=False)
        started = time.monotonic()
        try:
            with guard if close == "with" else nullcontext():
                for step, (x, y) in enumerate(loader(5, seed=100 + dist.get_rank())):
                    F.mse_loss(model(x), y).backward()
                    if step == DROP_STEP:
                        _drop_on_rank1(net, optimizer, how)
                    optimizer.step()
                    optimizer.zero_grad()
        except GradGuardError as err:
            return {"raised": _raised(err, started, guard.context.ledger)}
        finally:
            if close == "finally":
                guard.close()
            elif close == "exit":
                _left_open.append(guard)
        return {"raised": None}

    return _repeat(run)


@scenario
def torch_ddp_strict_zero_grad(root: str) -> dict[str, Any]:
    return _torch_ddp_strict("zero_grad", close="with")


@scenario
def torch_ddp_strict_grad_none(root: str) -> dict[str, Any]:
    return _torch_ddp_strict("grad_none", close="finally")


@scenario
def torch_ddp_strict_exit(root: str) -> dict[str, Any]:
    """The guards stay open after the raise; at interpreter exit GradGuard closes them (see :func:`_after_exit`)."""
    _exit_report.append(root)
    return _torch_ddp_strict("grad_none", close="exit")


_left_open: list[Any] = []
_exit_report: list[str] = []


def _after_exit() -> None:
    """Registered before any guard exists, so it runs after GradGuard's own exit handler (atexit is LIFO): the
    guards left open are closed by now, and the ranks must still meet in the user's collective."""
    if not _exit_report or not dist.is_initialized():
        return
    result = {"closed": [guard.closed for guard in _left_open], "user_collective": _user_collective()}
    out_dir = os.path.dirname(_exit_report[0])
    with open(os.path.join(out_dir, f"at_exit.rank{dist.get_rank()}.json"), "w") as f:
        json.dump(result, f)


atexit.register(_after_exit)


# ---------------------------------------------------------------------- weights that never move
class HeadAtLrZero(LightningModule):
    """A body that trains and a head in a param group at lr=0 (the planted typo)."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(IN_DIM, 4), nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.head(torch.tanh(self.body(x))), y)

    def configure_optimizers(self):
        return torch.optim.SGD([{"params": self.body.parameters()}, {"params": self.head.parameters(), "lr": 0.0}],
                               lr=0.1)


@scenario
def never_moved_strict(root: str) -> dict[str, Any]:
    """Strict mode under DDP: every rank finishes the run, then raises the same error for the head at lr=0."""
    guard = GradGuard(strict=True, summary=False)
    t = trainer(root, callbacks=[guard], strategy="ddp")
    try:
        t.fit(HeadAtLrZero(), loader(4, seed=50 + t.global_rank))
    except GradGuardError as err:
        found = {f.name: f.kind for f in err.report.findings}
        return {"raised": True, "step": err.step, "params": err.params, "global_step": t.global_step,
                "found": found, "zero_lr_steps": err.report.params["head.weight"].zero_lr_steps}
    return {"raised": False}


# ---------------------------------------------------------------------- entry point
def main(argv: list[str]) -> int:
    out_dir, names = argv[0], argv[1:]
    torch.set_num_threads(1)
    if os.environ.get("GRADGUARD_TEST_DEADLINE"):  # print every thread's stack before the test kills a stuck rank
        faulthandler.dump_traceback_later(float(os.environ["GRADGUARD_TEST_DEADLINE"]), exit=True)
    rank = int(os.environ.get("RANK", "0"))
    status = 0
    for name in names:
        root = os.path.join(out_dir, f"{name}.root")
        try:
            result = SCENARIOS[name](root)
        except Exception:  # noqa: BLE001 - recorded for the test to show
            result = {"crashed": traceback.format_exc()}
            status = 1
        with open(os.path.join(out_dir, f"{name}.rank{rank}.json"), "w") as f:
            json.dump(result, f)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
