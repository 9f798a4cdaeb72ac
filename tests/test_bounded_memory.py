"""GradGuard's own memory does not grow with the number of steps: whatever it keeps per step (pending counts, staged
metrics, derived index lists, cached optimizer layouts) is bounded, so a run of a million steps holds what a run of a
thousand holds.

Measured with ``tracemalloc`` over the Python objects allocated by GradGuard's code (any frame of the allocation
in the package): after a warm-up, a long stretch of steps of a loop with everything switched on (an unused layer,
an intermittent branch, gradient accumulation, logging every few steps to TensorBoard) may leave only a few
kilobytes more behind.
"""

from __future__ import annotations

import gc
import os
import tracemalloc
import warnings

import torch
import torch.nn.functional as F
from plain_models import BranchNet, batches
from torch import nn

import lightning_gradguard
from lightning_gradguard import watch

PACKAGE = os.path.dirname(os.path.abspath(lightning_gradguard.__file__))
ALLOWED_GROWTH = 32 * 1024  # bytes: a few late first-time allocations, nothing that scales with the steps


class WithUnused(BranchNet):
    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Linear(4, 4)


def _traced_bytes() -> int:
    gc.collect()
    snapshot = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(True, os.path.join(PACKAGE, "*"), all_frames=True)]
    )
    return sum(stat.size for stat in snapshot.statistics("filename"))


def test_gradguards_memory_does_not_grow_with_the_steps(tmp_path):
    torch.manual_seed(0)
    model = WithUnused()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    data = batches(8)

    def train(steps: int) -> None:
        for step in range(steps):
            for micro in range(2):  # accumulation: 2 micro-batches per step, the branch in some of them only
                x, y = data[(2 * step + micro) % len(data)]
                F.mse_loss(model(x, use_branch=(step + micro) % 3 == 0), y).backward()
            optimizer.step()
            optimizer.zero_grad()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        guard = watch(model, optimizer, log_dir=str(tmp_path / "tb"), log_every_n_steps=5, summary=False)
        tracemalloc.start(10)
        try:
            train(100)  # warm-up: every cache and buffer reaches its size
            before = _traced_bytes()
            train(600)
            after = _traced_bytes()
        finally:
            tracemalloc.stop()
        report = guard.close()
    assert report.steps == 700 and report.params["unused.weight"].none_steps == 700
    assert report.params["branch.weight"].none_micro_batches > 0
    assert after - before < ALLOWED_GROWTH, f"GradGuard kept {after - before} more bytes after 600 more steps"
