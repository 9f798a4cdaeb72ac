"""GradGuard quickstart: catch a layer that never receives a gradient.

The model below has a planted bug that PyTorch never reports: ``self.norm`` is created in ``__init__`` (so it
is registered, handed to the optimizer and saved in checkpoints) but ``forward`` forgot to call it. Its
parameters get no gradient, so they are never trained. Training still "works": the loss goes down and nothing
crashes.

One callback finds it. Run::

    python examples/quickstart.py
    tensorboard --logdir lightning_logs     # optional: per-parameter gradient norms and None counts

It trains on the CPU in a few seconds, writes TensorBoard logs under ``./lightning_logs/`` and prints GradGuard's
report: a warning at the first step where a parameter has no gradient, and a summary table at the end.
"""

import torch
import torch.nn.functional as F
from lightning import LightningModule, Trainer, seed_everything
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import GradGuard


class TinyClassifier(LightningModule):
    def __init__(self, in_features: int = 16, hidden: int = 32, classes: int = 3) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
        )
        self.norm = nn.LayerNorm(hidden)  # meant to normalize the features before the classifier...
        self.classifier = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.encoder(x)
        return self.classifier(features)  # BUG: ...but forward never calls self.norm(features)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def make_data(n: int = 512, in_features: int = 16, classes: int = 3) -> DataLoader:
    """Three Gaussian blobs: an easy problem, so the loss falls and the bug goes unnoticed."""
    centers = torch.randn(classes, in_features) * 0.5
    y = torch.randint(0, classes, (n,))
    x = centers[y] + torch.randn(n, in_features)
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)


def main() -> None:
    seed_everything(0, verbose=False)
    model = TinyClassifier()

    # The only change to a normal Lightning script: add the callback.
    guard = GradGuard()

    trainer = Trainer(
        accelerator="cpu",
        max_epochs=3,
        callbacks=[guard],
        log_every_n_steps=4,  # GradGuard follows the Trainer's logging cadence by default
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )  # the default logger: TensorBoard, under ./lightning_logs/
    trainer.fit(model, make_data())
    # At the end of fit GradGuard has printed its summary table and written gradguard.json to the log directory.

    report = guard.report()  # the same findings as data, for scripts and CI
    print()
    print(f"Final training loss: {trainer.callback_metrics['train_loss']:.3f}  (training 'works': the bug is silent)")
    print(f"Parameters that never received a gradient: {report.missing}")
    for name in report.missing:
        p = report.params[name]
        print(f"  {name}: no gradient at {p.none_steps} of {p.steps} optimizer steps (cause: {p.cause or 'unknown'})")
    print(f"TensorBoard logs: {trainer.log_dir}  (tags under gradguard/: norm/<param>, total_norm, none_steps/<param>)")
    print(f"JSON report:      {guard.report_path}")


if __name__ == "__main__":
    main()
