"""Gradients that are there but zero everywhere: found from the norms GradGuard already computes.

A dead ReLU layer, a mask that zeroes a branch, a gate that sits at zero: ``.grad`` is a tensor, not None, and the
parameter trains no more than an unused one. Each test plants one in a real model and asserts the exact
parameters, the counts and the explanation; the healthy patterns (padding rows, sparse embeddings, a zero-initialised
gate that is trained, experts that are chosen now and then) stay silent.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from models import HealthyMLP, PaddingEmbeddingModel, regression_loader, token_loader
from torch import Tensor, nn

from lightning_gradguard import GradGuard, GradReport, watch
from lightning_gradguard.core.causes import HINTS, ZERO

IN_DIM, VOCAB = 4, 11


class MaskedBranchMLP(LightningModule):
    """A branch whose output is multiplied by a mask of zeros (a masking bug): its gradient is zero, not None."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(IN_DIM, 8)
        self.branch = nn.Linear(8, 1)
        self.head = nn.Linear(8, 1)
        self.register_buffer("mask", torch.zeros(1))  # meant to be ones

    def training_step(self, batch, batch_idx: int) -> Tensor:
        x, y = batch
        h = torch.tanh(self.trunk(x))
        return F.mse_loss(self.head(h) + self.branch(h) * self.mask, y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class DeadReLUConvNet(LightningModule):
    """A convolution whose bias sits far below zero: the ReLU after it never activates, so nothing below it learns."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)
        with torch.no_grad():
            self.conv1.bias.fill_(-100.0)

    def training_step(self, batch, batch_idx: int) -> Tensor:
        x, y = batch
        h = F.relu(self.conv1(x.view(-1, 1, 2, 2)))
        h = torch.tanh(self.conv2(h)).mean(dim=(2, 3))
        return F.cross_entropy(self.head(h), (y.view(-1) > 0).long())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class GatedGRU(LightningModule):
    """A recurrent encoder behind a gate that was initialised at zero and left out of training (a config slip)."""

    def __init__(self, train_gate: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 6)
        self.rnn = nn.GRU(6, 6, batch_first=True)
        self.skip = nn.Linear(6, 6)
        self.gate = nn.Parameter(torch.zeros(1), requires_grad=train_gate)  # zero-initialised, as in ReZero
        self.head = nn.Linear(6, 2)

    def training_step(self, batch, batch_idx: int) -> Tensor:
        tokens, labels = batch
        e = self.embed(tokens)
        h = self.skip(e) + self.gate * self.rnn(e)[0]
        return F.cross_entropy(self.head(h.mean(dim=1)), labels)

    def configure_optimizers(self):
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def fit(make_trainer, model, loader, **guard_options) -> tuple[GradGuard, list[str]]:
    guard = GradGuard(**guard_options)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        make_trainer(callbacks=[guard]).fit(model, loader)
    return guard, [str(w.message) for w in record if "GradGuard" in str(w.message)]


# ------------------------------------------------------------------ planted
def test_a_masked_branch_is_named_with_its_counts_and_explanation(make_trainer, tmp_path):
    guard, _ = fit(make_trainer, MaskedBranchMLP(), regression_loader(5), summary=False)
    report = guard.report()
    assert report.zero == ["branch.weight", "branch.bias"]
    assert report.missing == [] and not report.ok
    for name in ("branch.weight", "branch.bias"):
        p = report.params[name]
        assert (p.steps, p.none_steps, p.measured_steps, p.zero_steps) == (5, 0, 5, 5)
        assert p.cause == ZERO
        assert p.detail.startswith("its gradient was there but exactly zero everywhere at all 5 measured steps")
    for name in ("trunk.weight", "trunk.bias", "head.weight", "head.bias"):
        assert report.params[name].zero_steps == 0 and report.params[name].cause is None
    table = report.summary()
    assert "2 had a gradient that was zero everywhere at every measured step" in table
    assert "- branch.weight, branch.bias (zero): its gradient was there but exactly zero" in table
    row = next(line for line in table.splitlines() if line.startswith("branch.weight "))
    assert "5/5" in row and "zero (every measured step)" in row and HINTS[ZERO] in row
    # the file round-trips, and the CLI's reader accepts it
    again = GradReport.load(report.save(tmp_path))
    assert again.zero == report.zero and again.params["branch.bias"].zero_steps == 5


def test_a_dead_relu_layer_stops_everything_below_it(make_trainer):
    guard, _ = fit(make_trainer, DeadReLUConvNet(), regression_loader(4), summary=False)
    report = guard.report()
    # no unit of conv1 ever activates: conv1 gets zeros, and so does conv2's weight (its input is all zeros);
    # conv2's bias and the head still learn
    assert report.zero == ["conv1.weight", "conv1.bias", "conv2.weight"]
    assert {n: (p.measured_steps, p.zero_steps) for n, p in report.params.items()} == {
        "conv1.weight": (4, 4), "conv1.bias": (4, 4), "conv2.weight": (4, 4),
        "conv2.bias": (4, 0), "head.weight": (4, 0), "head.bias": (4, 0),
    }


def test_a_recurrent_encoder_behind_a_gate_left_at_zero(make_trainer):
    guard, _ = fit(make_trainer, GatedGRU(train_gate=False), token_loader(4, seq=5, vocab=VOCAB), summary=False)
    report = guard.report()
    assert report.zero == ["rnn.weight_ih_l0", "rnn.weight_hh_l0", "rnn.bias_ih_l0", "rnn.bias_hh_l0"]
    assert "gate" not in report.params  # frozen: not checked


def test_watch_finds_zero_gradients_in_a_plain_loop():
    torch.manual_seed(0)
    model = nn.ModuleDict({"trunk": nn.Linear(IN_DIM, 8), "branch": nn.Linear(8, 1), "head": nn.Linear(8, 1)})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = watch(model, optimizer, summary=False)
    for x, y in regression_loader(3):
        optimizer.zero_grad()
        h = model["trunk"](x)
        F.mse_loss(model["head"](h) + 0.0 * model["branch"](h), y).backward()
        optimizer.step()
    report = guard.close()
    assert report.zero == ["branch.weight", "branch.bias"]
    assert report.params["branch.weight"].zero_steps == report.params["branch.weight"].measured_steps == 3


def test_a_parameter_with_no_elements_is_not_zero_everywhere():
    """A zero-size parameter (no extra tokens configured: ``nn.Parameter(torch.zeros(0, d))``) has nothing to
    measure: it is checked for a gradient, but never counted as all-zero."""

    class WithoutExtraTokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.extra_tokens = nn.Parameter(torch.zeros(0, IN_DIM))
            self.head = nn.Linear(IN_DIM, 1)

        def forward(self, x: Tensor) -> Tensor:
            return self.head(torch.cat([self.extra_tokens, x]))

    torch.manual_seed(0)
    model = WithoutExtraTokens()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = watch(model, optimizer, summary=False, log_every_n_steps=1)
    for x, y in regression_loader(3):
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
        optimizer.step()
    report = guard.close()
    assert report.ok and report.zero == []
    tokens = report.params["extra_tokens"]
    assert (tokens.steps, tokens.none_steps, tokens.measured_steps, tokens.zero_steps) == (3, 0, 0, 0)
    assert report.params["head.weight"].measured_steps == 3


def test_zero_params_is_logged_and_charted(make_trainer, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    guard = GradGuard(summary=False)
    logger = TensorBoardLogger(tmp_path, name="tb")
    make_trainer(callbacks=[guard], logger=[logger, CSVLogger(tmp_path, name="csv")], log_every_n_steps=2).fit(
        MaskedBranchMLP(), regression_loader(5)
    )
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    values = [e.value for e in events.Scalars("gradguard/zero_params")]
    assert values == [2.0, 2.0]  # steps 2 and 4: the branch's weight and bias, at that step
    layout = events.Tensors("custom_scalars__config__")
    assert layout and b"gradguard/zero_params" in layout[0].tensor_proto.string_val[0]
    csv_text = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text()
    assert "gradguard/zero_params" in csv_text.splitlines()[0]


def test_zero_counts_survive_a_checkpoint(make_trainer, tmp_path):
    guard = GradGuard(summary=False)
    make_trainer(callbacks=[guard], max_epochs=1, enable_checkpointing=True, default_root_dir=tmp_path).fit(
        MaskedBranchMLP(), regression_loader(3)
    )
    checkpoint = next(tmp_path.rglob("*.ckpt"))
    resumed = GradGuard(summary=False)
    make_trainer(callbacks=[resumed], max_epochs=2, enable_checkpointing=True, default_root_dir=tmp_path).fit(
        MaskedBranchMLP(), regression_loader(3), ckpt_path=checkpoint
    )
    p = resumed.report().params["branch.weight"]
    assert (p.steps, p.measured_steps, p.zero_steps) == (6, 6, 6)


# ------------------------------------------------------------------ healthy: silent
@pytest.mark.parametrize("model, loader", [
    (HealthyMLP(), regression_loader(4)),
    (PaddingEmbeddingModel(), token_loader(4)),
])
def test_healthy_models_and_padding_rows_stay_silent(make_trainer, model, loader):
    guard, messages = fit(make_trainer, model, loader)
    report = guard.report()
    assert report.zero == [] and report.ok and messages == []
    assert all(p.zero_steps == 0 and p.measured_steps == 4 for p in report.params.values())


def test_a_zero_initialised_gate_that_trains_is_zero_once_then_silent(make_trainer):
    guard, messages = fit(make_trainer, GatedGRU(train_gate=True), token_loader(4, seq=5, vocab=VOCAB))
    report = guard.report()
    # at the first step the gate is still zero, so the encoder's gradient is; the gate moves and it learns
    assert report.params["rnn.weight_ih_l0"].zero_steps == 1
    assert report.params["rnn.weight_ih_l0"].measured_steps == 4
    assert report.zero == [] and report.ok and messages == []


def test_one_zero_step_is_not_a_finding(make_trainer):
    guard, _ = fit(make_trainer, MaskedBranchMLP(), regression_loader(1), summary=False)
    report = guard.report()
    assert report.params["branch.weight"].zero_steps == report.params["branch.weight"].measured_steps == 1
    assert report.zero == [] and report.ok
    assert report.summary().endswith(
        "; the gradient of branch.weight, branch.bias was zero everywhere at the one measured step (normal at the "
        "first step behind a zero-initialised gate; a dead branch if it lasts)"
    )


class SparseAndExperts(LightningModule):
    """A sparse embedding and four experts mixed by a hard top-1 gate: every expert is chosen now and then."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 4, sparse=True)
        self.experts = nn.ModuleList(nn.Linear(4, 4) for _ in range(4))
        self.router = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def training_step(self, batch, batch_idx: int) -> Tensor:
        tokens, labels = batch
        h = self.embed(tokens).mean(dim=1)
        chosen = F.one_hot(torch.tensor([batch_idx % 4] * len(h)), 4).float()  # expert k at batches k, k+4, ...
        weights = chosen * self.router(h).softmax(-1)
        h = sum(weights[:, k : k + 1] * expert(h) for k, expert in enumerate(self.experts))
        return F.cross_entropy(self.head(h), labels)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)  # plain SGD takes sparse gradients


