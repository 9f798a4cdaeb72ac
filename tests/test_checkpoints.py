"""Checkpoint resume: a run resumed with ``fit(ckpt_path=...)`` continues GradGuard's counts exactly."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from models import IntermittentBranchMLP, SkipBatchesMLP, regression_loader

from lightning_gradguard import GradGuard


def model_factory():
    # `unused` never gets a gradient, the branch only on batch 1 of each epoch (k=2: 1 of 4 windows)
    torch.manual_seed(0)
    return IntermittentBranchMLP(branch_batches={1}, with_unused=True)


def fit(make_trainer, max_epochs, guard=None, ckpt_path=None, checkpoint_dir=None, model=None):
    guard = guard or GradGuard(summary=False)
    callbacks = [guard]
    if checkpoint_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=checkpoint_dir, save_last=True, save_top_k=0))
    trainer = make_trainer(
        callbacks=callbacks,
        max_epochs=max_epochs,
        accumulate_grad_batches=2,
        enable_checkpointing=checkpoint_dir is not None,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        trainer.fit(model or model_factory(), regression_loader(8), ckpt_path=ckpt_path)
    return guard, trainer


def test_resumed_run_continues_counts_exactly(make_trainer, tmp_path):
    checkpoints = str(tmp_path / "ckpt")
    first, _ = fit(make_trainer, max_epochs=2, checkpoint_dir=checkpoints)
    assert first.report().steps == 8
    last = os.path.join(checkpoints, "last.ckpt")
    saved = torch.load(last, weights_only=False)["callbacks"]
    assert any(key.startswith("GradGuard") for key in saved)

    resumed, trainer = fit(make_trainer, max_epochs=4, ckpt_path=last)
    uninterrupted, _ = fit(make_trainer, max_epochs=4)

    assert trainer.global_step == 16
    expected = uninterrupted.report().to_dict()
    assert expected["steps"] == 16 and expected["micro_batches"] == 32
    assert expected["params"]["unused.weight"]["none_steps"] == 16
    assert expected["params"]["branch.weight"]["none_steps"] == 12
    assert expected["params"]["branch.weight"]["none_micro_batches"] == 28
    assert resumed.report().to_dict() == expected


def test_resumed_run_does_not_warn_again_for_already_reported_parameters(make_trainer, tmp_path):
    checkpoints = str(tmp_path / "ckpt")
    fit(make_trainer, max_epochs=1, checkpoint_dir=checkpoints)
    guard = GradGuard(summary=False)
    trainer = make_trainer(callbacks=[guard], max_epochs=2, accumulate_grad_batches=2)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(model_factory(), regression_loader(8), ckpt_path=os.path.join(checkpoints, "last.ckpt"))
    assert [str(w.message) for w in record if str(w.message).startswith("GradGuard")] == []
    assert guard.report().params["unused.weight"].none_steps == 8


def test_resuming_into_a_guard_that_already_has_counts_replaces_them(make_trainer, tmp_path):
    """The same GradGuard object reused for a resumed fit takes the checkpoint's counts, not its own leftovers."""
    checkpoints = str(tmp_path / "ckpt")
    guard, _ = fit(make_trainer, max_epochs=1, checkpoint_dir=checkpoints)
    epoch_one = os.path.join(checkpoints, "epoch1.ckpt")
    os.replace(os.path.join(checkpoints, "last.ckpt"), epoch_one)
    fit(make_trainer, max_epochs=3, guard=guard, model=model_factory())  # the guard now holds 3 epochs of counts

    fit(make_trainer, max_epochs=2, guard=guard, ckpt_path=epoch_one)
    uninterrupted, _ = fit(make_trainer, max_epochs=2)
    assert guard.report().to_dict() == uninterrupted.report().to_dict()


