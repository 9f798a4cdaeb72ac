"""GradGuard with the older ``pytorch_lightning`` package: ``import pytorch_lightning as pl; pl.Trainer(...)``."""

from __future__ import annotations

import importlib.util
import json
import os
import warnings

import pytest

pl = pytest.importorskip("pytorch_lightning")

import lightning.pytorch  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from plain_models import PLANTED, USED, PlantedNet  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_gradguard.pl import GradGuard  # noqa: E402

DIAGNOSIS = importlib.util.find_spec("lightning_gradguard.core.diagnosis") is not None


class PlantedModule(pl.LightningModule):
    """A ``pytorch_lightning`` module around :class:`PlantedNet`: an unused layer and a detached side path."""

    def __init__(self) -> None:
        super().__init__()
        self.net = PlantedNet()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def loader(n_batches: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_batches * 2, 4, generator=g)
    y = torch.randn(n_batches * 2, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=2)


def pl_trainer(tmp_path, **kwargs) -> pl.Trainer:
    options = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    options.update(kwargs)
    return pl.Trainer(**options)


@pytest.fixture(autouse=True)
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def test_is_a_callback_of_both_namespaces():
    guard = GradGuard()
    assert isinstance(guard, pl.Callback)
    assert isinstance(guard, lightning.pytorch.Callback)


@pytest.mark.parametrize("as_list", [True, False])
def test_pl_trainer_names_unused_and_detached_parameters(tmp_path, as_list):
    guard = GradGuard(summary=False)
    trainer = pl_trainer(tmp_path, callbacks=[guard] if as_list else guard, accumulate_grad_batches=2)
    trainer.fit(PlantedModule(), loader(6))
    # pytorch_lightning's own hook stubs are recognized: nothing runs between backward and step here
    assert guard.engine.reuse_backward_read
    report = guard.report()
    assert (report.steps, report.micro_batches) == (3, 6)
    planted = {f"net.{n}" for n in PLANTED}
    assert set(report.missing) == planted
    params = report.to_dict()["params"]
    for name in planted:
        assert (params[name]["none_steps"], params[name]["none_micro_batches"]) == (3, 6)
    for name in USED:
        assert params[f"net.{name}"]["none_micro_batches"] == 0
    if DIAGNOSIS:
        assert params["net.unused.weight"]["cause"] == "unused"
        assert params["net.side.weight"]["cause"] == "detached"


def test_strict_mode_under_pl_trainer(tmp_path):
    from lightning_gradguard import GradGuardError

    module = PlantedModule()
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    with pytest.raises(GradGuardError) as info:
        pl_trainer(tmp_path, callbacks=[GradGuard(strict=True, summary=False)]).fit(module, loader(2))
    assert set(info.value.params) == {f"net.{n}" for n in PLANTED}
    assert all(torch.equal(p, before[n]) for n, p in module.named_parameters())


def test_pl_tensorboard_logger_gets_scalars_dashboard_and_report(tmp_path):
    logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="run")
    guard = GradGuard(summary=False)
    trainer = pl_trainer(tmp_path, callbacks=[guard], logger=logger, log_every_n_steps=1)
    trainer.fit(PlantedModule(), loader(3))
    acc = EventAccumulator(logger.log_dir, size_guidance={"tensors": 0})
    acc.Reload()
    assert "gradguard/none_steps/net.unused.bias" in acc.Tags()["scalars"]
    assert "custom_scalars__config__" in acc.Tags()["tensors"]
    assert [t.step for t in acc.Tensors("gradguard/report/text_summary")] == [0, 3]
    with open(os.path.join(logger.log_dir, "gradguard.json")) as f:
        assert json.load(f) == guard.report().to_dict()


def test_checkpoint_resume_continues_counts(tmp_path):
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    first = GradGuard(summary=False)
    pl_trainer(tmp_path, callbacks=[first, checkpoint], enable_checkpointing=True, max_epochs=1).fit(
        PlantedModule(), loader(3)
    )
    assert first.report().steps == 3
    second = GradGuard(summary=False)
    pl_trainer(tmp_path, callbacks=[second], enable_checkpointing=True, max_epochs=2).fit(
        PlantedModule(), loader(3), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
    )
    report = second.report()
    assert report.steps == 6
    assert report.params["net.unused.weight"].none_steps == 6
