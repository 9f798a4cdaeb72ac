"""Real multi-process runs (gloo, CPU, two ranks): DDP, torch FSDP1, FSDP2 through ModelParallelStrategy.

The processes are started the way ``torchrun`` starts them (see ``distributed_scenarios.py``); several scenarios
share one launch, and every launch runs under a time limit, so a rank that waits forever for another fails the
test instead of hanging it.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from distributed_scenarios import UsageModel, counts, loader

from lightning_gradguard import GradGuard
from lightning_gradguard.training.collective import pack_flags, ranks_in, slot_bits, unpack_flags

SCRIPT = Path(__file__).with_name("distributed_scenarios.py")
WORLD = 2
LAUNCH_TIMEOUT = 240  # seconds for a whole launch; a hang fails the test instead of blocking the suite


pytestmark = pytest.mark.slow  # several processes, or subprocesses


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out_dir: Path, scenarios: list[str], timeout: float = LAUNCH_TIMEOUT) -> dict[str, list[dict]]:
    """Run ``scenarios`` in ``WORLD`` processes; returns each scenario's per-rank results."""
    out_dir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    procs = []
    for rank in range(WORLD):
        env = dict(
            os.environ,
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            WORLD_SIZE=str(WORLD),
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            NODE_RANK="0",
            OMP_NUM_THREADS="1",
            PYTHONWARNINGS="ignore",
            PYTHONUNBUFFERED="1",
            GRADGUARD_TEST_DEADLINE=str(max(timeout - 15, 5)),
        )
        log = open(out_dir / f"rank{rank}.log", "w")  # noqa: SIM115 - closed below
        procs.append((subprocess.Popen([sys.executable, str(SCRIPT), str(out_dir), *scenarios], env=env,
                                       stdout=log, stderr=subprocess.STDOUT, start_new_session=True), log))
    deadline = time.monotonic() + timeout
    timed_out = False
    for proc, _ in procs:
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            timed_out = True
    for proc, log in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    logs = "\n".join((out_dir / f"rank{r}.log").read_text()[-4000:] for r in range(WORLD))
    if timed_out:
        pytest.fail(f"a launch of {scenarios} did not finish within {timeout} s (a rank waited forever?):\n{logs}")
    results: dict[str, list[dict]] = {}
    for name in scenarios:
        per_rank = []
        for rank in range(WORLD):
            path = out_dir / f"{name}.rank{rank}.json"
            if not path.exists():
                pytest.fail(f"scenario {name} wrote nothing on rank {rank}:\n{logs}")
            data = json.loads(path.read_text())
            if "crashed" in data:
                pytest.fail(f"scenario {name} crashed on rank {rank}:\n{data['crashed']}")
            per_rank.append(data)
        results[name] = per_rank
    return results


DDP_SCENARIOS = ["usage_table", "unused_everywhere", "amp_overflow", "manual_gan", "strict_together",
                 "plain_ddp_unused", "fabric_usage", "torch_ddp_usage", "fabric_strict_together", "torch_ddp_unused",
                 "never_moved_strict", "ddp_frozen_after_wrap", "torch_ddp_join"]
SHARDED_SCENARIOS = ["fsdp1_engine", "fsdp2_lightning", "fsdp1_watch", "fsdp2_watch", "fsdp1_shared_unit"]


@pytest.fixture(scope="module")
def ddp(tmp_path_factory) -> dict[str, list[dict]]:
    return launch(tmp_path_factory.mktemp("ddp"), DDP_SCENARIOS)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> dict[str, list[dict]]:
    return launch(tmp_path_factory.mktemp("sharded"), SHARDED_SCENARIOS)


