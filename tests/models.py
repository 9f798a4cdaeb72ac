"""Small LightningModules and data shared by the tests: healthy models and models with planted gradient bugs.

Every model is tiny (a few hundred weights) so that a real ``Trainer.fit`` over a handful of batches takes well
under a second on one CPU thread. Parameter names are part of what the tests assert, so keep them stable.

Healthy models (GradGuard must report nothing): :class:`HealthyMLP`, :class:`TiedEmbeddingLM`,
:class:`FrozenBackboneModel`, :class:`PaddingEmbeddingModel`, :class:`TruncatedBPTTRNN`, :class:`ManualGAN`.
Models with gradient bugs: :class:`UnusedLayerMLP` (never), :class:`IntermittentBranchMLP` (sometimes),
:class:`SkipBatchesMLP` (``training_step`` returns None), :class:`ClearedManualModel` (``zero_grad`` between
``manual_backward`` and ``step``).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Optional

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.loggers import Logger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

IN_DIM = 4
HIDDEN = 8
VOCAB = 11
SEQ = 5


def gradguard_warnings(record) -> list[str]:
    """The texts of the warnings GradGuard itself emitted, among those ``pytest.warns``/``recwarn`` recorded."""
    return [str(w.message) for w in record if str(w.message).startswith("GradGuard")]


# ------------------------------------------------------------ data
def quiet_trainer_options(root) -> dict:
    """Trainer arguments for a fast, silent CPU test run under ``root``: one epoch, no logger or checkpoints."""
    return dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(root),
    )


def regression_loader(n_batches: int, batch_size: int = 2, in_dim: int = IN_DIM, seed: int = 0) -> DataLoader:
    """``n_batches`` batches of ``(x, y)`` with ``x: (batch_size, in_dim)`` and ``y: (batch_size, 1)``, unshuffled."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_batches * batch_size, in_dim, generator=g)
    y = torch.randn(n_batches * batch_size, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def token_loader(n_batches: int, batch_size: int = 2, seq: int = SEQ, vocab: int = VOCAB, seed: int = 0) -> DataLoader:
    """Token ids ``(batch_size, seq)`` in ``[0, vocab)`` (0 is the padding id) and a class label per sequence."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (n_batches * batch_size, seq), generator=g)
    tokens[:, -2:] = 0  # every sequence ends in padding, so the padding row is really looked up
    labels = torch.randint(0, 2, (n_batches * batch_size,), generator=g)
    return DataLoader(TensorDataset(tokens, labels), batch_size=batch_size, shuffle=False)


def sequence_loader(n_batches: int, batch_size: int = 2, seq: int = SEQ, in_dim: int = IN_DIM, seed: int = 0):
    """Consecutive chunks of one long series per batch row, for truncated back-propagation through time."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_batches * batch_size, seq, in_dim, generator=g)
    y = torch.randn(n_batches * batch_size, seq, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False, drop_last=True)


class RegressionData(LightningDataModule):
    """A datamodule around :func:`regression_loader` (``n_batches`` training batches per epoch)."""

    def __init__(self, n_batches: int = 8, batch_size: int = 2, in_dim: int = IN_DIM) -> None:
        super().__init__()
        self.n_batches, self.batch_size, self.in_dim = n_batches, batch_size, in_dim

    def train_dataloader(self) -> DataLoader:
        return regression_loader(self.n_batches, self.batch_size, self.in_dim)


# ------------------------------------------------------------ base
class RegressionModule(LightningModule):
    """Mean squared error on ``self(x)``; SGD over every parameter (frozen ones included, as most users write it).

    ``skip_batches``: batch indices on which ``training_step`` returns None (no backward pass runs).
    ``log_loss``: also ``self.log("train_loss", ...)``, to compare GradGuard's step numbering with Lightning's.
    """

    def __init__(self, lr: float = 0.1, skip_batches: Collection[int] = (), log_loss: bool = False) -> None:
        super().__init__()
        self.lr = lr
        self.skip_batches = frozenset(skip_batches)
        self.log_loss = log_loss

    def training_step(self, batch, batch_idx: int) -> Optional[Tensor]:
        if batch_idx in self.skip_batches:
            return None
        x, y = batch
        loss = F.mse_loss(self.compute(x, batch_idx), y)
        if self.log_loss:
            self.log("train_loss", loss, on_step=True, on_epoch=False)
        return loss

    def compute(self, x: Tensor, batch_idx: int) -> Tensor:
        return self(x)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class HealthyMLP(RegressionModule):
    """Three linear layers, all used: 6 trainable parameter tensors."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.l1 = nn.Linear(IN_DIM, HIDDEN)
        self.l2 = nn.Linear(HIDDEN, HIDDEN)
        self.l3 = nn.Linear(HIDDEN, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.l3(torch.tanh(self.l2(torch.tanh(self.l1(x)))))


class SkipBatchesMLP(HealthyMLP):
    """:class:`HealthyMLP` whose ``training_step`` returns None on ``skip_batches``."""


class UnusedLayerMLP(RegressionModule):
    """The planted bug: ``unused`` is registered and optimized but never called in ``forward``."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.l1 = nn.Linear(IN_DIM, HIDDEN)
        self.l2 = nn.Linear(HIDDEN, 1)
        self.unused = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x: Tensor) -> Tensor:
        return self.l2(torch.relu(self.l1(x)))