def test_sparse_embeddings_and_occasionally_chosen_experts_stay_silent(make_trainer):
    guard, messages = fit(make_trainer, SparseAndExperts(), token_loader(8, seq=5, vocab=VOCAB))
    report = guard.report()
    # each expert: zero at the 6 of 8 steps that did not choose it, a gradient at the other 2
    assert {n: p.zero_steps for n, p in report.params.items() if n.startswith("experts.0")} == {
        "experts.0.weight": 6, "experts.0.bias": 6,
    }
    assert report.params["embed.weight"].zero_steps == 0
    assert report.zero == [] and report.ok and messages == []


def test_a_wgan_critic_output_bias_is_zero_and_the_explanation_names_the_cancellation():
    # D(fake).mean() - D(real).mean() does not depend on the critic's output bias: its gradient is exactly zero
    torch.manual_seed(0)
    critic = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.LeakyReLU(0.2), torch.nn.Linear(8, 1))
    optimizer = torch.optim.SGD(critic.parameters(), lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        guard = watch(critic, optimizer, summary=False)
        for _ in range(3):
            (critic(torch.randn(8, 2)).mean() - critic(torch.randn(8, 2) + 1).mean()).backward()
            optimizer.step()
            optimizer.zero_grad()
        report = guard.close()
    assert [name for name, p in report.params.items() if p.cause == "zero"] == ["2.bias"]
    assert "cancels out" in report.params["2.bias"].detail
    assert watch_allows(critic)


def watch_allows(critic) -> bool:
    """``allow_none`` silences it, as the explanation says."""
    optimizer = torch.optim.SGD(critic.parameters(), lr=1e-3)
    guard = watch(critic, optimizer, summary=False, allow_none="2.bias")
    for _ in range(3):
        (critic(torch.randn(8, 2)).mean() - critic(torch.randn(8, 2) + 1).mean()).backward()
        optimizer.step()
        optimizer.zero_grad()
    return guard.close().ok