# ---------------------------------------------------------------------- DDP
def test_ddp_counts_equal_a_single_process_run_over_the_same_data(ddp, make_trainer):
    rank0, rank1 = ddp["usage_table"]
    # the one process sees, per micro-batch, the union of what the ranks did: a branch is used if any rank used it
    guard = GradGuard(summary=False)
    make_trainer(callbacks=[guard], accumulate_grad_batches=3).fit(UsageModel(single_process=True), loader(12, 0))
    single = counts(guard.report())
    numbers = {name: c[:5] for name, c in single.items()}  # a cause may be known to one run and not the other
    assert {name: c[:5] for name, c in rank0["counts"].items()} == numbers
    assert rank1["counts"] == rank0["counts"]  # every rank ends with the global counts
    assert rank0["hooks_left"] == rank1["hooks_left"] == 0  # the per-parameter hooks are gone after fit
    # spelled out: 4 steps of 3 micro-batches
    assert single["branches.shared_even.weight"][:4] == [4, 0, 12, 4]
    assert single["branches.rank0_only.weight"][:4] == [4, 0, 12, 0]
    assert single["branches.alternating.weight"][:4] == [4, 0, 12, 4]  # only the third micro-batch: nobody
    assert single["branches.early_only.weight"][:4] == [4, 0, 12, 4]  # DDP's write-back is not an arrival
    assert single["branches.unused.weight"][:4] == [4, 4, 12, 12]
    # the logged intermittent_params is the global count too: shared_even, alternating and early_only (a weight and
    # a bias each); rank0_only, which rank 1's own view calls intermittent, is not
    assert rank0["logged_intermittent"] and set(rank0["logged_intermittent"]) == {6.0}


def test_ddp_reports_parameters_missing_on_some_ranks_only_with_those_ranks(ddp):
    info = ddp["usage_table"][0]["distributed"]
    assert (info["strategy"], info["world_size"], info["unchecked"]) == ("ddp", 2, None)
    per_param = {name: (v["ranks"], v["micro_batches"]) for name, v in info["rank_dependent"].items()}
    assert per_param == {
        # rank 1 never used it: all 12 micro-batches, the synchronizing ones included (autograd, not .grad)
        "branches.rank0_only.weight": ([1], 12),
        "branches.rank0_only.bias": ([1], 12),
        # rank 0 missed it in position 1, rank 1 in position 0
        "branches.alternating.weight": ([0, 1], 8),
        "branches.alternating.bias": ([0, 1], 8),
    }


@pytest.mark.parametrize("loop", ["fabric_usage", "torch_ddp_usage"])
def test_hand_written_ddp_loops_count_what_the_trainer_counts(ddp, loop):
    """watch_fabric under Fabric DDP and watch() on torch's DistributedDataParallel, the same data and usage as the
    Trainer's run: the same global counts and the same ranks for the rank-dependent parameters, on every rank."""
    trainer_rank0 = ddp["usage_table"][0]
    rank0, rank1 = ddp[loop]
    numbers = {name: c[:5] for name, c in trainer_rank0["counts"].items()}
    assert {name: c[:5] for name, c in rank0["counts"].items()} == numbers
    assert {name: c[:5] for name, c in rank1["counts"].items()} == numbers
    assert rank0["distributed"]["rank_dependent"] == trainer_rank0["distributed"]["rank_dependent"]
    assert rank0["distributed"]["strategy"] == "ddp" and rank0["distributed"]["world_size"] == 2


def test_torch_ddp_unused_layer_is_named_before_ddp_fails(ddp):
    rank0, rank1 = ddp["torch_ddp_unused"]
    for result in (rank0, rank1):
        assert result["error"] is not None and "finished reduction in the prior iteration" in result["error"]
        assert result["missing"] == ["unused.weight", "unused.bias"] and result["steps"] == 1
    assert rank1["warnings"] == []  # rank zero alone warns
    ddp_warning = [w for w in rank0["warnings"] if "find_unused_parameters=False" in w]
    assert len(ddp_warning) == 1
    assert "unused.weight, unused.bias" in ddp_warning[0]
    assert "DistributedDataParallel(model, find_unused_parameters=True)" in ddp_warning[0]


def test_ddp_join_with_uneven_inputs_finishes_and_each_rank_reports_its_own_steps(ddp):
    # a collective of the guard's inside join() would be matched against DDP's shadow all-reduces: gloo aborts
    for rank, result in enumerate(ddp["torch_ddp_join"]):
        steps = 3 + (3 if rank == 0 else 7)
        assert result["steps"] == steps
        assert result["missing"] == ["unused.weight", "unused.bias"]
        assert result["none_steps"] == steps
        assert result["reductions"] == [1, 1]  # the logging step before the join; none inside it, none at close
        assert "join()" in result["unchecked"] and f"rank {rank}'s own view" in result["unchecked"]


