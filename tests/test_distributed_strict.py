"""Strict mode when a gradient is None on one rank only: every rank raises the same error at the same step, and
nothing GradGuard does after the raise starts a collective the other rank is not also making.

Rank 1 alone sets ``p.grad = None`` (or runs ``zero_grad``) between the backward pass and the step, in the Trainer
(automatic and manual optimization), in Fabric and in a plain torch DDP loop; the guard then ends the way a user
ends it: Lightning's exception handling, ``close()`` in ``finally``, ``with watch(...)``, or left open until the
interpreter exits. Each scenario runs :data:`~distributed_scenarios.REPEATS` times in two gloo processes; after
each raise the ranks meet in collectives of their own, whose sums come out right only if no GradGuard collective
got in between on one rank. The launch runs under a time limit: a rank left waiting fails the test instead of
hanging it.
"""

from __future__ import annotations

import json

import pytest
from distributed_scenarios import DROP_STEP, REPEATS
from test_distributed import launch

SCENARIOS = {
    # scenario: the parameters every rank must name
    "trainer_strict_grad_none": ["late.weight", "late.bias"],
    "trainer_strict_zero_grad": ["layer.weight", "layer.bias"],
    "fabric_strict_grad_none": ["late.weight", "late.bias"],
    "torch_ddp_strict_zero_grad": ["used.weight", "used.bias", "late.weight", "late.bias"],
    "torch_ddp_strict_grad_none": ["late.weight", "late.bias"],
    "torch_ddp_strict_exit": ["late.weight", "late.bias"],  # last: its guards stay open until the processes exit
}


@pytest.fixture(scope="module")
def strict_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("strict")
    return out, launch(out, list(SCENARIOS), timeout=180)


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_every_rank_raises_the_same_error_at_the_same_step(strict_runs, name):
    _, results = strict_runs
    rank0, rank1 = (r["runs"] for r in results[name])
    assert len(rank0) == len(rank1) == REPEATS
    for attempt, (a, b) in enumerate(zip(rank0, rank1)):
        for rank, run in enumerate((a, b)):
            raised = run["raised"]
            assert raised is not None, f"rank {rank} did not raise (attempt {attempt})"
            assert raised["type"] == "GradGuardError"
            assert raised["step"] == DROP_STEP, (rank, attempt, raised)
            assert raised["params"] == SCENARIOS[name], (rank, attempt, raised)
            assert raised["seconds"] < 60
        assert a["raised"]["first_line"] == b["raised"]["first_line"]  # the same error, word for word
        # the ranks took the same decisions through the same collectives
        assert (a["raised"]["votes"], a["raised"]["reductions"]) == (b["raised"]["votes"], b["raised"]["reductions"])
        assert a["raised"]["votes"] == DROP_STEP + 1  # one strict decision per step, the raising one included
        # after the raise (on_exception, close(), __exit__), the user's own collective met the other rank's
        assert a["user_collective"] and b["user_collective"]


@pytest.mark.slow
def test_guards_left_open_are_closed_at_exit_without_a_collective(strict_runs):
    out, _ = strict_runs
    for rank in (0, 1):
        at_exit = json.loads((out / f"at_exit.rank{rank}.json").read_text())
        assert at_exit["closed"] == [True] * REPEATS  # GradGuard's exit handler closed every guard left open
        assert at_exit["user_collective"]  # ... and started no collective: the user's own still matched
