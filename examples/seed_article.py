"""The article "Why is .grad returning None when updating weighted matrices in a PyTorch RNN?", checked by GradGuard.

The article (January 2025) blames three code examples for ``None`` gradients. Run as LightningModules with
GradGuard watching, they tell a different story:

1. ``h0 = torch.zeros(...).detach()``: every parameter receives a gradient. Detaching a fresh tensor of zeros
   cuts nothing: ``h0`` was never part of the graph, and the RNN's weights are used after it.
2. ``self.weight = nn.Parameter(...)`` used through ``torch.matmul``: the weight *is* registered (assigning an
   ``nn.Parameter`` to a module attribute registers it) and every parameter receives a gradient.
3. ``optimizer.zero_grad()`` inside the loop: the code as written crashes before any gradient exists, because
   ``nn.RNN`` returns a tuple ``(output, h_n)``. Corrected, every parameter receives a gradient. Calling
   ``zero_grad()`` once per step is the normal pattern (Lightning does it for you); it does not make gradients
   None during backward. What it does do (since PyTorch 2.0, ``set_to_none=True``) is make ``.grad`` read None
   right *after* it runs, which is where many "my grad is None" questions come from.

Then two bugs that really do leave an RNN's parameters without a gradient, and GradGuard naming them:

4. an unused layer: an ``attention`` projection defined in ``__init__`` that ``forward`` never calls;
5. a detached encoder output: ``encoder_states.detach()`` before the decoder cuts every encoder weight off the
   loss.

For flagged parameters the script prints ``report.params[name].cause`` and ``.detail`` (GradGuard's
diagnosis of *why*; ``None`` where this version cannot tell yet).

Run::

    python examples/seed_article.py
"""

import warnings

import torch
import torch.nn as nn
from lightning import LightningModule, Trainer, seed_everything
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import GradGuard

SEQ, BATCH, INPUT, HIDDEN, OUTPUT = 20, 32, 10, 20, 5


# ------------------------------------------------------------ the article's examples
class Example1DetachedH0(LightningModule):
    """Article example 1, unchanged: ``h0`` is zeros, detached. The article says this blocks gradient flow."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.RNN(INPUT, HIDDEN)
        self.fc = nn.Linear(HIDDEN, OUTPUT)

    def forward(self, x):
        h0 = torch.zeros(1, x.size(1), self.rnn.hidden_size).detach()  # "INCORRECT" according to the article
        output, hn = self.rnn(x, h0)
        return self.fc(output[-1, :, :])

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)


class Example2CustomWeight(LightningModule):
    """Article example 2, unchanged: ``self.weight = nn.Parameter(...)``, which the article calls unregistered."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.RNN(INPUT, HIDDEN)
        self.fc = nn.Linear(HIDDEN, OUTPUT)
        self.weight = nn.Parameter(torch.randn(HIDDEN, HIDDEN))  # registered: it is in named_parameters()

    def forward(self, x):
        h0 = torch.zeros(1, x.size(1), self.rnn.hidden_size)
        output, hn = self.rnn(x, h0)
        return self.fc(torch.matmul(output, self.weight))  # (20, 32, 5), broadcast against the (32, 5) target

    def training_step(self, batch, batch_idx):
        x, y = batch
        with warnings.catch_warnings():
            # as in the article: MSELoss warns that (20, 32, 5) and (32, 5) differ and broadcasts; keep the output
            # readable, the gradients are the same
            warnings.filterwarnings("ignore", message="Using a target size")
            return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)


def article_example_3_as_written() -> str:
    """Article example 3's loop body, verbatim: it fails before backward ever runs."""
    model = nn.RNN(10, 20)
    criterion = nn.MSELoss()
    x = torch.randn(20, 32, 10)
    y = torch.randn(20, 32, 20)
    try:
        output = model(x)
        criterion(output, y)
    except Exception as err:  # noqa: BLE001 - we show exactly what the article's code raises
        return f"{type(err).__name__}: {err}"
    return "no error"