def test_fabric_ddp_reduces_once_per_logging_step_and_once_at_close(ddp):
    rank0, rank1 = ddp["fabric_usage"]
    # 4 steps, log_every_n_steps=2: logging steps 1 and 3, then close() (nothing left to reduce after step 3)
    assert rank0["reductions_before_close"] == rank1["reductions_before_close"] == 2
    assert rank0["reductions"] == rank1["reductions"] == 2
    assert rank0["hooks_left"] == rank1["hooks_left"] == 0
    assert (rank0["writes"], rank1["writes"]) == (True, False)  # rank zero alone writes and prints


def test_fabric_strict_mode_raises_on_every_rank_before_the_step(ddp):
    for result in ddp["fabric_strict_together"]:
        assert result["raised"] and result["step"] == 0
        assert result["params"] == ["branches.unused.weight", "branches.unused.bias"]
        assert result["weights_unchanged"] and result["seconds"] < 10


def test_ddp_makes_one_collective_per_logging_step_and_logs_from_rank_zero(ddp):
    rank0, rank1 = ddp["usage_table"]
    # log_every_n_steps=2 over 4 steps: logging steps 1 and 3; the last step leaves nothing for the end of fit
    assert rank0["logged_steps"] == [1, 3] and rank1["logged_steps"] == []
    assert rank0["reductions"] == rank1["reductions"] == 2
    # the logged cumulative None counts are the global ones as of that step
    assert rank0["logged_none_steps"][-1]["gradguard/none_steps/branches.unused.weight"] == 4.0
    assert "gradguard/none_steps/branches.alternating.weight" not in rank0["logged_none_steps"][-1]


def test_ddp_unused_everywhere_and_global_norms(ddp):
    rank0, rank1 = ddp["unused_everywhere"]
    assert rank0["counts"]["unused.weight"][:4] == [4, 4, 4, 4]
    assert rank0["counts"]["used.weight"][:4] == [4, 0, 4, 0]
    assert rank0["counts"] == rank1["counts"]
    # the norms rank zero logged are those of the all-reduced gradients, which every rank holds at the step
    logged, reference = rank0["logged_norms"], rank0["reference_norms"]
    assert len(logged) == 4 and set(logged[0]) == set(reference[0]) == {"used.weight", "used.bias", "late.weight",
                                                                         "late.bias"}
    for got, want in zip(logged, reference):
        assert got == pytest.approx(want, rel=1e-5)
    assert reference == rank1["reference_norms"]
    assert rank0["reductions"] == 4  # one per logging step, none at the end (nothing left to reduce)


def test_ddp_amp_overflow_on_one_rank_is_one_skipped_step_everywhere(ddp):
    for result in ddp["amp_overflow"]:
        assert result["amp_skipped_steps"] == 1
        assert result["counts"]["used.weight"][4] == 1  # non-finite at that step, after the all-reduce
        assert result["counts"]["unused.weight"][:2] == [3, 3]
        assert not result["ok"]  # the unused parameter: the report is not clean


def test_ddp_manual_optimization_matches_a_single_process_run(ddp, make_trainer):
    from test_precision import ManualAmpGAN

    guard = GradGuard(summary=False)
    make_trainer(callbacks=[guard]).fit(ManualAmpGAN(clear_head={1}), loader(3, 0))
    single = counts(guard.report())
    for result in ddp["manual_gan"]:
        assert result["steps"] == 6
        assert result["missing"] == ["generator.head.weight"]
        assert result["counts"] == single
        assert result["counts"]["generator.head.weight"][:2] == [3, 1]
        assert result["counts"]["generator.head.weight"][5] == "cleared"


def test_ddp_strict_mode_raises_on_every_rank_at_the_same_step(ddp):
    results = ddp["strict_together"]
    assert [r["raised"] for r in results] == [True, True]
    assert [r["step"] for r in results] == [2, 2]
    assert [r["params"] for r in results] == [["late.weight", "late.bias"]] * 2
    assert all(r["seconds"] < 60 for r in results)