def test_no_backward_right_after_resume_is_detected(make_trainer, tmp_path):
    checkpoints = str(tmp_path / "ckpt")
    guard = GradGuard(summary=False)
    trainer = make_trainer(
        callbacks=[guard, ModelCheckpoint(dirpath=checkpoints, save_last=True, save_top_k=0)],
        enable_checkpointing=True,
    )
    trainer.fit(SkipBatchesMLP(), regression_loader(4))

    resumed = GradGuard(summary=False)
    with pytest.warns(UserWarning, match=r"\[no_backward\]"):
        make_trainer(callbacks=[resumed], max_epochs=2).fit(
            SkipBatchesMLP(skip_batches={0}), regression_loader(4), ckpt_path=os.path.join(checkpoints, "last.ckpt")
        )
    report = resumed.report()
    assert report.steps == 8
    assert report.params["l1.weight"].none_steps == 1
    assert report.params["l1.weight"].cause == "no_backward"


def test_resume_with_strict_turned_on_continues_the_counts(make_trainer, tmp_path):
    """A common move: resume the run with strict=True to stop at the bad step; the history must not restart."""
    from models import UnusedLayerMLP

    from lightning_gradguard import GradGuardError

    checkpoints = str(tmp_path / "ckpt")
    first = GradGuard(summary=False)
    with pytest.warns(UserWarning, match="GradGuard"):
        make_trainer(
            callbacks=[first, ModelCheckpoint(dirpath=checkpoints, save_last=True, save_top_k=0)],
            enable_checkpointing=True,
        ).fit(UnusedLayerMLP(), regression_loader(4))

    strict = GradGuard(strict=True, allow_none=["nothing.*"], summary=False)
    assert strict.state_key != first.state_key
    with pytest.raises(GradGuardError) as info:
        make_trainer(callbacks=[strict], max_epochs=2).fit(
            UnusedLayerMLP(), regression_loader(4), ckpt_path=os.path.join(checkpoints, "last.ckpt")
        )
    assert info.value.step == 4
    assert info.value.report.steps == 5
    assert info.value.report.params["unused.weight"].none_steps == 5


class _Evaluated(IntermittentBranchMLP):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.compute(x, batch_idx), y))

    def predict_step(self, batch, batch_idx):
        return self.compute(batch[0], batch_idx)


def test_evaluating_an_earlier_checkpoint_after_fit_does_not_rewind_the_counts(make_trainer, tmp_path):
    # Lightning restores every callback's state for validate/test/predict(ckpt_path=...) too; the training counts
    # of the guard (its report, and a later fit that continues them) must not go back to the checkpoint's
    torch.manual_seed(0)
    model = _Evaluated(branch_batches={1}, with_unused=True)
    guard = GradGuard(summary=False)
    checkpoints = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_top_k=-1, every_n_epochs=1)
    trainer = make_trainer(callbacks=[guard, checkpoints], max_epochs=3, accumulate_grad_batches=2,
                           enable_checkpointing=True, limit_val_batches=2)
    data = regression_loader(8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        trainer.fit(model, data, data)
        after_fit = guard.report().to_dict()
        first_epoch = os.path.join(str(tmp_path / "ckpt"), "epoch=0-step=4.ckpt")
        assert after_fit["steps"] == 12 and os.path.exists(first_epoch)
        trainer.validate(model, data, ckpt_path=first_epoch)
        assert guard.report().to_dict() == after_fit
        trainer.predict(model, data, ckpt_path=first_epoch)
        assert guard.report().to_dict() == after_fit
        trainer.fit_loop.max_epochs = 4
        trainer.fit(model, data, data)  # the same Trainer and guard, one more epoch: the counts carry on
    assert guard.report().steps == 16
    assert guard.report().params["unused.weight"].none_steps == 16


def test_a_tuner_run_before_fit_leaves_an_empty_report_and_fit_counts_its_own_steps(make_trainer):
    from lightning.pytorch.tuner import Tuner

    torch.manual_seed(0)
    guard = GradGuard(summary=False)
    trainer = make_trainer(callbacks=[guard], max_epochs=1, accumulate_grad_batches=2)
    model = model_factory()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        Tuner(trainer).lr_find(model, regression_loader(8), num_training=6, update_attr=False)
        report = guard.report()  # the user's own guard: the tuner's restore holds no run to name
        assert (report.steps, report.params) == (0, {})
        trainer.fit(model, regression_loader(8))
    report = guard.report()
    assert report.steps == 4 and report.params["unused.weight"].none_steps == 4