class Example3Corrected(LightningModule):
    """Article example 3, corrected: unpack ``(output, h_n)``. Lightning calls ``zero_grad()`` once per step."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.RNN(10, 20)

    def training_step(self, batch, batch_idx):
        x, y = batch
        output, _ = self.rnn(x)  # the fix: nn.RNN returns (output, h_n)
        return nn.functional.mse_loss(output, y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)


# ------------------------------------------------------------ real bugs
class Bug4UnusedLayer(LightningModule):
    """An attention projection that ``forward`` never calls: its parameters never receive a gradient."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.RNN(INPUT, HIDDEN)
        self.attention = nn.Linear(HIDDEN, HIDDEN)  # BUG: defined, registered, optimized... and never called
        self.fc = nn.Linear(HIDDEN, OUTPUT)

    def forward(self, x):
        output, _ = self.rnn(x)
        return self.fc(output[-1])

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)


class Bug5DetachedEncoder(LightningModule):
    """An encoder-decoder whose encoder output is detached: no gradient reaches any encoder weight."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.RNN(INPUT, HIDDEN)
        self.decoder = nn.RNN(HIDDEN, HIDDEN)
        self.fc = nn.Linear(HIDDEN, OUTPUT)

    def forward(self, x):
        encoder_states, _ = self.encoder(x)
        encoder_states = encoder_states.detach()  # BUG: cuts the encoder out of the graph
        decoded, _ = self.decoder(encoder_states)
        return self.fc(decoded[-1])

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)


# ------------------------------------------------------------ running them
def data(target_shape, batches: int = 4) -> DataLoader:
    """``batches`` batches of the article's shapes: x (SEQ, BATCH, INPUT), sequence-first as nn.RNN expects."""
    xs = torch.randn(batches, SEQ, BATCH, INPUT)
    ys = torch.randn(batches, *target_shape)
    # batch_size=None: each dataset item is already a whole (sequence-first) batch
    return DataLoader(TensorDataset(xs, ys), batch_size=None)


def check(title: str, model: LightningModule, target_shape) -> GradGuard:
    guard = GradGuard(summary=False)
    trainer = Trainer(
        accelerator="cpu",
        max_epochs=1,
        callbacks=[guard],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="GradGuard")  # the verdict is printed below
        trainer.fit(model, data(target_shape))

    report = guard.report()
    print(f"\n== {title}")
    if report.ok and not report.intermittent:
        print(report.summary())  # the one-line verdict: "all N trainable parameters received a gradient ..."
    else:
        print(f"GradGuard: {len(report.missing)} of {len(report.params)} trainable parameters received no gradient:")
        explained = {}  # (cause, detail) -> names: parameters of one module usually share one explanation
        for name in report.missing:
            p = report.params[name]
            print(f"  {name}: None at {p.none_steps}/{p.steps} steps")
            explained.setdefault((p.cause, p.detail), []).append(name)
        for (cause, detail), names in explained.items():
            print(f"  why ({', '.join(names)}): cause={cause!r}")
            print(f"    detail={detail!r}")
    return guard


def main() -> None:
    seed_everything(0, verbose=False)
    print("The article's three examples, run under GradGuard")
    check("Example 1: h0 = torch.zeros(...).detach()", Example1DetachedH0(), (BATCH, OUTPUT))
    print("   -> detaching a tensor that was never in the graph cuts nothing: not a cause of None gradients.")
    check("Example 2: self.weight = nn.Parameter(...) used via torch.matmul", Example2CustomWeight(), (BATCH, OUTPUT))
    print("   -> an nn.Parameter assigned to a module attribute is registered: not a cause of None gradients.")
    print("\n== Example 3 as written: optimizer.zero_grad() inside the loop")
    print(f"The article's code fails before backward: {article_example_3_as_written()}")
    print("   (nn.RNN returns a tuple (output, h_n), which the code passes whole to MSELoss)")
    check("Example 3 corrected: output, _ = rnn(x); zero_grad() every step", Example3Corrected(), (SEQ, BATCH, HIDDEN))
    print("   -> zero_grad() once per step is the normal pattern: not a cause of None gradients.")

    print("\nTwo bugs that really leave an RNN's parameters without a gradient")
    check("Bug 4: an attention layer that forward never calls", Bug4UnusedLayer(), (BATCH, OUTPUT))
    check("Bug 5: encoder output detached before the decoder", Bug5DetachedEncoder(), (BATCH, OUTPUT))


if __name__ == "__main__":
    main()