def test_ddp_strict_mode_names_a_group_at_lr_zero_on_every_rank_at_the_end_of_fit(ddp):
    results = ddp["never_moved_strict"]
    assert [r["raised"] for r in results] == [True, True]
    assert [(r["global_step"], r["step"], r["zero_lr_steps"]) for r in results] == [(4, 3, 4)] * 2
    assert [sorted(r["params"]) for r in results] == [["head.bias", "head.weight"]] * 2
    assert [r["found"] for r in results] == [{"head.weight": "zero_lr", "head.bias": "zero_lr"}] * 2


def test_no_distributed_run_reports_a_weight_that_never_moved(ddp, sharded):
    """Steps, learning rates and version counters under DDP, FSDP1 (empty shards) and FSDP2 (DTensor parameters)."""
    results = [r for runs in (*ddp.values(), *sharded.values()) for rank in runs
               for r in ([rank] if "never_moved" in rank else [v for v in rank.values() if isinstance(v, dict)])]
    checked = [r["never_moved"] for r in results if "never_moved" in r]
    assert len(checked) >= 14 and all(found == [] for found in checked)


def test_plain_ddp_unused_parameter_error_names_the_parameters(ddp):
    for rank, result in enumerate(ddp["plain_ddp_unused"]):
        message = result["error"]
        assert result["type"] == "RuntimeError"
        assert "parameters that were not used in producing the loss" in message  # Lightning's guidance stays
        assert "unused.weight, unused.bias" in message  # ... and GradGuard adds the names (Lightning #17212)
        assert f"on rank {rank}" in message
        assert result["missing"] == ["unused.weight", "unused.bias"]
        assert result["counts"]["unused.weight"][:2] == [1, 1]
        # DDP's reduction stalled at step 0: GradGuard made no collective from there (one would be matched against
        # DDP's pending bucket all-reduces on a rank that used the parameter), and nothing hung
        assert result["reductions"] == 0


def test_the_names_added_to_ddps_error_follow_ddps_numbering_after_a_layer_is_frozen(ddp):
    """DDP numbered the parameters that required grad when it was built; mapping its indices with requires_grad as
    it is at the error (``first`` frozen since) named the wrong layer."""
    for rank, result in enumerate(ddp["ddp_frozen_after_wrap"]):
        message = result["error"]
        assert f"received no gradient on rank {rank}" in message
        assert "first.weight, first.bias" in message and "second." not in message


# ---------------------------------------------------------------------- FSDP1 (plain torch) and FSDP2 (Lightning)
def test_fsdp1_empty_shards_are_not_missing_and_norms_are_global(sharded):
    rank0, rank1 = (r["plain"] for r in sharded["fsdp1_engine"])
    assert rank1["local_sizes"]["gate.scale"] == 0 and rank0["local_sizes"]["gate.scale"] == 1
    # every rank reports every parameter with the counts of the ranks that hold it
    for result in (rank0, rank1):
        got = result["counts"]
        assert got["gate.scale"][:2] == [3, 3]
        assert got["spare.weight"][:2] == got["spare.bias"][:2] == [3, 3]
        assert {name for name, c in got.items() if c[1]} == {"gate.scale", "spare.weight", "spare.bias"}
        assert all(c[0] == 3 for c in got.values())
    # the norms are those of the full gradients (an unsharded replica over both ranks' data), not of the shards
    for result in (rank0, rank1):
        assert len(result["logged"]) == 3
        for got, want in zip(result["logged"], result["expected"]):
            assert set(got) == set(want) == {"a.weight", "a.bias", "b.weight", "b.bias"}
            assert got == pytest.approx(want, rel=1e-4)
    assert rank0["reductions"] == 3 and rank0["votes"] == 0


