"""What GradGuard writes: TensorBoard event files, CSV metrics, gradguard.json and the console summary.

Event files are read back with TensorBoard's own ``EventAccumulator``; logged norms are compared with norms
computed independently from ``p.grad`` by a callback that runs after GradGuard in the same hook.
"""

from __future__ import annotations

import csv
import math
import os
import warnings

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from models import HealthyMLP, ManualGAN, UnusedLayerMLP, gradguard_warnings, regression_loader
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_gradguard import GradGuard, GradReport

USED = ("l1.weight", "l1.bias", "l2.weight", "l2.bias")


class GradNormRecorder(Callback):
    """Placed after GradGuard: the norm of every gradient at every optimizer step, keyed by Lightning's step."""

    def __init__(self, norm_type: float = 2.0) -> None:
        self.norm_type = norm_type
        self.norms: dict[int, dict[str, float]] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        step = trainer.fit_loop.epoch_loop._batches_that_stepped  # the step Lightning's loggers write at
        self.norms[step] = {
            name: torch.linalg.vector_norm(p.grad, self.norm_type).item()
            for name, p in pl_module.named_parameters()
            if p.grad is not None
        }


def read_scalars(log_dir: str) -> dict[str, list[tuple[int, float]]]:
    accumulator = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def read_csv_metrics(log_dir: str) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    with open(os.path.join(log_dir, "metrics.csv"), newline="") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key != "step" and value != "":
                    series.setdefault(key, []).append((int(row["step"]), float(value)))
    return series


@pytest.fixture
def logged_run(make_trainer, tmp_path):
    """UnusedLayerMLP, 8 batches, Trainer(log_every_n_steps=2), TensorBoard and CSV loggers side by side."""
    guard = GradGuard(summary=False)
    recorder = GradNormRecorder()
    tensorboard = TensorBoardLogger(str(tmp_path), name="tb")
    csv_logger = CSVLogger(str(tmp_path), name="csv")
    trainer = make_trainer(callbacks=[guard, recorder], logger=[tensorboard, csv_logger], log_every_n_steps=2)
    with pytest.warns(UserWarning, match="GradGuard"):
        trainer.fit(UnusedLayerMLP(log_loss=True), regression_loader(8))
    return guard, recorder, trainer, read_scalars(tensorboard.log_dir), read_csv_metrics(csv_logger.log_dir)


def test_tensorboard_has_the_expected_tags_at_lightnings_steps(logged_run):
    _, _, _, scalars, _ = logged_run
    log_steps = [1, 3, 5, 7]  # (step + 1) % 2 == 0, as Lightning's own metrics
    assert [s for s, _ in scalars["train_loss"]] == log_steps
    expected = {
        "gradguard/total_norm",
        "gradguard/none_params",
        "gradguard/nonfinite_params",
        "gradguard/intermittent_params",
        "gradguard/zero_params",
        *(f"gradguard/norm/{name}" for name in USED),
        "gradguard/none_steps/unused.weight",
        "gradguard/none_steps/unused.bias",
    }
    assert expected <= set(scalars)
    guard_tags = {tag for tag in scalars if tag.startswith("gradguard/")}
    assert guard_tags == expected  # no norm series for parameters without a gradient, none_steps only for those
    for tag in expected:
        assert [s for s, _ in scalars[tag]] == log_steps, tag
    assert [v for _, v in scalars["gradguard/none_params"]] == [2.0] * 4
    assert [v for _, v in scalars["gradguard/nonfinite_params"]] == [0.0] * 4
    assert [v for _, v in scalars["gradguard/zero_params"]] == [0.0] * 4
    assert [v for _, v in scalars["gradguard/none_steps/unused.weight"]] == [2.0, 4.0, 6.0, 8.0]


def test_logged_norms_equal_independently_computed_norms(logged_run):
    _, recorder, _, scalars, _ = logged_run
    for step in (1, 3, 5, 7):
        truth = recorder.norms[step]
        assert set(truth) == set(USED)
        for name in USED:
            logged = dict(scalars[f"gradguard/norm/{name}"])[step]
            assert logged == pytest.approx(truth[name], rel=1e-5, abs=1e-6), (name, step)
        total = math.sqrt(sum(v**2 for v in truth.values()))
        assert dict(scalars["gradguard/total_norm"])[step] == pytest.approx(total, rel=1e-5)


