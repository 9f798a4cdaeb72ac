"""Models with planted gradient bugs (plain ``nn.Module``s and a LightningModule around one) for the adapter tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn

PLANTED = {"side.weight", "side.bias", "unused.weight", "unused.bias"}
USED = {"encoder.weight", "encoder.bias", "head.weight", "head.bias"}


class PlantedNet(nn.Module):
    """An encoder and a head that train, a side path whose output is detached, and a layer that is never called."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, 8)
        self.side = nn.Linear(4, 8)
        self.head = nn.Linear(8, 1)
        self.unused = nn.Linear(8, 1)  # planted: defined, never called

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.encoder(x)) + self.side(x).detach()  # planted: the side path is cut from the loss
        return self.head(h)


class HealthyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, 8)
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.encoder(x)))


class BranchNet(nn.Module):
    """``branch`` runs only when asked: some micro-batches give it a gradient, others do not."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(4, 4)
        self.branch = nn.Linear(4, 4)
        self.head = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor, use_branch: bool) -> torch.Tensor:
        h = torch.relu(self.trunk(x))
        if use_branch:
            h = h + self.branch(h)
        return self.head(h)


def batches(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(3, 4, generator=g), torch.randn(3, 1, generator=g)) for _ in range(n)]


class PlantedModule(LightningModule):
    """A LightningModule around :class:`PlantedNet`: an unused layer and a detached side path."""

    def __init__(self) -> None:
        super().__init__()
        self.net = PlantedNet()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)
