"""Logging stays readable for big models: a bounded number of series per step, module aggregates, top-k names."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.loggers import TensorBoardLogger
from models import regression_loader
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from lightning_gradguard import GradGuard, GradGuardEngine, GuardConfig
from lightning_gradguard.output.metrics import RESERVED_SERIES, LogLayout, step_metrics


class ManyLayers(LightningModule):
    """``blocks`` blocks of ``per_block`` tiny Linear layers (2 tensors each), plus ``unused`` blocks never called."""

    def __init__(self, blocks: int, per_block: int, unused: int = 0) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(*(nn.Linear(4, 4) for _ in range(per_block))) for _ in range(blocks))
        self.spare = nn.ModuleList(nn.Sequential(nn.Linear(4, 4)) for _ in range(unused))
        self.norms: dict[int, dict[str, float]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x)[:, :1], y)

    def on_before_optimizer_step(self, optimizer) -> None:  # after GradGuard's hook: the gradients it measured
        step = self.trainer.fit_loop.epoch_loop._batches_that_stepped
        self.norms[step] = {n: torch.linalg.vector_norm(p.grad).item() for n, p in self.named_parameters()
                            if p.grad is not None}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def scalars_by_step(log_dir: str) -> dict[int, dict[str, float]]:
    accumulator = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    accumulator.Reload()
    steps: dict[int, dict[str, float]] = {}
    for tag in accumulator.Tags()["scalars"]:
        for event in accumulator.Scalars(tag):
            steps.setdefault(event.step, {})[tag] = event.value
    return steps


def test_ten_thousand_tensors_write_at_most_max_logged_series_per_step(make_trainer, tmp_path):
    torch.manual_seed(0)
    model = ManyLayers(blocks=250, per_block=20, unused=100)  # 10,000 used tensors + 200 never used
    assert len(list(model.parameters())) == 10_200
    logger = TensorBoardLogger(str(tmp_path), name="big")
    guard = GradGuard(summary=False)
    trainer = make_trainer(callbacks=[guard], logger=logger, log_every_n_steps=1, max_steps=2)
    with pytest.warns(UserWarning, match="GradGuard"):
        trainer.fit(model, regression_loader(2))
    steps = scalars_by_step(logger.log_dir)
    assert sorted(steps) == [0, 1]
    for step, metrics in steps.items():
        assert len(metrics) <= 256
        kinds = Counter(tag.split("/")[1] for tag in metrics)
        # depth 2 has 350 modules, more than fit: depth 1, where `spare` has no gradient and so no norm series
        assert kinds["module_norm"] == 1
        assert kinds["norm"] == 16
        assert kinds["none_steps"] == 256 // 8  # 200 parameters missing, the series capped
        assert metrics["gradguard/none_params"] == 200
        # the named parameters are the 16 largest gradients at that step, and their values are theirs
        expected = model.norms[step]
        prefix = "gradguard/norm/"
        named = {tag[len(prefix):]: v for tag, v in metrics.items() if tag.startswith(prefix)}
        largest = sorted(expected, key=expected.get, reverse=True)[:16]
        assert set(named) == set(largest)
        for name, value in named.items():
            assert value == pytest.approx(expected[name], rel=1e-5)
        blocks = math.sqrt(sum(v**2 for n, v in expected.items() if n.startswith("blocks.")))
        assert metrics["gradguard/module_norm/blocks"] == pytest.approx(blocks, rel=1e-5)
        assert metrics["gradguard/total_norm"] == pytest.approx(blocks, rel=1e-5)


def run_engine_step(model: nn.Module, config: GuardConfig, poison: str = ""):
    """One measured step of a plain loop; ``poison`` names a parameter whose gradient gets a NaN."""
    engine = GradGuardEngine(config, warn=lambda message: None)
    engine.bind(model.named_parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    engine.start_micro_batch()
    loss = model(torch.randn(2, 4)).square().mean()
    engine.before_backward(loss)
    loss.backward()
    engine.after_backward()
    if poison:
        dict(model.named_parameters())[poison].grad[0] = float("nan")
    return engine, engine.check_step(optimizer, step=0, measure=True)


def test_small_models_log_every_parameter_and_big_ones_aggregate():
    budget = 64
    fit = budget - RESERVED_SERIES - budget // 8  # 48 tensors: their norms, 8 none_steps and 8 scalars fit
    small = ManyLayers(blocks=4, per_block=fit // 8)
    names = [n for n, _ in small.named_parameters()]
    assert len(names) == fit
    layout = LogLayout(names, "auto", budget, None)
    assert layout.per_param and layout.none_cap == budget // 8 and layout.top_k == 0
    big_names = names + ["extra.weight"]
    layout = LogLayout(big_names, "auto", budget, None)
    assert not layout.per_param and layout.top_k == budget // 16 and layout.none_cap == budget // 8
    # room for 64 - 8 - 8 - 4 = 44 modules: depth 3 (one per layer, 25) fits
    assert layout.modules == [f"blocks.{b}.{i}" for b in range(4) for i in range(6)] + ["extra"]
    asked = LogLayout(big_names, "param", budget, None)
    assert asked.per_param and asked.none_cap is None  # asked for: every tensor, no cap
    explicit = LogLayout(big_names, "module", budget, 1)
    assert explicit.modules == ["blocks", "extra"] and explicit.top_k == 0 and explicit.none_cap == budget // 8


def test_explicit_param_granularity_logs_every_tensor_beyond_the_budget():
    torch.manual_seed(0)
    model = ManyLayers(blocks=2, per_block=20)  # 80 tensors
    engine, check = run_engine_step(model, GuardConfig.create(log_granularity="param", max_logged_series=16))
    metrics = step_metrics(engine, [check])
    assert sum(tag.startswith("gradguard/norm/") for tag in metrics) == 80


def test_a_nan_gradient_is_always_among_the_named_parameters():
    torch.manual_seed(0)
    model = ManyLayers(blocks=3, per_block=20)  # 120 tensors > 64 - RESERVED: aggregates + top 4
    engine, check = run_engine_step(model, GuardConfig.create(max_logged_series=64), poison="blocks.1.7.bias")
    metrics = step_metrics(engine, [check])
    named = [tag for tag in metrics if tag.startswith("gradguard/norm/")]
    assert len(named) == 4 and "gradguard/norm/blocks.1.7.bias" in named
    assert math.isnan(metrics["gradguard/norm/blocks.1.7.bias"])
    assert math.isnan(metrics["gradguard/module_norm/blocks.1"]) and math.isnan(metrics["gradguard/total_norm"])
    assert math.isfinite(metrics["gradguard/module_norm/blocks.0"])
    assert metrics["gradguard/nonfinite_params"] == 1
    assert len(metrics) <= 64


@pytest.mark.parametrize("norm_type", [1.0, 3.0, math.inf])
def test_module_norms_are_the_norm_of_their_parameters_norms(norm_type):
    torch.manual_seed(0)
    model = ManyLayers(blocks=3, per_block=20)
    engine, check = run_engine_step(model, GuardConfig.create(max_logged_series=64, norm_type=norm_type))
    metrics = step_metrics(engine, [check])
    for block in range(3):
        norms = [torch.linalg.vector_norm(p.grad, norm_type).item()
                 for n, p in model.named_parameters() if n.startswith(f"blocks.{block}.")]
        expected = max(norms) if math.isinf(norm_type) else sum(v**norm_type for v in norms) ** (1 / norm_type)
        assert metrics[f"gradguard/module_norm/blocks.{block}"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("prefix", ["", "run1"])
def test_tensorboard_reads_back_every_scalar_of_a_step(make_trainer, tmp_path, prefix):
    """All of a step's scalars go into one TensorBoard event (or through log_metrics when the logger adds a
    prefix); TensorBoard's reader sees the same tags and values either way."""
    from models import HealthyMLP

    logger = TensorBoardLogger(str(tmp_path), name="tb", prefix=prefix)
    model = HealthyMLP()
    trainer = make_trainer(callbacks=[GradGuard(summary=False)], logger=logger, log_every_n_steps=2)
    trainer.fit(model, regression_loader(4))
    steps = scalars_by_step(logger.log_dir)
    join = f"{prefix}-" if prefix else ""
    assert sorted(steps) == [1, 3]
    for metrics in steps.values():
        assert {tag for tag in metrics} >= {f"{join}gradguard/{name}" for name in
                                            ("total_norm", "none_params", "norm/l1.weight", "norm/l2.bias")}
        assert metrics[f"{join}gradguard/none_params"] == 0