def test_csv_logger_gets_the_same_metrics(logged_run):
    _, _, _, scalars, csv_series = logged_run
    guard_tags = sorted(tag for tag in scalars if tag.startswith("gradguard/"))
    assert sorted(tag for tag in csv_series if tag.startswith("gradguard/")) == guard_tags
    for tag in guard_tags:
        tb = scalars[tag]
        rows = csv_series[tag]
        assert [s for s, _ in rows] == [s for s, _ in tb], tag
        # TensorBoard stores float32, the CSV the float itself
        assert [v for _, v in rows] == pytest.approx([v for _, v in tb], rel=1e-6), tag


def test_report_json_lands_in_the_log_dir_and_round_trips(logged_run, tmp_path):
    guard, _, trainer, _, _ = logged_run
    path = os.path.join(trainer.log_dir, "gradguard.json")
    assert trainer.log_dir == os.path.join(str(tmp_path), "tb", "version_0")
    assert guard.report_path == path
    assert os.path.isfile(path)
    loaded = GradReport.load(path)
    assert loaded.to_dict() == guard.report().to_dict()
    assert loaded.missing == ["unused.weight", "unused.bias"]
    assert loaded.params["unused.weight"].none_steps == 8


def test_report_dict_schema(logged_run):
    guard, _, _, _, _ = logged_run
    data = guard.report().to_dict()
    assert set(data) == {"steps", "micro_batches", "params", "findings"}
    assert (data["steps"], data["micro_batches"]) == (8, 8)
    assert isinstance(data["findings"], list)
    for entry in data["params"].values():
        assert set(entry) == {
            "steps", "none_steps", "micro_batches", "none_micro_batches", "measured_steps", "nonfinite_steps",
            "zero_steps", "update_steps", "zero_lr_steps", "version_steps", "untouched_steps", "cause", "detail",
        }
    assert data["params"]["l1.weight"] == {
        "steps": 8, "none_steps": 0, "micro_batches": 8, "none_micro_batches": 0, "measured_steps": 8,
        "nonfinite_steps": 0, "zero_steps": 0, "update_steps": 8, "zero_lr_steps": 0, "version_steps": 2,
        "untouched_steps": 0, "cause": None, "detail": None,
    }
    assert GradReport.from_dict(data).to_dict() == data


def test_own_log_every_n_steps_overrides_the_trainers(make_trainer, tmp_path):
    guard = GradGuard(log_every_n_steps=3, summary=False)
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = make_trainer(callbacks=[guard], logger=logger, log_every_n_steps=1)
    trainer.fit(HealthyMLP(log_loss=True), regression_loader(9))
    scalars = read_scalars(logger.log_dir)
    assert [s for s, _ in scalars["train_loss"]] == list(range(9))
    assert [s for s, _ in scalars["gradguard/total_norm"]] == [2, 5, 8]
    assert "gradguard/none_steps/l1.weight" not in scalars  # a healthy parameter adds no None series


def test_inf_norm_is_the_largest_absolute_gradient(make_trainer, tmp_path):
    guard = GradGuard(norm_type="inf", summary=False)
    recorder = GradNormRecorder(norm_type=math.inf)
    logger = CSVLogger(str(tmp_path), name="csv")
    trainer = make_trainer(callbacks=[guard, recorder], logger=logger, log_every_n_steps=1)
    trainer.fit(HealthyMLP(), regression_loader(3))
    series = read_csv_metrics(logger.log_dir)
    for step in range(3):
        truth = recorder.norms[step]
        for name, value in truth.items():
            assert dict(series[f"gradguard/norm/{name}"])[step] == pytest.approx(value, rel=1e-6)
        assert dict(series["gradguard/total_norm"])[step] == pytest.approx(max(truth.values()), rel=1e-6)


def test_logged_norms_see_unclipped_gradients(make_trainer, tmp_path):
    """GradGuard logs the gradient the backward produced, before Lightning's gradient clipping."""
    guard = GradGuard(summary=False)
    recorder = GradNormRecorder()
    logger = CSVLogger(str(tmp_path), name="csv")
    trainer = make_trainer(
        callbacks=[guard, recorder], logger=logger, log_every_n_steps=1, gradient_clip_val=1e-3,
    )
    trainer.fit(HealthyMLP(), regression_loader(2))
    series = read_csv_metrics(logger.log_dir)
    total = math.sqrt(sum(v**2 for v in recorder.norms[0].values()))
    assert total > 1e-2
    assert dict(series["gradguard/total_norm"])[0] == pytest.approx(total, rel=1e-5)


