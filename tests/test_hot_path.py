"""The per-step shortcuts give exactly the counts of the plain path.

Before a backward pass GradGuard snapshots every gradient, so that a micro-batch that gives a parameter nothing is
counted even when an earlier micro-batch's gradient is still in ``.grad``. Right after Lightning's own
``zero_grad()`` (``set_to_none=True``) the snapshot does not read the optimizer's gradients again (they are None);
anything else (an overridden ``optimizer_zero_grad``, an optimizer with its own ``zero_grad``) reads them all.
"""

from __future__ import annotations

import pytest
import torch
from models import IntermittentBranchMLP, regression_loader
from torch import nn

from lightning_gradguard import GradGuard
from lightning_gradguard.arrivals import ArrivalTracker


class KeepGradsMLP(IntermittentBranchMLP):
    """Zeroes gradients in place (``set_to_none=False``): they stay tensors across steps."""

    def optimizer_zero_grad(self, epoch, batch_idx, optimizer) -> None:
        optimizer.zero_grad(set_to_none=False)


class ZeroingSGD(torch.optim.SGD):
    """An optimizer with its own zero_grad, which keeps the gradients as zero tensors."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=False)


class CustomOptimizerMLP(IntermittentBranchMLP):
    def configure_optimizers(self):
        return ZeroingSGD(self.parameters(), lr=0.1)


def fit_counts(make_trainer, model) -> dict[str, dict]:
    guard = GradGuard(summary=False)
    with pytest.warns(UserWarning, match="GradGuard"):
        make_trainer(callbacks=[guard], accumulate_grad_batches=4).fit(model, regression_loader(12))
    return guard.report().to_dict()["params"]


@pytest.mark.parametrize("variant", [KeepGradsMLP, CustomOptimizerMLP])
def test_gradients_kept_across_zero_grad_give_the_same_exact_counts(make_trainer, variant):
    """Branch on micro-batches 0 and 5 of 12, accumulate 4: a gradient at the first two steps only, from one micro-batch
    each; `unused` never. Kept-as-zero gradients must not look like arrivals."""
    expected = fit_counts(make_trainer, IntermittentBranchMLP(branch_batches={0, 5}, with_unused=True))
    got = fit_counts(make_trainer, variant(branch_batches={0, 5}, with_unused=True))
    assert expected["branch.weight"]["none_micro_batches"] == 10
    assert expected["branch.weight"]["none_steps"] == 1
    assert expected["unused.weight"]["none_micro_batches"] == 12
    for name in ("branch.weight", "branch.bias", "trunk.weight", "head.bias"):
        for key in ("steps", "none_steps", "micro_batches", "none_micro_batches"):
            assert got[name][key] == expected[name][key], (name, key)
    # in place zeroed, never given a gradient: .grad holds a zero tensor, the optimizer steps it; still missing
    assert got["unused.weight"]["none_micro_batches"] == 12


def test_snapshot_reads_everything_when_a_cleared_gradient_is_not_none():
    params = [nn.Parameter(torch.ones(2)) for _ in range(4)]
    for p in params:
        p.grad = torch.zeros(2)
    tracker = ArrivalTracker()
    tracker.before_backward(params, cleared=[0, 1, 2, 3])  # the promise does not hold: everything is read
    (params[1] * 2).sum().backward()  # only params[1] receives something
    assert tracker.after_backward(params) == [0, 2, 3]


def test_snapshot_with_cleared_parameters_reads_only_the_others():
    params = [nn.Parameter(torch.ones(2)) for _ in range(4)]
    params[3].grad = torch.zeros(2)  # not cleared: an earlier gradient that stays
    tracker = ArrivalTracker()
    tracker.before_backward(params, cleared=[0, 1, 2])
    (params[0] * 2).sum().backward()
    assert tracker.after_backward(params) == [1, 2, 3]
