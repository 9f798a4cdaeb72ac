"""No false alarms: healthy patterns that look like gradient bugs produce an empty report and no findings.

Each model runs through the diagnosis window (the first steps), so every instrument (forward hooks, the
torch-function mode recording cuts, the graph walk) and the static audit see it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as checkpoint
from diagnosis_helpers import (
    HIDDEN,
    IN_DIM,
    SEQ,
    VOCAB,
    Classification,
    Finetuned,
    Regression,
    UnfreezeAt,
    assert_clean,
    fit,
    instruments_removed,
    regression_data,
    token_data,
)
from lightning.pytorch import LightningModule
from models import Backbone, TiedEmbeddingLM
from torch import nn


class FrozenBackbone(Regression):
    def __init__(self, how: str, optimize: str = "all") -> None:
        super().__init__()
        self.backbone = Backbone()
        self.head = nn.Linear(HIDDEN, 1)
        if how == "freeze":
            self.backbone.freeze()  # LightningModule.freeze() on a submodule
        else:
            self.backbone.requires_grad_(False)
        self.optimize = optimize

    def forward(self, x):
        return self.head(torch.relu(self.backbone(x)))

    def configure_optimizers(self):
        params = self.parameters() if self.optimize == "all" else [p for p in self.parameters() if p.requires_grad]
        return torch.optim.SGD(params, lr=0.05)


class PaddingAndSparseEmbeddings(Classification):
    def __init__(self) -> None:
        super().__init__()
        self.padded = nn.Embedding(VOCAB, HIDDEN, padding_idx=0)
        self.sparse = nn.Embedding(VOCAB, HIDDEN, sparse=True)
        self.classify = nn.Linear(HIDDEN, 2)

    def forward(self, tokens):
        return self.classify((self.padded(tokens) + self.sparse(tokens)).mean(dim=1))


class TruncatedBPTT(LightningModule):
    """The hidden state is carried across batches, detached: correct, and every weight gets a gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(IN_DIM, HIDDEN, batch_first=True)
        self.readout = nn.Linear(HIDDEN, 1)
        self.hidden = None

    def training_step(self, batch, batch_idx):
        x, y = batch
        out, hidden = self.rnn(x.unsqueeze(1).repeat(1, SEQ, 1), self.hidden)
        self.hidden = hidden.detach()
        loss = F.mse_loss(self.readout(out[:, -1]), y)
        self.log("train_loss", loss)  # Lightning detaches the logged value: not the user's cut
        print_me = loss.item()  # noqa: F841 - a number for printing cuts nothing that matters
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class DetachedZerosInitialState(Regression):
    """The seed article's example 1: ``h0 = torch.zeros(...).detach()`` cuts nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.RNN(IN_DIM, HIDDEN)
        self.fc = nn.Linear(HIDDEN, 1)

    def forward(self, x):
        seq = x.unsqueeze(0).repeat(SEQ, 1, 1)
        h0 = torch.zeros(1, seq.size(1), self.rnn.hidden_size).detach()
        output, _ = self.rnn(seq, h0)
        return self.fc(output[-1])


class CustomParameterThroughMatmul(Regression):
    """The seed article's example 2: an ``nn.Parameter`` attribute is registered; matmul gives it a gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.RNN(IN_DIM, HIDDEN)
        self.weight = nn.Parameter(torch.randn(HIDDEN, HIDDEN))
        self.fc = nn.Linear(HIDDEN, 1)

    def forward(self, x):
        output, _ = self.rnn(x.unsqueeze(0).repeat(SEQ, 1, 1))
        return self.fc(torch.matmul(output[-1], self.weight))


class MixtureOfExperts(Regression):
    """Top-2 routing over 2 experts: integer routing indices on the loss path, every expert runs."""

    def __init__(self, experts: int = 2) -> None:
        super().__init__()
        self.router = nn.Linear(IN_DIM, experts)
        self.experts = nn.ModuleList(nn.Linear(IN_DIM, 1) for _ in range(experts))

    def forward(self, x):
        weights, chosen = torch.topk(torch.softmax(self.router(x), dim=-1), k=2, dim=-1)
        out = torch.zeros(x.shape[0], 1)
        for slot in range(2):
            for e, expert in enumerate(self.experts):
                mask = (chosen[:, slot] == e).float().unsqueeze(-1)
                out = out + mask * weights[:, slot : slot + 1] * expert(x)
        return out


