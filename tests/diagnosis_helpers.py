"""Shared pieces of the diagnosis tests: tiny data, a fit helper, and where a planted statement sits.

Expected source locations are never hard-coded: :func:`planted_at` finds the line of a marker text in the source
of the function that contains it, with ``inspect``, so editing a test model never silently breaks the check.
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Callable

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BaseFinetuning
from models import quiet_trainer_options
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import GradGuard, GradReport

IN_DIM, HIDDEN, VOCAB, SEQ = 4, 8, 11, 5


def regression_data(n_batches: int = 3, batch_size: int = 2, shape: tuple[int, ...] = (IN_DIM,)) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_batches * batch_size, *shape, generator=g)
    y = torch.randn(n_batches * batch_size, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def token_data(n_batches: int = 3, batch_size: int = 2, seq: int = SEQ) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (n_batches * batch_size, seq), generator=g)
    tokens[:, -1] = 0  # padding at the end of every sequence
    labels = torch.randint(0, 2, (n_batches * batch_size,), generator=g)
    return DataLoader(TensorDataset(tokens, labels), batch_size=batch_size)


class Regression(LightningModule):
    """MSE of ``self(x)`` against ``y``; SGD over every parameter."""

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class Classification(LightningModule):
    """Cross-entropy of ``self(tokens)`` (``(batch, 2)`` logits) against the labels."""

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        tokens, labels = batch
        return F.cross_entropy(self(tokens), labels)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class Finetuned(Regression):
    """A backbone with a BatchNorm layer, frozen at first (see :class:`UnfreezeAt`), and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(IN_DIM, HIDDEN), nn.BatchNorm1d(HIDDEN), nn.ReLU())
        self.head = nn.Linear(HIDDEN, 1)

    def forward(self, x):
        return self.head(self.backbone(x))

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.05)


class UnfreezeAt(BaseFinetuning):
    """Freezes :class:`Finetuned`'s backbone and unfreezes it into a new param group at ``epoch``. With
    ``train_bn=False`` Lightning sets requires_grad=True on the BatchNorm layer at the unfreeze as well, but leaves it
    out of the new param group."""

    def __init__(self, epoch: int, train_bn: bool) -> None:
        super().__init__()
        self.epoch = epoch
        self.train_bn = train_bn

    def freeze_before_training(self, pl_module) -> None:
        self.freeze(pl_module.backbone, train_bn=self.train_bn)

    def finetune_function(self, pl_module, current_epoch, optimizer) -> None:
        if current_epoch == self.epoch:
            self.unfreeze_and_add_param_group(pl_module.backbone, optimizer, train_bn=self.train_bn)


def fit(
    model: LightningModule, data: DataLoader, tmp_path, guard: GradGuard = None, extra_callbacks=(), **trainer_kwargs
) -> GradReport:
    """Fit ``model`` on ``data`` for one epoch under a fresh (or the given) guard; returns the guard's report."""
    guard = guard or GradGuard(summary=False)
    options = quiet_trainer_options(tmp_path)
    options.update(trainer_kwargs)
    Trainer(callbacks=[guard, *extra_callbacks], **options).fit(model, data)
    return guard.report()


def planted_at(function: Callable, marker: str) -> str:
    """``"file.py:LINE"`` of the first line of ``function``'s source that contains ``marker``."""
    lines, start = inspect.getsourcelines(function)
    for offset, line in enumerate(lines):
        if marker in line:
            return f"{os.path.basename(inspect.getsourcefile(function))}:{start + offset}"
    raise AssertionError(f"{marker!r} is not in the source of {function.__qualname__}")


def assert_flagged(report: GradReport, names: set[str], cause: str, location: str = None) -> None:
    """Exactly ``names`` missed a gradient, every one with ``cause``, and (if given) ``location`` in its detail."""
    assert set(report.missing) == names, report.format_table()
    assert not report.intermittent, report.format_table()
    for name in names:
        p = report.params[name]
        assert p.none_steps == p.steps, (name, p)
        assert p.cause == cause, (name, p.cause, p.detail)
        assert p.detail and "Fix:" in p.detail, (name, p.detail)
        if location is not None:
            assert f"{location} " in p.detail, (name, location, p.detail)
    assert not report.findings, report.findings


def assert_clean(report: GradReport) -> None:
    """An empty report: every checked parameter got a gradient at every step, nothing intermittent, no findings."""
    assert report.steps > 0
    assert report.missing == [], report.format_table()
    assert report.intermittent == [], report.format_table()
    assert report.findings == [], report.findings
    assert all(p.cause is None and p.detail is None for p in report.params.values())


def instruments_removed(model: torch.nn.Module) -> bool:
    """No torch-function mode is active on this thread and no module of ``model`` has a forward hook left."""
    return torch._C._len_torch_function_stack() == 0 and not any(
        m._forward_hooks or m._forward_pre_hooks for m in model.modules()
    )