class IntermittentBranchMLP(RegressionModule):
    """``branch`` runs only on the batch indices in ``branch_batches`` (or where ``batch_idx % branch_every == 0``).

    Like an auxiliary loss or a routed expert: with gradient accumulation the branch can receive a gradient at
    every optimizer step while missing most micro-batches.
    """

    def __init__(
        self, branch_batches: Collection[int] = (), branch_every: Optional[int] = None, with_unused: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.branch_batches = frozenset(branch_batches)
        self.branch_every = branch_every
        self.trunk = nn.Linear(IN_DIM, HIDDEN)
        self.head = nn.Linear(HIDDEN, 1)
        self.branch = nn.Linear(HIDDEN, 1)
        if with_unused:
            self.unused = nn.Linear(HIDDEN, 1)

    def uses_branch(self, batch_idx: int) -> bool:
        if self.branch_every is not None:
            return batch_idx % self.branch_every == 0
        return batch_idx in self.branch_batches

    def compute(self, x: Tensor, batch_idx: int) -> Tensor:
        h = torch.tanh(self.trunk(x))
        out = self.head(h)
        if self.uses_branch(batch_idx):
            out = out + self.branch(h)
        return out


# ------------------------------------------------------------ healthy models
class TiedEmbeddingLM(LightningModule):
    """Input embedding and output projection share one weight (``head.weight is embed.weight``)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.mix = nn.Linear(HIDDEN, HIDDEN)
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)
        self.head.weight = self.embed.weight

    def training_step(self, batch, batch_idx: int) -> Tensor:
        tokens, _ = batch
        logits = self.head(torch.tanh(self.mix(self.embed(tokens[:, :-1]))))
        return F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Backbone(LightningModule):
    """A pretrained feature extractor, itself a LightningModule so that ``LightningModule.freeze()`` applies."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(IN_DIM, HIDDEN)
        self.norm = nn.LayerNorm(HIDDEN)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(x))


class FrozenBackboneModel(RegressionModule):
    """A frozen backbone under a trained head.

    ``freeze_with``: ``"freeze"`` (``LightningModule.freeze()`` on the submodule) or ``"requires_grad_"``.
    ``optimize``: ``"all"`` hands every parameter (frozen ones too) to the optimizer, ``"trainable"`` only the
    ones with ``requires_grad``.
    """

    def __init__(self, freeze_with: str = "freeze", optimize: str = "all", **kwargs) -> None:
        super().__init__(**kwargs)
        self.backbone = Backbone()
        self.head = nn.Linear(HIDDEN, 1)
        if freeze_with == "freeze":
            self.backbone.freeze()
        else:
            self.backbone.requires_grad_(False)
        self.optimize = optimize

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.backbone(x)))

    def configure_optimizers(self):
        params = self.parameters() if self.optimize == "all" else [p for p in self.parameters() if p.requires_grad]
        return torch.optim.SGD(params, lr=self.lr)


