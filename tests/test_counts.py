"""What GradGuard counts, checked with exact numbers on real Trainer runs.

Each test plants a known gradient pattern (a layer never called, a branch that runs on chosen batch indices, a
``zero_grad`` in the wrong place, a ``training_step`` that returns None) and asserts the exact per-parameter
counts a user would read in ``guard.report()``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.callbacks import GradientAccumulationScheduler
from models import (
    IN_DIM,
    ClearedManualModel,
    FrozenBackboneModel,
    HealthyMLP,
    IntermittentBranchMLP,
    ManualGAN,
    NaNBranchMLP,
    PaddingEmbeddingModel,
    SkipBatchesMLP,
    TiedEmbeddingLM,
    TruncatedBPTTRNN,
    UnusedLayerMLP,
    gradguard_warnings,
    regression_loader,
    sequence_loader,
    token_loader,
)
from torch import nn

from lightning_gradguard import GradGuard

TRUNK = ("trunk.weight", "trunk.bias", "head.weight", "head.bias")


def counts(report, name):
    """(steps, none_steps, micro_batches, none_micro_batches) of one parameter."""
    p = report.params[name]
    return p.steps, p.none_steps, p.micro_batches, p.none_micro_batches


class WindowRecorder(Callback):
    """Placed after GradGuard: records, at every optimizer step, how many micro-batches GradGuard counted for it."""

    def __init__(self, guard: GradGuard, name: str) -> None:
        self.guard, self.name = guard, name
        self.windows: list[int] = []
        self.accumulate: list[int] = []
        self._seen = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        total = self.guard.report().params[self.name].micro_batches
        self.windows.append(total - self._seen)
        self._seen = total
        self.accumulate.append(trainer.accumulate_grad_batches)


# ------------------------------------------------------------ never
def test_unused_layer_is_flagged_at_every_step_with_exact_counts(make_trainer):
    guard = GradGuard(summary=False)
    trainer = make_trainer(callbacks=[guard], max_epochs=2)
    with pytest.warns(UserWarning, match="GradGuard"):
        trainer.fit(UnusedLayerMLP(), regression_loader(5))

    report = guard.report()
    assert report.steps == 10
    assert report.micro_batches == 10
    assert report.missing == ["unused.weight", "unused.bias"]
    assert report.intermittent == []
    for name in ("unused.weight", "unused.bias"):
        assert counts(report, name) == (10, 10, 10, 10)
    for name in ("l1.weight", "l1.bias", "l2.weight", "l2.bias"):
        assert counts(report, name) == (10, 0, 10, 0)
        assert report.params[name].cause is None
    assert report.to_dict()["params"]["unused.bias"]["none_steps"] == 10


# ------------------------------------------------------------ healthy models
HEALTHY = {
    "mlp": (HealthyMLP, lambda: regression_loader(6)),
    "tied_embedding": (TiedEmbeddingLM, lambda: token_loader(6)),
    "frozen_with_LightningModule.freeze": (lambda: FrozenBackboneModel("freeze"), lambda: regression_loader(6)),
    "frozen_with_requires_grad_": (lambda: FrozenBackboneModel("requires_grad_"), lambda: regression_loader(6)),
    "frozen_not_in_optimizer": (lambda: FrozenBackboneModel(optimize="trainable"), lambda: regression_loader(6)),
    "padding_embedding": (PaddingEmbeddingModel, lambda: token_loader(6)),
    "truncated_bptt_detached_hidden": (TruncatedBPTTRNN, lambda: sequence_loader(6)),
    "gan_manual_toggle": (lambda: ManualGAN(toggle=True), lambda: regression_loader(6)),
    "gan_manual_no_toggle": (lambda: ManualGAN(toggle=False), lambda: regression_loader(6)),
    "gan_manual_3_critic_steps": (lambda: ManualGAN(critic_steps=3), lambda: regression_loader(6)),
}


@pytest.mark.parametrize("accumulate", [1, 3])
@pytest.mark.parametrize("case", sorted(HEALTHY))
def test_healthy_models_report_nothing(make_trainer, case, accumulate):
    build_model, build_data = HEALTHY[case]
    model = build_model()
    if not model.automatic_optimization and accumulate != 1:
        pytest.skip("Lightning forbids accumulate_grad_batches with manual optimization")
    guard = GradGuard(summary=False)
    trainer = make_trainer(callbacks=[guard], max_epochs=2, accumulate_grad_batches=accumulate)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(model, build_data())

    report = guard.report()
    assert gradguard_warnings(record) == []
    assert report.missing == []
    assert report.intermittent == []
    assert report.nonfinite == []
    assert report.zero == []  # padding rows, detached carried states, tied weights: zeros in places, never all
    assert report.findings == []
    assert report.ok
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert set(report.params) == trainable  # frozen parameters are never checked, tied weights are one
    assert report.steps == trainer.global_step
    for p in report.params.values():
        assert p.none_steps == p.none_micro_batches == 0
        assert p.cause is None and p.detail is None


def test_tied_weights_are_one_parameter_under_their_first_name(make_trainer):
    guard = GradGuard(summary=False)
    make_trainer(callbacks=[guard]).fit(TiedEmbeddingLM(), token_loader(3))
    assert sorted(guard.report().params) == ["embed.weight", "mix.bias", "mix.weight"]


def test_frozen_backbone_is_absent_from_the_report(make_trainer):
    guard = GradGuard(summary=False)
    make_trainer(callbacks=[guard]).fit(FrozenBackboneModel("freeze"), regression_loader(3))
    assert sorted(guard.report().params) == ["head.bias", "head.weight"]


# ------------------------------------------------------------ sometimes
def test_accumulation_separates_never_from_sometimes(make_trainer):
    # 8 batches, k=4: windows [0..3] and [4..7]; the branch runs on batch 0 only (in window 1), `unused` never
    guard = GradGuard(summary=False)
    trainer = make_trainer(callbacks=[guard], accumulate_grad_batches=4)
    with pytest.warns(UserWarning, match="GradGuard"):
        trainer.fit(IntermittentBranchMLP(branch_batches={0, 5}, with_unused=True), regression_loader(8))

    report = guard.report()
    assert report.steps == 2
    assert report.micro_batches == 8
    for name in TRUNK:
        assert counts(report, name) == (2, 0, 8, 0)
    # the branch has a gradient at both steps (batch 0 feeds step 0, batch 5 feeds step 1) but missed 6 micro-batches
    assert counts(report, "branch.weight") == (2, 0, 8, 6)
    assert counts(report, "unused.weight") == (2, 2, 8, 8)
    assert report.missing == ["unused.weight", "unused.bias"]
    assert report.intermittent == ["branch.weight", "branch.bias"]


def test_branch_missing_a_whole_window_counts_a_none_step(make_trainer):
    guard = GradGuard(summary=False)
    trainer = make_trainer(callbacks=[guard], accumulate_grad_batches=4, max_epochs=2)
    with pytest.warns(UserWarning, match="GradGuard"):
        trainer.fit(IntermittentBranchMLP(branch_batches={1, 2}), regression_loader(8))

    report = guard.report()
    # per epoch: window [0..3] has the branch twice, window [4..7] never
    assert counts(report, "branch.weight") == (4, 2, 16, 12)
    assert counts(report, "branch.bias") == (4, 2, 16, 12)
    assert report.missing == ["branch.weight", "branch.bias"]
    assert report.intermittent == []


def test_partial_final_window_counts_its_real_length(make_trainer):
    # 10 batches, k=4: windows of 4, 4 and 2 micro-batches per epoch; the branch runs on batch 8 only
    guard = GradGuard(summary=False)
    recorder = WindowRecorder(guard, "trunk.weight")
    trainer = make_trainer(callbacks=[guard, recorder], accumulate_grad_batches=4, max_epochs=2)
    with pytest.warns(UserWarning, match="GradGuard"):
        trainer.fit(IntermittentBranchMLP(branch_batches={8}, with_unused=True), regression_loader(10))

    report = guard.report()
    assert recorder.windows == [4, 4, 2, 4, 4, 2]
    assert report.steps == 6
    assert report.micro_batches == 20
    for name in TRUNK:
        assert counts(report, name) == (6, 0, 20, 0)
    assert counts(report, "unused.weight") == (6, 6, 20, 20)
    # the branch: None at the two full windows of each epoch, present (1 of 2 micro-batches) in the partial one
    assert counts(report, "branch.weight") == (6, 4, 20, 18)


def test_accumulation_scheduler_counts_the_real_window_lengths(make_trainer):
    # k = 1 in epoch 0, 2 in epoch 1, 4 in epoch 2; 8 batches per epoch; the branch runs on every 4th batch
    guard = GradGuard(summary=False)
    recorder = WindowRecorder(guard, "trunk.weight")
    scheduler = GradientAccumulationScheduler(scheduling={0: 1, 1: 2, 2: 4})
    trainer = make_trainer(callbacks=[guard, recorder, scheduler], max_epochs=3)
    with pytest.warns(UserWarning, match="GradGuard"):
        trainer.fit(IntermittentBranchMLP(branch_every=4, with_unused=True), regression_loader(8))

    report = guard.report()
    assert recorder.windows == [1] * 8 + [2] * 4 + [4] * 2
    assert recorder.accumulate == [1] * 8 + [2] * 4 + [4] * 2
    assert report.steps == 14
    assert report.micro_batches == 24
    for name in TRUNK:
        assert counts(report, name) == (14, 0, 24, 0)
    assert counts(report, "unused.weight") == (14, 14, 24, 24)
    # branch on batches 0 and 4 of each epoch: None at 6 of 8 steps (k=1), 2 of 4 (k=2), 0 of 2 (k=4)
    assert counts(report, "branch.weight") == (14, 8, 24, 18)


# ------------------------------------------------------------ several optimizers
@pytest.mark.parametrize("toggle", [True, False])
@pytest.mark.parametrize("owner", ["generator", "discriminator"])
def test_two_optimizers_report_only_the_parameters_of_the_optimizer_that_steps(make_trainer, owner, toggle):
    guard = GradGuard(summary=False)
    trainer = make_trainer(callbacks=[guard])
    with pytest.warns(UserWarning, match="GradGuard") as record:
        trainer.fit(ManualGAN(toggle=toggle, critic_steps=2, unused_in=owner), regression_loader(4))

    report = guard.report()
    own_steps = {"generator": 4, "discriminator": 8}  # two critic steps per batch
    assert report.steps == 12
    assert trainer.global_step == 12
    assert report.missing == [f"{owner}.unused.weight", f"{owner}.unused.bias"]
    assert report.intermittent == []
    # checked only when its own optimizer steps, never at the other optimizer's steps
    for name, p in report.params.items():
        net = name.split(".")[0]
        assert p.steps == own_steps[net], name
        assert p.none_steps == (own_steps[net] if "unused" in name else 0), name
    messages = gradguard_warnings(record)
    assert len(messages) == 1
    other = "discriminator" if owner == "generator" else "generator"
    assert f"{owner}.unused.weight" in messages[0] and other not in messages[0]


# ------------------------------------------------------------ causes
def test_zero_grad_between_manual_backward_and_step_is_cleared(make_trainer):
    guard = GradGuard(summary=False)
    trainer = make_trainer(callbacks=[guard])
    with pytest.warns(UserWarning, match=r"\[cleared\]"):
        trainer.fit(ClearedManualModel(clear_batches={2, 5}), regression_loader(8))

    report = guard.report()
    names = ["l1.weight", "l1.bias", "l2.weight", "l2.bias"]
    assert report.missing == names
    for name in names:
        # every backward delivered a gradient (no None micro-batch); it was gone at 2 of the 8 steps
        assert counts(report, name) == (8, 2, 8, 0)
        assert report.params[name].cause == "cleared"
        assert "zero_grad()" in report.params[name].detail


def test_step_without_manual_backward_is_no_backward(make_trainer):
    guard = GradGuard(summary=False)
    trainer = make_trainer(callbacks=[guard])
    with pytest.warns(UserWarning, match=r"\[no_backward\]"):
        trainer.fit(ClearedManualModel(step_without_backward={3}), regression_loader(8))

    report = guard.report()
    assert report.micro_batches == 7
    for name in ("l1.weight", "l1.bias", "l2.weight", "l2.bias"):
        assert counts(report, name) == (8, 1, 8, 1)
        assert report.params[name].cause == "no_backward"


def test_a_batch_skipped_by_returning_none_is_a_skipped_step_not_a_missing_gradient(make_trainer):
    # Lightning documents `return None` from training_step as "skip this batch": once the run has trained, such a
    # step is counted as skipped (a note), not as missing gradients, and strict mode does not stop the run
    guard = GradGuard(summary=False, strict=True)
    trainer = make_trainer(callbacks=[guard])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(SkipBatchesMLP(skip_batches={2, 5}), regression_loader(8))

    report = guard.report()
    assert trainer.global_step == 8
    assert report.ok and report.missing == []
    assert report.steps == 6 and report.micro_batches == 6
    for name in report.params:
        assert counts(report, name) == (6, 0, 6, 0)
    (note,) = report.findings
    assert (note.kind, note.severity) == ("skipped_batches", "note")
    assert note.detail.startswith("2 optimizer steps came after batches that ran no backward pass because "
                                  "training_step returned None")
    assert gradguard_warnings(record) == []
    assert guard.state_dict()["skipped_steps"] == 2  # a resumed run continues the count


def test_a_training_step_that_never_returns_its_loss_is_no_backward(make_trainer):
    # the bug the skip rule must not hide: nothing ever trained, so nothing was skipped on purpose
    guard = GradGuard(summary=False)
    trainer = make_trainer(callbacks=[guard])
    with pytest.warns(UserWarning, match=r"\[no_backward\]") as record:
        trainer.fit(SkipBatchesMLP(skip_batches=range(8)), regression_loader(8))

    report = guard.report()
    assert report.steps == 8 and report.micro_batches == 0
    assert not report.ok and len(report.missing) == 6
    for name, p in report.params.items():
        assert counts(report, name) == (8, 8, 8, 8)
        assert p.cause == "no_backward"
        assert "training_step returned None" in p.detail
    assert "skipped_batches" not in {f.kind for f in report.findings}
    assert "global step 0" in gradguard_warnings(record)[0]


class BatchNormMLP(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(IN_DIM, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_the_batch_norm_epoch_of_stochastic_weight_averaging_is_not_blamed_on_training_step(make_trainer):
    """SWA adds an epoch of forward passes only (Lightning skips their backward pass on purpose) to recompute the
    batch-norm statistics; its one optimizer step has no gradient to check. The note must say so, not tell the
    user that ``training_step`` returned None and that it should return its loss."""
    from lightning.pytorch.callbacks import StochasticWeightAveraging

    guard = GradGuard(summary=False)
    swa = StochasticWeightAveraging(swa_lrs=1e-2, swa_epoch_start=1)
    trainer = make_trainer(callbacks=[swa, guard], max_epochs=2)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(BatchNormMLP(), regression_loader(8))
    report = guard.report()
    assert gradguard_warnings(record) == [] and report.ok and report.missing == []
    assert report.steps == 16  # the two epochs that trained; the batch-norm epoch's step is not checked
    (note,) = [f for f in report.findings if f.kind == "skipped_batches"]
    assert "Lightning skipped their backward pass on purpose" in note.detail
    assert "training_step returned None" not in note.detail and "return its loss" not in note.detail


@pytest.mark.parametrize("skipped", [{3}, {2}, {2, 3, 5}])
def test_a_batch_skipped_by_returning_none_inside_a_window_is_not_part_of_it(make_trainer, skipped):
    # k=2: a batch whose training_step returns None (first or second of its window, or a whole window) ran no
    # backward pass on purpose: the step applies the other batch's gradients, and nothing is intermittent
    guard = GradGuard(summary=False)
    trainer = make_trainer(callbacks=[guard], accumulate_grad_batches=2)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(SkipBatchesMLP(skip_batches=skipped), regression_loader(8))

    report = guard.report()
    assert gradguard_warnings(record) == []
    assert report.missing == [] and report.intermittent == [] and report.ok
    whole_windows = 1 if skipped == {2, 3, 5} else 0  # batches 2 and 3 are the second window
    for name in report.params:
        assert counts(report, name) == (4 - whole_windows, 0, 8 - len(skipped), 0)
    notes = [f for f in report.findings if f.kind == "skipped_batches"]
    assert len(notes) == whole_windows


@pytest.mark.parametrize("nonfinite_check", ["every_step", "auto"])
def test_nan_gradients_are_counted_per_parameter(make_trainer, nonfinite_check):
    # "auto" on the CPU counts every step for an ordinary model; no logging step happens in this run
    guard = GradGuard(summary=False, nonfinite_check=nonfinite_check)
    trainer = make_trainer(callbacks=[guard])
    trainer.fit(NaNBranchMLP(nan_batches={1, 4, 6}), regression_loader(8))

    report = guard.report()
    assert report.nonfinite == ["bad.weight", "bad.bias"]
    assert report.params["bad.weight"].nonfinite_steps == 3
    assert report.params["bad.bias"].nonfinite_steps == 3
    assert report.params["good.weight"].nonfinite_steps == 0
    assert report.missing == []
    assert not report.ok


def test_guard_reused_for_a_second_fit_keeps_windows_exact(make_trainer):
    guard = GradGuard(summary=False)
    model = IntermittentBranchMLP(branch_batches={0}, with_unused=True)
    with pytest.warns(UserWarning, match="GradGuard"):
        make_trainer(callbacks=[guard], accumulate_grad_batches=2).fit(model, regression_loader(4))
    make_trainer(callbacks=[guard], accumulate_grad_batches=2).fit(model, regression_loader(4))

    report = guard.report()
    assert report.steps == 4
    assert report.micro_batches == 8
    assert counts(report, "trunk.weight") == (4, 0, 8, 0)
    assert counts(report, "unused.weight") == (4, 4, 8, 8)
    assert counts(report, "branch.weight") == (4, 2, 8, 6)


def test_parameters_added_to_the_optimizer_later_are_checked(make_trainer):
    """A parameter the optimizer holds but no module registered is still checked, under a synthetic name."""

    class ExtraParamModel(HealthyMLP):
        def configure_optimizers(self):
            self.stray = [torch.nn.Parameter(torch.zeros(3))]  # a plain list: not registered
            return torch.optim.SGD([*self.parameters(), *self.stray], lr=0.1)

    guard = GradGuard(summary=False)
    with pytest.warns(UserWarning, match="GradGuard"):
        make_trainer(callbacks=[guard]).fit(ExtraParamModel(), regression_loader(3))
    report = guard.report()
    assert report.missing == ["<SGD.param_groups[0][6]>"]
    assert counts(report, "<SGD.param_groups[0][6]>") == (3, 3, 3, 3)


def test_guard_reused_with_a_new_model_instance_keeps_the_names(make_trainer):
    """k-fold style: one guard, a fresh model per fit; counts continue under the same parameter names."""
    guard = GradGuard(summary=False)
    for _ in range(2):
        with pytest.warns(UserWarning, match="GradGuard") if not guard.report().steps else warnings.catch_warnings():
            make_trainer(callbacks=[guard]).fit(UnusedLayerMLP(), regression_loader(3))
    report = guard.report()
    assert sorted(report.params) == sorted(name for name, _ in UnusedLayerMLP().named_parameters())
    assert counts(report, "unused.weight") == (6, 6, 6, 6)
    assert counts(report, "l1.weight") == (6, 0, 6, 0)


def test_batches_skipped_by_on_train_batch_start_are_not_micro_batches(make_trainer):
    """``LightningModule.on_train_batch_start`` returning -1 ends the epoch early: that batch never ran."""

    class StopsEarly(HealthyMLP):
        def on_train_batch_start(self, batch, batch_idx):
            return -1 if batch_idx == 4 else None

    guard = GradGuard(summary=False)
    trainer = make_trainer(callbacks=[guard], max_epochs=2)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(StopsEarly(), regression_loader(8))

    report = guard.report()
    assert trainer.global_step == 8
    assert gradguard_warnings(record) == []
    assert report.intermittent == []
    assert counts(report, "l1.weight") == (8, 0, 8, 0)


def test_an_epoch_ended_by_minus_one_inside_a_window_leaves_no_micro_batch_to_the_next(make_trainer):
    """-1 at batch 3 with ``accumulate_grad_batches=2``: batch 2 opened a window no step closed, and Lightning's
    zero_grad at the next epoch's first batch drops its gradient: it is in no step's window."""

    class StopsMidWindow(IntermittentBranchMLP):
        def on_train_batch_start(self, batch, batch_idx):
            return -1 if batch_idx == 3 else None

    guard = GradGuard(summary=False)
    trainer = make_trainer(callbacks=[guard], max_epochs=2, accumulate_grad_batches=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        trainer.fit(StopsMidWindow(branch_batches={1}), regression_loader(8))
    report = guard.report()
    assert trainer.global_step == 2
    assert counts(report, "trunk.weight") == (2, 0, 4, 0)
    assert counts(report, "branch.weight") == (2, 0, 4, 2)  # used at batch 1 of each epoch's window (0, 1)


def test_progressive_unfreezing_with_base_finetuning_is_healthy(make_trainer):
    """BaseFinetuning freezes the backbone, then adds it to the optimizer at epoch 1: checked from then on only."""
    from lightning.pytorch.callbacks import BaseFinetuning

    class UnfreezeAtEpochOne(BaseFinetuning):
        def freeze_before_training(self, pl_module):
            self.freeze(pl_module.backbone)

        def finetune_function(self, pl_module, epoch, optimizer):
            if epoch == 1:
                self.unfreeze_and_add_param_group(pl_module.backbone, optimizer)

    class Finetuned(FrozenBackboneModel):
        def configure_optimizers(self):
            return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)

    guard = GradGuard(summary=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        make_trainer(callbacks=[guard, UnfreezeAtEpochOne()], max_epochs=3).fit(Finetuned(), regression_loader(4))

    report = guard.report()
    assert gradguard_warnings(record) == []
    assert report.ok and report.intermittent == []
    assert counts(report, "head.weight") == (12, 0, 12, 0)
    assert counts(report, "backbone.proj.weight") == (8, 0, 8, 0)  # epochs 1 and 2


def test_manual_gradient_accumulation_counts_windows_between_steps(make_trainer):
    """Manual optimization that steps every 4th batch: each window is the 4 backward passes before the step."""

    class ManualAccumulation(IntermittentBranchMLP):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            x, y = batch
            opt = self.optimizers()
            self.manual_backward(torch.nn.functional.mse_loss(self.compute(x, batch_idx), y))
            if (batch_idx + 1) % 4 == 0:
                opt.step()
                opt.zero_grad()

    guard = GradGuard(summary=False)
    with pytest.warns(UserWarning, match="GradGuard"):
        make_trainer(callbacks=[guard]).fit(
            ManualAccumulation(branch_batches={0, 5}, with_unused=True), regression_loader(8)
        )
    report = guard.report()
    assert counts(report, "trunk.weight") == (2, 0, 8, 0)
    assert counts(report, "branch.weight") == (2, 0, 8, 6)
    assert counts(report, "unused.weight") == (2, 2, 8, 8)


def test_auto_nonfinite_check_reads_gradients_on_log_steps_only_for_huge_cpu_models():
    from lightning_gradguard import GuardConfig

    few, many = [torch.zeros(1) for _ in range(1000)], [torch.zeros(1) for _ in range(1001)]
    assert GuardConfig.create().measures_every_step(few)
    assert not GuardConfig.create().measures_every_step(many)
    assert GuardConfig.create(nonfinite_check="every_step").measures_every_step(many)
    assert not GuardConfig.create(nonfinite_check="log_steps").measures_every_step(few)
    meta = [torch.zeros(1, device="meta") for _ in range(1001)]  # not the CPU: kernels run asynchronously
    assert GuardConfig.create().measures_every_step(meta)


class _RebuildsItsOptimizer(IntermittentBranchMLP):
    """A second training stage: a new optimizer built in ``on_train_epoch_start`` (``strategy.setup_optimizers``)."""

    def on_train_epoch_start(self):
        if self.current_epoch == 1:
            self.trainer.strategy.setup_optimizers(self.trainer)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_an_optimizer_built_during_the_fit_starts_its_window_at_the_latest_step(make_trainer, accumulate):
    # the new optimizer's first window is the micro-batches since the old optimizer's last step, not the whole run
    torch.manual_seed(0)
    guard = GradGuard(summary=False)
    trainer = make_trainer(callbacks=[guard], max_epochs=2, accumulate_grad_batches=accumulate)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        trainer.fit(_RebuildsItsOptimizer(branch_every=1), regression_loader(4))
    report = guard.report()
    assert report.ok and report.intermittent == [] and report.missing == []
    counts = {(p.steps, p.micro_batches, p.none_micro_batches) for p in report.params.values()}
    assert counts == {(8 // accumulate, 8, 0)}