def test_no_logger_no_json_and_nothing_breaks(make_trainer):
    guard = GradGuard(summary=False)
    with pytest.warns(UserWarning, match="GradGuard"):
        make_trainer(callbacks=[guard], logger=False).fit(UnusedLayerMLP(), regression_loader(3))
    assert guard.report_path is None
    assert guard.report().missing == ["unused.weight", "unused.bias"]


# ------------------------------------------------------------ console
def test_console_summary_is_one_line_for_a_healthy_model(make_trainer, capsys):
    trainer = make_trainer(callbacks=[GradGuard()], max_epochs=2)
    trainer.fit(HealthyMLP(), regression_loader(20, batch_size=1))
    out = capsys.readouterr().out
    line = "GradGuard: all 6 trainable parameters received a gradient at each of 40 optimizer steps"
    assert line in out.splitlines()
    assert out.count("GradGuard") == 1


def test_console_summary_with_two_optimizers_counts_each_parameters_own_steps(make_trainer, capsys):
    guard = GradGuard()
    make_trainer(callbacks=[guard]).fit(ManualGAN(toggle=True), regression_loader(3))
    out = capsys.readouterr().out
    # 3 batches x (generator step + discriminator step): each parameter was checked at 3 of the 6 steps
    assert guard.report().steps == 6
    assert {p.steps for p in guard.report().params.values()} == {3}
    assert "received a gradient at every optimizer step that updated it (6 optimizer steps in all)" in out


def test_console_summary_is_a_table_when_something_is_missing(make_trainer, capsys):
    with pytest.warns(UserWarning, match="GradGuard"):
        make_trainer(callbacks=[GradGuard()]).fit(UnusedLayerMLP(), regression_loader(4))
    out = capsys.readouterr().out
    assert "GradGuard: 4 optimizer steps, 4 backward passes; 2 of 6 parameters missed a gradient" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("unused.")]
    assert [row[:3] for row in rows] == [["unused.weight", "4/4", "4/4"], ["unused.bias", "4/4", "4/4"]]
    assert "l1.weight" not in out


def test_summary_false_prints_nothing(make_trainer, capsys):
    make_trainer(callbacks=[GradGuard(summary=False)]).fit(HealthyMLP(), regression_loader(2))
    assert "GradGuard" not in capsys.readouterr().out


# ------------------------------------------------------------ the guard's own failures
@pytest.mark.internal_error
def test_internal_failure_in_logging_is_reported_once_and_training_completes(make_trainer, tmp_path, monkeypatch):
    import lightning_gradguard.output.reporter as reporter_module

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(reporter_module, "StagedMetrics", broken)
    guard = GradGuard(summary=False)
    trainer = make_trainer(callbacks=[guard], logger=CSVLogger(str(tmp_path)), log_every_n_steps=1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(UnusedLayerMLP(), regression_loader(6))

    internal = [m for m in gradguard_warnings(record) if "internal error" in m]
    assert len(internal) == 1
    assert "'log'" in internal[0] and "RuntimeError: boom" in internal[0]
    assert trainer.global_step == 6
    # checking is a separate feature: it kept working
    assert guard.report().params["unused.weight"].none_steps == 6


@pytest.mark.internal_error
def test_internal_failure_in_checking_is_reported_once_and_training_completes(make_trainer, monkeypatch):
    from lightning_gradguard.core.engine import GradGuardEngine

    def broken(self, *args, **kwargs):
        raise ValueError("engine bug")

    monkeypatch.setattr(GradGuardEngine, "check_step", broken)
    model = HealthyMLP()
    before = model.l1.weight.detach().clone()
    guard = GradGuard(strict=True, summary=False)
    trainer = make_trainer(callbacks=[guard])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(model, regression_loader(5))

    internal = [m for m in gradguard_warnings(record) if "internal error" in m]
    assert len(internal) == 1
    assert "'check'" in internal[0] and "ValueError: engine bug" in internal[0]
    assert trainer.global_step == 5
    assert not torch.equal(before, model.l1.weight)  # the run really trained