def test_watch_on_torch_fsdp1_counts_as_the_engine_with_the_ledger_does(sharded):
    for engine_run, watched in zip(sharded["fsdp1_engine"], sharded["fsdp1_watch"]):
        plain = watched["plain"]
        # the same global counts: gate.scale (rank 0's shard only) and spare missing at every step, on both ranks
        assert {n: c[:5] for n, c in plain["counts"].items()} == {
            n: c[:5] for n, c in engine_run["plain"]["counts"].items()
        }
        # one reduction per logging step (log_every_n_steps=1) and one when the guard closes
        assert plain["distributed"]["strategy"] == "fsdp" and plain["reductions"] == 4
        assert "use_orig_params=True" in plain["distributed"]["unchecked"]  # read from the FSDP module itself
        # strict: only gate.scale is unused and rank 1 holds none of it, yet both ranks raise at step 0
        assert watched["strict"]["raised"] == {"step": 0, "params": ["gate.scale"]}
        # FSDP's own flat parameters (kept in each unit's `params` list) are not the user's unregistered tensors
        assert "unregistered" not in plain["findings"]
        # use_orig_params=False (original parameters are views into the flat ones): watch() works, nothing false
        assert watched["flat"] == {"steps": 2, "findings": []}


def test_fsdp1_strict_mode_decides_together_even_where_a_rank_sees_nothing_missing(sharded):
    rank0, rank1 = (r["strict"] for r in sharded["fsdp1_engine"])
    assert rank1["local_sizes"]["gate.scale"] == 0  # rank 1 has no data of gate.scale: locally nothing is missing
    assert rank0["raised"] == rank1["raised"] == {"step": 0, "params": ["gate.scale"]}
    assert rank0["votes"] == rank1["votes"] == 1


def test_fsdp2_modelparallel_dtensor_norms_are_global_and_none_means_unused(sharded):
    rank0, rank1 = sharded["fsdp2_lightning"]
    assert rank1["local_shapes"]["net.2.weight"] == [0, 3]  # an empty local shard is not a missing gradient
    for result in (rank0, rank1):
        got = result["counts"]
        assert {name for name, c in got.items() if c[1]} == {"unused.weight", "unused.bias"}
        assert got["unused.weight"][:2] == [3, 3]
        # rank 1 poisoned only its own shard of net.0.weight at step 2: globally that gradient is non-finite once
        assert got["net.0.weight"][4] == 1
        assert sum(c[4] for c in got.values()) == 1
        assert result["distributed"]["strategy"] == "fsdp2"
    logged, reference = rank0["logged_norms"], rank0["reference_norms"]
    assert len(logged) == 3
    for got, want in zip(logged, reference):
        assert set(got) == set(want)
        for name, value in want.items():
            if math.isfinite(value):
                assert got[name] == pytest.approx(value, rel=1e-4), name
            else:
                assert not math.isfinite(got[name]), name


def test_watch_on_torch_fsdp2_logs_global_norms_and_none_means_unused(sharded):
    rank0, rank1 = sharded["fsdp2_watch"]
    assert rank1["local_numel"]["gate.scale"] == 0  # rank 1 holds nothing of it: its None there is not "missing"
    for result in (rank0, rank1):
        missing = {name for name, c in result["counts"].items() if c[1]}
        assert missing == {"gate.scale", "spare.weight", "spare.bias"}  # never called, on every rank
        assert all(c[0] == 3 for c in result["counts"].values())
        assert result["distributed"]["strategy"] == "fsdp2"
    assert len(rank0["logged"]) == 3 and rank1["logged"] == []  # rank zero alone writes
    for got, want in zip(rank0["logged"], rank0["reference"]):
        assert set(got) == set(want) == {"a.weight", "a.bias", "b.weight", "b.bias"}
        assert got == pytest.approx(want, rel=1e-4)  # the full gradients' norms, not the shards'


def test_fsdp1_unused_parameter_in_a_used_unit_is_a_zero_gradient_found_by_all_ranks_together(sharded):
    rank0, rank1 = sharded["fsdp1_shared_unit"]
    # the setup: rank 1 holds a piece of the embedding that no token looks up (a zero shard of a used parameter),
    # and all of `unused`
    assert rank1["local_zero"]["emb.weight"] and not rank0["local_zero"]["emb.weight"]
    assert rank0["local_numel"]["unused.weight"] == 0 and rank1["local_zero"]["unused.weight"]
    for result in (rank0, rank1):
        params = result["report"]["params"]
        assert {n: (p["none_steps"], p["measured_steps"], p["zero_steps"]) for n, p in params.items()} == {
            "emb.weight": (0, 4, 0), "used.weight": (0, 4, 0), "used.bias": (0, 4, 0),
            "unused.weight": (0, 4, 4), "unused.bias": (0, 4, 4),
        }
        for name in ("unused.weight", "unused.bias"):
            assert params[name]["cause"] == "zero"
            assert params[name]["detail"].startswith(
                "under FSDP a parameter that no forward pass used gets a zero gradient, not None"
            )
        assert "- unused.weight, unused.bias (zero): under FSDP" in result["summary"]


