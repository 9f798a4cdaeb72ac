"""The per-step shortcuts give exactly the counts of the plain path.

Before a backward pass GradGuard snapshots every gradient, so that a micro-batch that gives a parameter nothing is
counted even when an earlier micro-batch's gradient is still in ``.grad``. Right after Lightning's own
``zero_grad()`` (``set_to_none=True``) the snapshot does not read the optimizer's gradients again (they are None);
anything else (an overridden ``optimizer_zero_grad``, an optimizer with its own ``zero_grad``) reads them all.
At the step, the check uses the gradients read right after backward when no hook can run in between, and reads
every ``.grad`` again otherwise.
"""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback
from models import ClearedManualModel, HealthyMLP, IntermittentBranchMLP, regression_loader
from torch import nn

from lightning_gradguard import GradGuard
from lightning_gradguard.core.arrivals import ArrivalTracker


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


# ---------------------------------------------------------------------- the step check reuses the read after backward
class ClearInHook(HealthyMLP):
    """Automatic optimization that sets ``l2.weight.grad = None`` in its own ``on_after_backward`` on some batches."""

    def __init__(self, clear_batches=(1,)) -> None:
        super().__init__()
        self.clear_batches = frozenset(clear_batches)

    def on_train_batch_start(self, batch, batch_idx) -> None:
        self._batch_idx = batch_idx

    def on_after_backward(self) -> None:
        if self._batch_idx in self.clear_batches:
            self.l2.weight.grad = None  # the bug: gone between backward and the step


def _clear_l2_at_batch_1(trainer, pl_module) -> None:
    if trainer.fit_loop.epoch_loop.batch_idx == 1:
        pl_module.l2.weight.grad = None


class ClearAfterBackward(Callback):
    def on_after_backward(self, trainer, pl_module) -> None:
        _clear_l2_at_batch_1(trainer, pl_module)


class ClearBeforeStep(Callback):
    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        _clear_l2_at_batch_1(trainer, pl_module)


def _instance_hook_callback() -> Callback:
    callback = Callback()
    callback.on_after_backward = _clear_l2_at_batch_1  # a hook assigned to the instance, not the class
    return callback


def test_default_trainer_reuses_the_read_after_backward(tmp_path):
    """Progress bar, checkpointing and model summary on: none of them touches gradients between backward and
    step, so the step check uses the gradients read right after backward; the counts are exact."""
    from lightning.pytorch import Trainer

    guard = GradGuard(summary=False)
    trainer = Trainer(accelerator="cpu", max_epochs=1, logger=False, default_root_dir=str(tmp_path),
                      callbacks=[guard], enable_progress_bar=True, enable_model_summary=True)
    trainer.fit(IntermittentBranchMLP(branch_batches={0, 5}, with_unused=True), regression_loader(8))
    assert guard.engine.reuse_backward_read
    params = guard.report().to_dict()["params"]
    assert params["branch.weight"]["none_steps"] == 6 and params["unused.weight"]["none_steps"] == 8
    assert params["trunk.weight"]["none_steps"] == 0


@pytest.mark.parametrize("where", ["module", "callback_after", "instance_hook_after", "callback_before"])
def test_code_between_backward_and_step_makes_the_check_read_again(make_trainer, where):
    """A gradient cleared between backward and step by a LightningModule hook, a callback after GradGuard
    (on_after_backward, defined on its class or assigned to the instance) or a callback before it
    (on_before_optimizer_step): found, with the cause `cleared`."""
    guard = GradGuard(summary=False)
    model, callbacks = (ClearInHook() if where == "module" else HealthyMLP()), [guard]
    if where == "callback_after":
        callbacks = [guard, ClearAfterBackward()]
    elif where == "instance_hook_after":
        callbacks = [guard, _instance_hook_callback()]
    elif where == "callback_before":
        callbacks = [ClearBeforeStep(), guard]
    with pytest.warns(UserWarning, match=r"\[cleared\]"):
        make_trainer(callbacks=callbacks).fit(model, regression_loader(4))
    assert not guard.engine.reuse_backward_read
    report = guard.report()
    assert report.missing == ["l2.weight"]
    assert report.params["l2.weight"].cause == "cleared"
    assert (report.params["l2.weight"].none_steps, report.params["l2.weight"].none_micro_batches) == (1, 0)


def test_manual_optimization_always_reads_at_the_step(make_trainer):
    guard = GradGuard(summary=False)
    with pytest.warns(UserWarning, match=r"\[cleared\]"):
        make_trainer(callbacks=[guard]).fit(ClearedManualModel(clear_batches={2}), regression_loader(4))
    assert not guard.engine.reuse_backward_read
    assert guard.report().params["l1.weight"].cause == "cleared"
