"""Gradient accumulation: "never" versus "sometimes".

With ``accumulate_grad_batches=4`` one optimizer step sums the gradients of 4 micro-batches. Looking at
``.grad`` right before the step only tells you whether *any* of the 4 gave a gradient: a gradient from
micro-batch 1 is still there after micro-batch 2 gave nothing. GradGuard also counts, after every backward pass,
which parameters that micro-batch reached, so its report separates three situations:

* never:                       no gradient at every optimizer step (a dead layer: almost always a bug);
* None at some steps:          whole accumulation windows without a gradient (the optimizer skips the parameter,
                               or applies only momentum/weight decay, at those steps);
* None in some micro-batches:  a gradient at every step, but from fewer micro-batches than the window holds
                               (conditional branches, routed experts, auxiliary losses computed now and then).

The model below has one of each, by construction:

* ``dead``    is registered but never called                                        -> never
* ``rare``    runs only on batches 1 and 9 of each epoch (2 of the 4 windows)       -> None at some steps
* ``aux``     runs on the first micro-batch of every window (batch_idx % 4 == 0)    -> None in 3 of 4 micro-batches

Run::

    python examples/accumulation.py
"""

import warnings

import torch
import torch.nn.functional as F
from lightning import LightningModule, Trainer, seed_everything
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import GradGuard

ACCUMULATE = 4
BATCHES_PER_EPOCH = 16  # 4 optimizer steps per epoch


class BranchyRegressor(LightningModule):
    def __init__(self, features: int = 8, hidden: int = 16) -> None:
        super().__init__()
        self.trunk = nn.Linear(features, hidden)
        self.head = nn.Linear(hidden, 1)
        self.aux = nn.Linear(hidden, 1)  # an auxiliary loss, computed only every 4th batch to save time
        self.rare = nn.Linear(hidden, 1)  # a branch for rare inputs
        self.dead = nn.Linear(hidden, 1)  # left over from an experiment: nothing calls it

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = torch.relu(self.trunk(x))
        loss = F.mse_loss(self.head(h), y)
        if batch_idx % ACCUMULATE == 0:
            loss = loss + 0.1 * F.mse_loss(self.aux(h), y)
        if batch_idx in (1, 9):
            loss = loss + 0.1 * F.mse_loss(self.rare(h), y)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def describe(name: str, p) -> str:
    """One line saying which of the three situations a parameter is in."""
    if p.none_steps == p.steps:
        return f"{name:14s} never: no gradient at any of its {p.steps} optimizer steps"
    if p.none_steps:
        return (
            f"{name:14s} None at some steps: no gradient at {p.none_steps} of {p.steps} optimizer steps "
            f"(from {p.micro_batches - p.none_micro_batches} of {p.micro_batches} micro-batches)"
        )
    return (
        f"{name:14s} None in some micro-batches: a gradient at every step, but only from "
        f"{p.micro_batches - p.none_micro_batches} of {p.micro_batches} micro-batches"
    )


def main() -> None:
    seed_everything(0, verbose=False)
    x = torch.randn(BATCHES_PER_EPOCH * 8, 8)
    y = x.sum(dim=1, keepdim=True)
    data = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)

    guard = GradGuard(summary=False)  # we print the report ourselves below
    trainer = Trainer(
        accelerator="cpu",
        max_epochs=2,
        accumulate_grad_batches=ACCUMULATE,
        callbacks=[guard],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    with warnings.catch_warnings():
        # GradGuard warns once per parameter at its first None step; here the report below says it all
        warnings.filterwarnings("ignore", message="GradGuard")
        trainer.fit(BranchyRegressor(), data)

    report = guard.report()
    print()
    print(report.format_table())
    print()
    print(
        f"accumulate_grad_batches={ACCUMULATE}: {report.steps} optimizer steps "
        f"over {report.micro_batches} micro-batches"
    )
    for name, p in report.params.items():
        if p.none_steps or p.none_micro_batches:
            print("  " + describe(name, p))
    print()
    print("report.missing      (None at one or more steps):      ", report.missing)
    print("report.intermittent (every step, not every micro-batch):", report.intermittent)
    print()
    print(
        "Reading .grad before optimizer.step() would have shown a gradient for 'aux' at every step: accumulation\n"
        "hides the 3 micro-batches of each window that never reached it. A parameter that is None at every step\n"
        "is dead code (fix it, or list it in allow_none); one that is None at some steps or in some micro-batches\n"
        "is trained on less data than the rest, which is fine for a conditional branch and a bug otherwise."
    )


if __name__ == "__main__":
    main()
