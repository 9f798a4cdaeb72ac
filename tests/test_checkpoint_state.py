"""An unusable GradGuard entry in a checkpoint: one warning that says it was ignored, and the run goes on checking.

Each test saves a real checkpoint with a real Trainer, edits GradGuard's entry of ``checkpoint["callbacks"]`` the
way a hand-edited, truncated or foreign checkpoint would hold it (``torch.save``/``torch.load``), and resumes from
it: the fit must finish, warn once that the state was ignored, and count from zero with checking on (the unused
layer is still found, with the counts of the resumed epoch alone).
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from models import UnusedLayerMLP, regression_loader

from lightning_gradguard import GradGuard

N_BATCHES = 4


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A checkpoint after one epoch of :class:`UnusedLayerMLP` under GradGuard; returns (path, GradGuard's key)."""
    from lightning.pytorch import Trainer
    from models import quiet_trainer_options

    root = tmp_path_factory.mktemp("ckpt")
    options = quiet_trainer_options(root)
    options["enable_checkpointing"] = True
    guard = GradGuard(summary=False)
    trainer = Trainer(callbacks=[guard, ModelCheckpoint(dirpath=str(root), save_last=True, save_top_k=0)], **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        trainer.fit(UnusedLayerMLP(), regression_loader(N_BATCHES))
    path = os.path.join(root, "last.ckpt")
    key = next(k for k in torch.load(path, weights_only=False)["callbacks"] if k.startswith("GradGuard"))
    return path, key


def _edited(saved, tmp_path, entry) -> str:
    path, key = saved
    checkpoint = torch.load(path, weights_only=False)
    checkpoint["callbacks"][key] = entry(checkpoint["callbacks"][key])
    out = str(tmp_path / "edited.ckpt")
    torch.save(checkpoint, out)
    return out


def _good(state):
    return state


def _negative(state):
    state = dict(state)
    state["steps"] = -97
    state["params"] = {name: {**p, "none_steps": -3} for name, p in state["params"].items()}
    return state


def _bad_values(state):
    state = dict(state)
    state["params"] = {name: {**p, "steps": "4", "none_steps": None} for name, p in state["params"].items()}
    return state


def _bad_params(state):
    return {**state, "params": ["unused.weight"]}


def _bad_amp(state):
    return {**state, "amp_skipped_steps": -1}


UNUSABLE = {
    "a string": lambda state: "GradGuard state",
    "a list": lambda state: [1, 2, 3],
    "None": lambda state: None,
    "a dict with bad values": _bad_values,
    "a dict whose params is a list": _bad_params,
    "negative counts": _negative,
    "an unknown version": lambda state: {**state, "version": 99},
    "a negative amp_skipped_steps": _bad_amp,
}


def _resume(make_trainer, ckpt_path, strict=False):
    guard = GradGuard(summary=False, strict=strict)
    trainer = make_trainer(callbacks=[guard], max_epochs=2)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(UnusedLayerMLP(), regression_loader(N_BATCHES), ckpt_path=ckpt_path)
    said = [str(w.message) for w in record if str(w.message).startswith("GradGuard")]
    return guard, trainer, said


@pytest.mark.parametrize("kind", list(UNUSABLE))
def test_an_unusable_checkpoint_state_is_ignored_with_one_warning(make_trainer, saved, tmp_path, kind):
    guard, trainer, said = _resume(make_trainer, _edited(saved, tmp_path, UNUSABLE[kind]))
    assert trainer.global_step == 2 * N_BATCHES  # the resumed fit ran its epoch
    ignored = [w for w in said if "checkpoint" in w]
    assert len(ignored) == 1, said
    assert "cannot be used" in ignored[0] and "ignored" in ignored[0] and "starts from zero" in ignored[0]
    # checking is on, counting from zero: only the resumed epoch is counted, the unused layer is still found
    report = guard.report()
    assert report.steps == N_BATCHES
    assert report.missing == ["unused.weight", "unused.bias"]
    assert report.params["unused.weight"].none_steps == N_BATCHES
    assert report.params["l1.weight"].steps == N_BATCHES and report.params["l1.weight"].none_steps == 0
    assert any("received no gradient" in w for w in said)  # warned afresh: the old "warned" list went too


def test_negative_counts_never_reach_the_report(make_trainer, saved, tmp_path):
    guard, _, _ = _resume(make_trainer, _edited(saved, tmp_path, _negative))
    data = guard.report().to_dict()
    assert data["steps"] == N_BATCHES
    assert all(value >= 0 for p in data["params"].values() for value in p.values() if isinstance(value, int))


def test_an_unusable_state_does_not_turn_strict_mode_off(make_trainer, saved, tmp_path):
    from lightning_gradguard import GradGuardError

    with pytest.raises(GradGuardError) as info:
        _resume(make_trainer, _edited(saved, tmp_path, _bad_values), strict=True)
    assert info.value.step == N_BATCHES  # the first step of the resumed fit
    assert info.value.params == ["unused.weight", "unused.bias"]


def test_a_usable_state_still_continues_the_counts(make_trainer, saved, tmp_path):
    guard, _, said = _resume(make_trainer, _edited(saved, tmp_path, _good))
    assert not [w for w in said if "checkpoint" in w]
    assert guard.report().steps == 2 * N_BATCHES
    assert guard.report().params["unused.weight"].none_steps == 2 * N_BATCHES