class PaddingEmbeddingModel(LightningModule):
    """``nn.Embedding(padding_idx=0)``: the padding row's gradient is zero, but the weight has a gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN, padding_idx=0)
        self.classify = nn.Linear(HIDDEN, 2)

    def training_step(self, batch, batch_idx: int) -> Tensor:
        tokens, labels = batch
        return F.cross_entropy(self.classify(self.embed(tokens).mean(dim=1)), labels)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class TruncatedBPTTRNN(LightningModule):
    """Truncated back-propagation through time: the hidden state is carried from batch to batch, detached.

    ``detach()`` on the carried state is correct here: it cuts the graph between chunks, and every parameter
    still receives a gradient from the chunk it processes.
    """

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(IN_DIM, HIDDEN, batch_first=True)
        self.readout = nn.Linear(HIDDEN, 1)
        self.hidden: Optional[Tensor] = None

    def on_train_epoch_start(self) -> None:
        self.hidden = None

    def training_step(self, batch, batch_idx: int) -> Tensor:
        x, y = batch
        out, hidden = self.rnn(x, self.hidden)
        self.hidden = hidden.detach()
        return F.mse_loss(self.readout(out), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


# ------------------------------------------------------------ manual optimization
class _Net(nn.Module):
    """``body`` (two linear layers) and, with ``with_unused``, a registered layer ``unused`` that is never called."""

    def __init__(self, in_dim: int, out_dim: int, with_unused: bool = False) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(in_dim, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, out_dim))
        if with_unused:
            self.unused = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class ManualGAN(LightningModule):
    """A GAN with two optimizers in manual optimization (discriminator first, then generator).

    Args:
        toggle: wrap each update in ``toggle_optimizer``/``untoggle_optimizer`` (the other network's parameters
            get ``requires_grad=False`` meanwhile).
        critic_steps: discriminator updates per batch (WGAN-style ``n_critic``), each with its own backward.
        unused_in: ``"generator"`` or ``"discriminator"`` adds a registered, optimized, never-called layer
            ``<net>.unused`` to that network (a planted bug owned by one optimizer only).
    """

    def __init__(self, toggle: bool = True, critic_steps: int = 1, unused_in: Optional[str] = None) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.toggle = toggle
        self.critic_steps = critic_steps
        self.generator = _Net(2, IN_DIM, with_unused=unused_in == "generator")
        self.discriminator = _Net(IN_DIM, 1, with_unused=unused_in == "discriminator")

    def _update(self, opt, loss_fn) -> None:
        if self.toggle:
            self.toggle_optimizer(opt)
        opt.zero_grad()
        self.manual_backward(loss_fn())
        opt.step()
        if self.toggle:
            self.untoggle_optimizer(opt)

    def training_step(self, batch, batch_idx: int) -> None:
        real, _ = batch
        opt_g, opt_d = self.optimizers()
        z = torch.randn(real.shape[0], 2)

        def d_loss() -> Tensor:
            fake = self.generator(z).detach()
            return F.softplus(-self.discriminator(real)).mean() + F.softplus(self.discriminator(fake)).mean()

        def g_loss() -> Tensor:
            return F.softplus(-self.discriminator(self.generator(z))).mean()

        for _ in range(self.critic_steps):
            self._update(opt_d, d_loss)
        self._update(opt_g, g_loss)

    def configure_optimizers(self):
        return (
            torch.optim.Adam(self.generator.parameters(), lr=1e-3),
            torch.optim.SGD(self.discriminator.parameters(), lr=1e-2),
        )


class ClearedManualModel(LightningModule):
    """Manual optimization that calls ``opt.zero_grad()`` between ``manual_backward`` and ``opt.step()``.

    On the batch indices in ``clear_batches`` the gradients are cleared after backward, so the optimizer steps
    with every ``.grad`` None (GradGuard's cause: ``cleared``). ``step_without_backward``: batch indices on which
    the optimizer steps with no ``manual_backward`` at all (cause: ``no_backward``).
    """

    def __init__(self, clear_batches: Collection[int] = (), step_without_backward: Collection[int] = ()) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.clear_batches = frozenset(clear_batches)
        self.step_without_backward = frozenset(step_without_backward)
        self.l1 = nn.Linear(IN_DIM, HIDDEN)
        self.l2 = nn.Linear(HIDDEN, 1)

    def training_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        opt = self.optimizers()
        opt.zero_grad()
        if batch_idx not in self.step_without_backward:
            self.manual_backward(F.mse_loss(self.l2(torch.relu(self.l1(x))), y))
        if batch_idx in self.clear_batches:
            opt.zero_grad()  # the bug: the gradient from manual_backward is gone before the step
        opt.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class NaNBranchMLP(RegressionModule):
    """``bad``'s gradient is NaN on the batch indices in ``nan_batches``; every other gradient stays finite."""

    def __init__(self, nan_batches: Collection[int] = (), **kwargs) -> None:
        super().__init__(**kwargs)
        self.nan_batches = frozenset(nan_batches)
        self.good = nn.Linear(IN_DIM, 1)
        self.bad = nn.Linear(IN_DIM, 1)

    def compute(self, x: Tensor, batch_idx: int) -> Tensor:
        side = self.bad(x)
        if batch_idx in self.nan_batches:
            # poison only the gradient flowing into `bad`; the loss and `good`'s gradient stay finite
            side.register_hook(lambda grad: grad * float("nan"))
        return self.good(x) + 1e-3 * side

    def on_before_optimizer_step(self, optimizer) -> None:
        # runs after the callbacks' hook: GradGuard has seen the NaN; keep the weights finite for the next batches
        for p in self.parameters():
            if p.grad is not None:
                p.grad.nan_to_num_(0.0)


class RecordingLogger(Logger):
    """A real Lightning logger that keeps every ``log_metrics`` call in memory: ``rows`` of (step, metrics)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    @property
    def experiment(self) -> None:
        return None

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.append((step, dict(metrics)))

    def series(self, tag: str) -> list[tuple[int, float]]:
        """The (step, value) pairs logged under ``tag``."""
        return [(step, m[tag]) for step, m in self.rows if tag in m]