# ---------------------------------------------------------------------- packing (no processes needed)
@pytest.mark.parametrize("world", [2, 3, 8, 52, 64])
def test_flag_packing_round_trips_through_a_sum(world):
    g = torch.Generator().manual_seed(world)
    flags = [torch.rand(37, 5, generator=g) > 0.5 for _ in range(world)]
    total = sum(pack_flags(f, rank, world) for rank, f in enumerate(flags))  # what an all-reduce SUM computes
    cells = unpack_flags(total, 37, world)
    _, per_rank = slot_bits(world)
    if per_rank:
        for rank, f in enumerate(flags):
            assert torch.equal((cells >> rank) & 1 == 1, f)
        assert ranks_in(int(cells[0, 0])) == [r for r in range(world) if flags[r][0, 0]]
    else:
        assert torch.equal(cells, torch.stack(flags).sum(0))


# ---------------------------------------------------------------------- strategy detection (no processes needed)
def test_strategies_are_recognized_from_real_strategy_objects():
    from types import SimpleNamespace

    from lightning.pytorch import Trainer
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    from lightning_gradguard.training.strategies import describe_strategy

    single = describe_strategy(Trainer(accelerator="cpu", devices=1, logger=False))
    assert (single.name, single.world_size, single.unchecked()) == ("single", 1, None)
    ddp = describe_strategy(Trainer(accelerator="cpu", devices=2, strategy="ddp_find_unused_parameters_true",
                                    logger=False))
    assert (ddp.name, ddp.world_size, ddp.find_unused_parameters, ddp.local_micro_batches) == ("ddp", 2, True, True)
    plain = describe_strategy(Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False))
    assert (plain.name, plain.find_unused_parameters) == ("ddp", False)
    # static_graph=True reduces without the unused parameters it learned: no "stops DDP's reduction" warning
    from lightning.pytorch.strategies import DDPStrategy

    static = describe_strategy(Trainer(accelerator="cpu", devices=2, strategy=DDPStrategy(static_graph=True),
                                       logger=False))
    assert (static.name, static.find_unused_parameters) == ("ddp", True)
    fsdp = describe_strategy(SimpleNamespace(strategy=FSDPStrategy(), world_size=2, global_rank=1))
    assert (fsdp.name, fsdp.use_orig_params, fsdp.none_is_local, fsdp.shard_local_grads) == ("fsdp", True, True, True)
    assert "zero gradient" in fsdp.unchecked()
    fsdp2 = describe_strategy(SimpleNamespace(strategy=ModelParallelStrategy(), world_size=2, global_rank=0))
    assert (fsdp2.name, fsdp2.none_is_local, fsdp2.shard_local_grads) == ("fsdp2", False, True)


def test_deepspeed_is_stated_once_and_nothing_is_reported_missing(make_trainer, monkeypatch, recwarn):
    # Lightning's DeepSpeedStrategy needs deepspeed and a GPU; the guard's behaviour under it is what it does with
    # the strategy description, so this test hands it DeepSpeed's and runs a real fit
    from models import UnusedLayerMLP, gradguard_warnings, regression_loader

    import lightning_gradguard.training.context as context
    from lightning_gradguard.training.strategies import StrategyInfo

    monkeypatch.setattr(context, "describe_strategy", lambda trainer: StrategyInfo("deepspeed", 1, 0, zero_stage=2))
    guard = GradGuard(summary=False)
    make_trainer(callbacks=[guard]).fit(UnusedLayerMLP(), regression_loader(3))
    report = guard.report()
    assert report.params == {} and report.missing == []  # never a false None for every parameter
    assert report.distributed.strategy == "deepspeed"
    assert report.distributed.unchecked.startswith("under DeepSpeed (ZeRO stage 2) gradients live in")
    assert "does not check missing gradients" in report.summary()
    said = [w for w in gradguard_warnings(recwarn) if "DeepSpeed" in w]
    assert len(said) == 1