class GAN(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.generator = nn.Sequential(nn.Linear(2, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, IN_DIM))
        self.discriminator = nn.Sequential(nn.Linear(IN_DIM, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 1))

    def training_step(self, batch, batch_idx):
        real, _ = batch
        opt_g, opt_d = self.optimizers()
        z = torch.randn(real.shape[0], 2)
        self.toggle_optimizer(opt_d)
        fake = self.generator(z).detach()
        d_loss = F.softplus(-self.discriminator(real)).mean() + F.softplus(self.discriminator(fake)).mean()
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()
        self.untoggle_optimizer(opt_d)
        self.toggle_optimizer(opt_g)
        g_loss = F.softplus(-self.discriminator(self.generator(z))).mean()
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()
        self.untoggle_optimizer(opt_g)

    def configure_optimizers(self):
        return (
            torch.optim.Adam(self.generator.parameters(), lr=1e-3),
            torch.optim.SGD(self.discriminator.parameters(), lr=1e-2),
        )


class NonReentrantCheckpoint(Regression):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(IN_DIM, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN))
        self.stem = nn.Linear(HIDDEN, HIDDEN)
        self.head = nn.Linear(HIDDEN, 1)

    def forward(self, x):
        h = checkpoint.checkpoint(self.block, x, use_reentrant=False)  # x needs no grad: fine when non-reentrant
        h = checkpoint.checkpoint(self.stem, h, use_reentrant=True)  # reentrant, but h requires grad: fine
        return self.head(h)


class BuffersAndConstants(Regression):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(IN_DIM, 1)
        self.register_buffer("running", torch.zeros(1))
        self.register_buffer("scratch", torch.ones(IN_DIM), persistent=False)
        self.mean = torch.zeros(IN_DIM)  # a plain constant tensor: requires no grad, nothing to train
        self.shapes = [torch.ones(2), (3, 4)]
        self.aliases = [self.layer]  # a convenience list of a registered module: nothing hidden

    def forward(self, x):
        self.running += 1
        return self.layer((x - self.mean) * self.scratch)


class EMATeacher(Regression):
    """A student trained against a no-grad EMA teacher updated in place: no_grad uses of parameters, by design."""

    def __init__(self) -> None:
        super().__init__()
        self.student = nn.Linear(IN_DIM, 1)
        self.teacher = nn.Linear(IN_DIM, 1).requires_grad_(False)

    def forward(self, x):
        with torch.no_grad():
            target = self.teacher(x)
            for t, s in zip(self.teacher.parameters(), self.student.parameters()):
                t.mul_(0.9).add_(s, alpha=0.1)  # student parameters read under no_grad
        return self.student(x) + 0 * target


def test_tied_input_output_embeddings(tmp_path):
    assert_clean(fit(TiedEmbeddingLM(), token_data(), tmp_path))


def test_frozen_backbone_requires_grad_false(tmp_path):
    assert_clean(fit(FrozenBackbone("requires_grad_"), regression_data(), tmp_path))


def test_frozen_backbone_lightning_freeze_and_only_trainable_in_optimizer(tmp_path):
    assert_clean(fit(FrozenBackbone("freeze", optimize="trainable"), regression_data(), tmp_path))


def test_base_finetuning_freezes_then_unfreezes_mid_run(tmp_path):
    model = Finetuned()
    report = fit(model, regression_data(), tmp_path, extra_callbacks=[UnfreezeAt(1, train_bn=True)], max_epochs=2)
    assert_clean(report)
    assert all(p.requires_grad for p in model.backbone.parameters())
    # the linear layer is checked once unfrozen (the second epoch's 3 steps); BaseFinetuning keeps BatchNorm trainable
    assert report.params["backbone.0.weight"].steps == report.params["backbone.0.bias"].steps == 3
    assert report.params["backbone.1.weight"].steps == 6
    assert report.params["head.weight"].steps == 6


def test_padding_idx_and_sparse_embeddings(tmp_path):
    assert_clean(fit(PaddingAndSparseEmbeddings(), token_data(), tmp_path))


def test_truncated_bptt_detached_hidden_state(tmp_path):
    assert_clean(fit(TruncatedBPTT(), regression_data(n_batches=4), tmp_path))


def test_detached_zeros_initial_state(tmp_path):
    assert_clean(fit(DetachedZerosInitialState(), regression_data(), tmp_path))


def test_custom_parameter_through_matmul(tmp_path):
    assert_clean(fit(CustomParameterThroughMatmul(), regression_data(), tmp_path))


def test_mixture_of_experts_whose_every_expert_runs(tmp_path):
    assert_clean(fit(MixtureOfExperts(), regression_data(), tmp_path))


def test_gan_two_optimizers_with_toggle_optimizer(tmp_path):
    report = fit(GAN(), regression_data(), tmp_path)
    assert_clean(report)
    assert report.steps == 2 * 3


def test_checkpoint_non_reentrant_and_reentrant_with_grad_input(tmp_path):
    assert_clean(fit(NonReentrantCheckpoint(), regression_data(), tmp_path))


def test_buffers_and_non_trainable_tensors(tmp_path):
    assert_clean(fit(BuffersAndConstants(), regression_data(), tmp_path))


def test_ema_teacher_reading_parameters_under_no_grad(tmp_path):
    model = EMATeacher()
    assert_clean(fit(model, regression_data(), tmp_path))
    assert instruments_removed(model)
