"""Strict mode, allow_none, warnings once per parameter, and argument validation."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from lightning.pytorch import Callback, LightningModule
from models import IN_DIM, IntermittentBranchMLP, UnusedLayerMLP, gradguard_warnings, regression_loader
from torch import nn

from lightning_gradguard import GradGuard, GradGuardError, GradReport


class WeightSnapshots(Callback):
    """The model's weights after every completed optimizer step (and before the first)."""

    def __init__(self) -> None:
        self.snapshots: list[dict[str, torch.Tensor]] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.snapshots.append(copy.deepcopy(pl_module.state_dict()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.snapshots.append(copy.deepcopy(pl_module.state_dict()))


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ------------------------------------------------------------ strict
def test_strict_raises_at_the_first_step_before_any_weight_changes(make_trainer):
    model = UnusedLayerMLP()
    before = copy.deepcopy(model.state_dict())
    guard = GradGuard(strict=True, summary=False)
    trainer = make_trainer(callbacks=[guard], accumulate_grad_batches=2)

    with pytest.raises(GradGuardError) as info:
        trainer.fit(model, regression_loader(6))

    err = info.value
    assert isinstance(err, RuntimeError)
    assert err.params == ["unused.weight", "unused.bias"]
    assert err.step == 0
    assert isinstance(err.report, GradReport)
    assert err.report.missing == ["unused.weight", "unused.bias"]
    assert err.report.params["unused.weight"].none_steps == 1
    assert err.report.params["unused.weight"].micro_batches == 2
    message = str(err)
    assert "global step 0" in message
    assert "2 micro-batches in this window" in message
    assert "accumulate_grad_batches=2" in message
    assert "  unused:\n    unused.weight" in message  # grouped by module
    assert "unused.bias" in message
    assert "l1.weight" not in message
    assert trainer.global_step == 0
    assert_same_weights(model.state_dict(), before)


def test_strict_raises_at_a_later_step_and_that_step_changes_nothing(make_trainer):
    # the branch runs on batches 0..2 only: step 3 is the first without a gradient for it
    model = IntermittentBranchMLP(branch_batches={0, 1, 2})
    snapshots = WeightSnapshots()
    trainer = make_trainer(callbacks=[GradGuard(strict=True, summary=False), snapshots])

    with pytest.raises(GradGuardError, match="global step 3") as info:
        trainer.fit(model, regression_loader(8))

    assert info.value.step == 3
    assert info.value.params == ["branch.weight", "branch.bias"]
    assert info.value.report.steps == 4
    assert len(snapshots.snapshots) == 4  # initial weights + three completed steps
    assert_same_weights(model.state_dict(), snapshots.snapshots[-1])
    # and the weights did change at the steps before: the guard stopped a real optimizer, not an idle one
    assert not torch.equal(snapshots.snapshots[0]["trunk.weight"], snapshots.snapshots[-1]["trunk.weight"])


def test_strict_message_names_the_cause_and_fix_when_known(make_trainer):
    from models import SkipBatchesMLP

    with pytest.raises(GradGuardError) as info:  # the first batch returns no loss: the run has not trained at all
        make_trainer(callbacks=[GradGuard(strict=True, summary=False)]).fit(
            SkipBatchesMLP(skip_batches={0}), regression_loader(3)
        )
    message = str(info.value)
    assert "[no_backward]" in message
    assert "fix: run a backward pass on a loss computed from the model" in message
    assert "return the loss from training_step, or call manual_backward" in message
    assert len(info.value.params) == 6


def test_strict_does_not_raise_for_a_healthy_or_intermittent_model(make_trainer):
    guard = GradGuard(strict=True, summary=False)
    trainer = make_trainer(callbacks=[guard], accumulate_grad_batches=4)
    trainer.fit(IntermittentBranchMLP(branch_every=4), regression_loader(8))
    assert trainer.global_step == 2
    assert guard.report().intermittent == ["branch.weight", "branch.bias"]


# ------------------------------------------------------------ allow_none
def test_allow_none_silences_exactly_the_matched_parameters(make_trainer):
    guard = GradGuard(allow_none=["unused.weight"], summary=False)
    with pytest.warns(UserWarning, match="GradGuard") as record:
        make_trainer(callbacks=[guard]).fit(UnusedLayerMLP(), regression_loader(4))

    report = guard.report()
    assert report.missing == ["unused.bias"]
    assert "unused.weight" not in report.params
    assert report.params["unused.bias"].none_steps == 4
    messages = gradguard_warnings(record)
    assert len(messages) == 1
    assert "unused.bias" in messages[0] and "unused.weight" not in messages[0]


@pytest.mark.parametrize("patterns", ["unused.*", ["unused.*"], ("unused.weight", "unused.bias"), ["*unused*"]])
def test_allow_none_patterns_make_strict_mode_pass(make_trainer, patterns):
    guard = GradGuard(strict=True, allow_none=patterns, summary=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        make_trainer(callbacks=[guard]).fit(UnusedLayerMLP(), regression_loader(4))

    report = guard.report()
    assert gradguard_warnings(record) == []
    assert report.missing == []
    assert sorted(report.params) == ["l1.bias", "l1.weight", "l2.bias", "l2.weight"]
    assert report.ok


def test_allow_none_is_case_sensitive_fnmatch(make_trainer):
    guard = GradGuard(allow_none=["UNUSED.*"], summary=False)
    with pytest.warns(UserWarning, match="GradGuard"):
        make_trainer(callbacks=[guard]).fit(UnusedLayerMLP(), regression_loader(2))
    assert guard.report().missing == ["unused.weight", "unused.bias"]


# ------------------------------------------------------------ warnings
def test_non_strict_warns_once_per_parameter(make_trainer):
    # `unused` misses from step 0; the branch (batches 0..2 only) from step 3; both keep missing until step 7
    model = IntermittentBranchMLP(branch_batches={0, 1, 2}, with_unused=True)
    guard = GradGuard(summary=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        make_trainer(callbacks=[guard], max_epochs=2).fit(model, regression_loader(8))

    messages = gradguard_warnings(record)
    assert len(messages) == 2
    assert "global step 0" in messages[0] and "unused.weight" in messages[0] and "branch" not in messages[0]
    assert "global step 3" in messages[1] and "branch.weight" in messages[1] and "unused" not in messages[1]
    for name in ("unused.weight", "unused.bias", "branch.weight", "branch.bias"):
        assert sum(name in m for m in messages) == 1
    report = guard.report()
    assert report.params["unused.weight"].none_steps == 16
    assert report.params["branch.weight"].none_steps == 10  # batches 3..7 of both epochs


# ------------------------------------------------------------ bad arguments
@pytest.mark.parametrize(
    ("kwargs", "error", "argument"),
    [
        ({"norm_type": 0}, ValueError, "norm_type"),
        ({"norm_type": -2.0}, ValueError, "norm_type"),
        ({"norm_type": float("nan")}, ValueError, "norm_type"),
        ({"norm_type": "two"}, ValueError, "norm_type"),
        ({"norm_type": None}, TypeError, "norm_type"),
        ({"norm_type": True}, TypeError, "norm_type"),
        ({"log_every_n_steps": 0}, ValueError, "log_every_n_steps"),
        ({"log_every_n_steps": -5}, ValueError, "log_every_n_steps"),
        ({"log_every_n_steps": 2.5}, TypeError, "log_every_n_steps"),
        ({"log_every_n_steps": "10"}, TypeError, "log_every_n_steps"),
        ({"allow_none": [1]}, TypeError, "allow_none"),
        ({"allow_none": ["head.*", None]}, TypeError, "allow_none"),
        ({"allow_none": 3}, TypeError, "allow_none"),
        ({"strict": "yes"}, TypeError, "strict"),
        ({"strict": 1}, TypeError, "strict"),
        ({"summary": "no"}, TypeError, "summary"),
        ({"nonfinite_check": "always"}, ValueError, "nonfinite_check"),
        ({"log_granularity": "layer"}, ValueError, "log_granularity"),
        ({"max_logged_series": 0}, ValueError, "max_logged_series"),
        ({"log_module_depth": 0}, ValueError, "log_module_depth"),
        ({"stirct": True}, TypeError, "stirct"),
        ({"name": "gen\n"}, ValueError, "name"),  # a newline in a tag and a file name
        ({"name": "../up"}, ValueError, "name"),
        ({"name": ".."}, ValueError, "name"),
        ({"name": "g" * 101}, ValueError, "name"),  # gradguard-<name>.json must fit a file name
        ({"name": 3}, TypeError, "name"),
    ],
)
def test_every_bad_argument_fails_at_construction_naming_it(kwargs, error, argument):
    with pytest.raises(error, match=argument):
        GradGuard(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "accepted"),
    [
        ({"norm_type": 0}, ValueError, "positive float or 'inf'"),
        ({"log_every_n_steps": 0}, ValueError, "positive int or None"),
        ({"allow_none": [1]}, TypeError, "pattern strings"),
        ({"strict": "yes"}, TypeError, "True or False"),
    ],
)
def test_bad_argument_messages_say_what_is_accepted(kwargs, error, accepted):
    with pytest.raises(error, match=accepted):
        GradGuard(**kwargs)


@pytest.mark.parametrize(
    ("norm_type", "expected"), [("inf", math.inf), ("INF", math.inf), (math.inf, math.inf), (1, 1.0), (0.5, 0.5)]
)
def test_accepted_norm_types(norm_type, expected):
    assert GradGuard(norm_type=norm_type).config.norm_type == expected


@pytest.mark.parametrize("name", ["gen", "critic-2", "stage_1.ema", "g" * 100])
def test_accepted_names(name):
    assert GradGuard(name=name).config.name == name


def test_accepted_allow_none_forms():
    assert GradGuard(allow_none="head.*").config.allow_none == ("head.*",)
    assert GradGuard(allow_none=["a", "b"]).config.allow_none == ("a", "b")
    assert GradGuard(allow_none=(p for p in ["x.*"])).config.allow_none == ("x.*",)
    assert GradGuard(log_every_n_steps=None).config.log_every_n_steps is None


def test_numpy_scalars_are_accepted_where_numbers_are():
    np = pytest.importorskip("numpy")
    guard = GradGuard(norm_type=np.float32(1.0), log_every_n_steps=np.int64(5))
    assert guard.config.norm_type == 1.0 and guard.config.log_every_n_steps == 5


def test_strict_error_survives_pickling(make_trainer):
    """Launchers and multiprocessing pickle exceptions; the attributes must survive the trip."""
    import pickle

    with pytest.raises(GradGuardError) as info:
        make_trainer(callbacks=[GradGuard(strict=True, summary=False)]).fit(UnusedLayerMLP(), regression_loader(2))
    copy_ = pickle.loads(pickle.dumps(info.value))
    assert str(copy_) == str(info.value)
    assert copy_.params == ["unused.weight", "unused.bias"]
    assert copy_.step == 0
    assert copy_.report.to_dict() == info.value.report.to_dict()


def test_message_for_a_big_model_names_each_explanation_once(make_trainer):
    """Hundreds of parameters without a gradient: one line per explanation, every name in `.params`."""

    class ManyUnused(LightningModule):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(IN_DIM, 1)
            self.unused = nn.ModuleList(nn.Linear(2, 2) for _ in range(30))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self.used(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(GradGuardError) as info:
        make_trainer(callbacks=[GradGuard(strict=True)]).fit(ManyUnused(), regression_loader(2))
    error = info.value
    assert len(error.params) == 60
    message = str(error)
    # 30 modules, each with its own "defined at" explanation: the first 20 shown, the rest summarized
    assert message.count("[unused]") == 20
    assert "... and 20 more parameters with 10 other explanations" in message
    assert len(message.splitlines()) < 50


def test_warnings_have_their_own_category_that_users_can_filter(make_trainer):
    from lightning_gradguard import GradGuardWarning

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        make_trainer(callbacks=[GradGuard(summary=False)]).fit(UnusedLayerMLP(), regression_loader(2))
    ours = [w for w in record if "GradGuard" in str(w.message)]
    assert ours and all(issubclass(w.category, GradGuardWarning) for w in ours)
    with warnings.catch_warnings():
        warnings.simplefilter("error", category=GradGuardWarning)
        with pytest.raises(GradGuardWarning, match="unused.weight"):
            make_trainer(callbacks=[GradGuard(summary=False)]).fit(UnusedLayerMLP(), regression_loader(2))
