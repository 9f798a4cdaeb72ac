"""check_gradients and assert_gradients_flow: the check before training, for unit tests and notebooks.

Each problem is planted in two architectures and the report must name exactly the planted parameters with their
cause (and the line, where there is one): a layer never called (MLP, transformer), a ``.detach()`` (CNN, LSTM), a
``torch.no_grad()`` block (MLP, CNN), an unregistered tensor (a plain list, a plain tensor), a parameter the given
optimizer leaves out (MLP, transformer). Healthy models report nothing. LightningModules run their own
``training_step`` (automatic and manual optimization), Hugging Face-style models their dict or dataclass output.
The model is left exactly as it was found, also when its forward raises.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint as checkpoint
from diagnosis_helpers import assert_clean, assert_flagged, instruments_removed, planted_at
from models import ClearedManualModel, HealthyMLP, ManualGAN, SkipBatchesMLP, UnusedLayerMLP, _Net
from test_docs import ROOT, python_blocks
from torch import Tensor, nn

from lightning_gradguard import assert_gradients_flow, check_gradients

IN, HIDDEN, VOCAB, SEQ = 4, 8, 11, 5
LSTM_WEIGHTS = {f"lstm.{kind}_{gate}_l0" for kind in ("weight", "bias") for gate in ("ih", "hh")}


def x_batch() -> Tensor:
    return torch.randn(3, IN, generator=torch.Generator().manual_seed(0))


def image_batch() -> Tensor:
    return torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(0))


def sequence_batch() -> Tensor:
    return torch.randn(2, SEQ, IN, generator=torch.Generator().manual_seed(0))


def token_batch() -> Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))


def pair(prefix: str) -> set[str]:
    return {f"{prefix}.weight", f"{prefix}.bias"}


# ====================================================================== healthy models
class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Dropout(0.1), nn.Linear(HIDDEN, 1))

    def forward(self, x):
        return self.net(x)


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU())
        self.head = nn.Linear(3 * 4 * 4, 2)

    def forward(self, x):
        return self.head(self.stem(x).flatten(1))


class LSTMModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(IN, HIDDEN, batch_first=True)
        self.head = nn.Linear(HIDDEN, 1)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


class Transformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.encoder = nn.TransformerEncoderLayer(HIDDEN, nhead=2, dim_feedforward=16, dropout=0.1, batch_first=True)
        self.head = nn.Linear(HIDDEN, 2)

    def forward(self, tokens):
        return self.head(self.encoder(self.embed(tokens)).mean(dim=1))


@pytest.mark.parametrize(
    ("model_cls", "batch"),
    [(MLP, x_batch), (CNN, image_batch), (LSTMModel, sequence_batch), (Transformer, token_batch)],
    ids=["mlp", "cnn", "lstm", "transformer"],
)
def test_healthy_models_report_nothing(model_cls, batch):
    model = model_cls()
    report = assert_gradients_flow(model, batch())
    assert_clean(report)
    assert report.ok and report.steps == 1 and report.micro_batches == 1
    assert set(report.params) == {name for name, p in model.named_parameters()}
    assert "all" in report.summary() and "received a gradient" in report.summary()
    assert instruments_removed(model)


# ====================================================================== unused
class MLPUnusedLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(IN, HIDDEN)
        self.skip = nn.Linear(HIDDEN, HIDDEN)  # planted: never called
        self.l2 = nn.Linear(HIDDEN, 1)

    def forward(self, x):
        return self.l2(torch.relu(self.l1(x)))


class TransformerUnusedHead(Transformer):
    def __init__(self) -> None:
        super().__init__()
        self.aux_head = nn.Linear(HIDDEN, VOCAB)  # planted: on a branch never taken

    def forward(self, tokens, predict_tokens: bool = False):
        h = self.encoder(self.embed(tokens))
        if predict_tokens:
            return self.aux_head(h)
        return self.head(h.mean(dim=1))


def test_unused_layer_of_an_mlp():
    report = check_gradients(MLPUnusedLayer(), x_batch())
    assert_flagged(report, pair("skip"), "unused", planted_at(MLPUnusedLayer.__init__, "self.skip ="))


def test_unused_head_of_a_transformer():
    report = check_gradients(TransformerUnusedHead(), token_batch())
    assert_flagged(report, pair("aux_head"), "unused", planted_at(TransformerUnusedHead.__init__, "self.aux_head ="))


def test_allow_none_silences_an_optional_layer():
    report = assert_gradients_flow(MLPUnusedLayer(), x_batch(), allow_none="skip.*")
    assert report.ok and "skip.weight" not in report.params and "l1.weight" in report.params


# ====================================================================== detached
class CNNDetachedStem(CNN):
    def forward(self, x):
        features = self.stem(x).flatten(1).detach()  # planted
        return self.head(features)


class LSTMDetachedStates(LSTMModel):
    def forward(self, x):
        out, _ = self.lstm(x)
        last = out[:, -1].detach()  # planted
        return self.head(last)


def test_detached_stem_of_a_cnn():
    report = check_gradients(CNNDetachedStem(), image_batch())
    stem = pair("stem.0") | pair("stem.1")
    assert_flagged(report, stem, "detached", planted_at(CNNDetachedStem.forward, ".detach()"))


def test_detached_states_of_an_lstm():
    report = check_gradients(LSTMDetachedStates(), sequence_batch())
    assert_flagged(report, LSTM_WEIGHTS, "detached", planted_at(LSTMDetachedStates.forward, ".detach()"))


def test_a_loss_without_history_is_diagnosed_not_refused():
    model = MLP()
    report = check_gradients(model, x_batch(), loss_fn=lambda out: out.sum().item())  # planted: .item()
    where = planted_at(test_a_loss_without_history_is_diagnosed_not_refused, ".item()")
    assert_flagged(report, pair("net.0") | pair("net.3"), "detached", where)


# ====================================================================== no_grad
class MLPNoGrad(MLPUnusedLayer):
    def forward(self, x):
        with torch.no_grad():  # planted
            h = torch.relu(self.l1(x))
        return self.l2(self.skip(h))


class CNNNoGradStem(CNN):
    def forward(self, x):
        with torch.no_grad():  # planted
            features = self.stem(x)
        return self.head(features.flatten(1))


def test_no_grad_block_of_an_mlp():
    report = check_gradients(MLPNoGrad(), x_batch())
    assert_flagged(report, pair("l1"), "no_grad", planted_at(MLPNoGrad.forward, "with torch.no_grad()"))


def test_no_grad_block_of_a_cnn():
    report = check_gradients(CNNNoGradStem(), image_batch())
    where = planted_at(CNNNoGradStem.forward, "with torch.no_grad()")
    assert_flagged(report, pair("stem.0") | pair("stem.1"), "no_grad", where)


class FrozenEmbeddingReentrantCheckpoint(Transformer):
    """The classic of Hugging Face fine-tuning: frozen embeddings feeding a reentrant checkpoint segment."""

    def __init__(self) -> None:
        super().__init__()
        self.embed.requires_grad_(False)

    def forward(self, tokens):
        h = checkpoint.checkpoint(self.encoder, self.embed(tokens), use_reentrant=True)  # planted
        return self.head(h.mean(dim=1))


def test_reentrant_checkpoint_over_frozen_embeddings():
    with pytest.warns(UserWarning, match="None of the inputs have requires_grad=True"):  # torch's own hint
        report = check_gradients(FrozenEmbeddingReentrantCheckpoint(), token_batch())
    encoder = {name for name, _ in Transformer().named_parameters() if name.startswith("encoder.")}
    where = planted_at(FrozenEmbeddingReentrantCheckpoint.forward, "checkpoint.checkpoint(")
    assert_flagged(report, encoder, "no_grad", where)
    assert "use_reentrant=False" in report.params["encoder.linear1.weight"].detail


# ====================================================================== static findings
class MLPPlainList(MLP):
    def __init__(self) -> None:
        super().__init__()
        self.adapters = [nn.Linear(1, 1)]  # planted: a plain list, not an nn.ModuleList

    def forward(self, x):
        return self.adapters[0](self.net(x))


class CNNPlainTensor(CNN):
    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.ones(2, requires_grad=True)  # planted: not an nn.Parameter

    def forward(self, x):
        return super().forward(x) * self.scale


@pytest.mark.parametrize(
    ("model_cls", "batch", "name", "fix"),
    [(MLPPlainList, x_batch, "adapters", "nn.ModuleList"), (CNNPlainTensor, image_batch, "scale", "nn.Parameter")],
    ids=["plain-list", "plain-tensor"],
)
def test_unregistered_tensors_are_findings(model_cls, batch, name, fix):
    model = model_cls()
    report = check_gradients(model, batch())
    assert [(f.kind, f.name) for f in report.findings] == [("unregistered", name)]
    assert fix in report.findings[0].detail
    assert report.missing == [] and not report.ok
    hidden = model.adapters[0].weight if name == "adapters" else model.scale
    assert hidden.grad is None  # the backward pass gave it one; it is put back as it was


def test_parameters_the_optimizer_leaves_out_are_findings():
    mlp = MLPUnusedLayer()
    report = check_gradients(mlp, x_batch(), optimizer=torch.optim.SGD(mlp.l1.parameters(), lr=0.1),
                             allow_none="skip.*")
    assert [(f.kind, f.name) for f in report.findings] == [("not_in_optimizer", "l2")]
    transformer = Transformer()
    without_embedding = [p for name, p in transformer.named_parameters() if not name.startswith("embed.")]
    optimizers = [torch.optim.SGD(without_embedding[:2], lr=0.1), torch.optim.Adam(without_embedding[2:])]
    report = check_gradients(transformer, token_batch(), optimizer=optimizers)
    assert [(f.kind, f.name) for f in report.findings] == [("not_in_optimizer", "embed.weight")]
    assert report.missing == []
    assert check_gradients(transformer, token_batch()).findings == []  # no optimizer given: not checked


def test_an_optimizer_built_for_another_instance_of_the_model_is_refused():
    """The model re-created after its optimizer was built: the optimizer trains none of it, which must not pass as
    "nothing left out" (watch() refuses it the same way)."""
    stale = torch.optim.SGD(MLPUnusedLayer().parameters(), lr=0.1)
    with pytest.raises(ValueError, match="`optimizer` holds no trainable parameter of `model`"):
        check_gradients(MLPUnusedLayer(), x_batch(), optimizer=stale, allow_none="skip.*")
    with pytest.raises(ValueError, match="`optimizer` holds no trainable parameter of `model`"):
        assert_gradients_flow(MLPUnusedLayer(), x_batch(), optimizer=[stale], allow_none="skip.*")


# ====================================================================== LightningModule
def regression_batch() -> list[Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, IN, generator=g), torch.randn(2, 1, generator=g)]  # as a DataLoader yields it


class LoggingMLP(HealthyMLP):
    """Uses what a training_step commonly touches: self.log, self.trainer.global_step, self.current_epoch."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", loss, prog_bar=True)
        self.log_dict({"step": float(self.trainer.global_step), "epoch": float(self.current_epoch)})
        return {"loss": loss}


def test_lightning_module_automatic_optimization():
    report = check_gradients(UnusedLayerMLP(), regression_batch())
    assert_flagged(report, pair("unused"), "unused", planted_at(UnusedLayerMLP.__init__, "self.unused ="))
    model = LoggingMLP()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "self.log without a Trainer" warning, no GradGuard warning
        assert_clean(assert_gradients_flow(model, regression_batch()))
    assert model.fabric is None and model._fabric_optimizers == []


def test_lightning_module_manual_optimization_checks_each_step_and_takes_none():
    model = ManualGAN(toggle=True)
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    report = assert_gradients_flow(model, regression_batch())
    assert report.steps == 2 and report.micro_batches == 2  # one check per optimizer step, one per backward
    assert set(report.params) == set(weights)
    assert all(torch.equal(p, weights[name]) for name, p in model.named_parameters())  # no step was taken
    assert all(p.requires_grad for p in model.parameters())  # toggle_optimizer's changes undone
    assert model.fabric is None and model._fabric_optimizers == []
    with pytest.raises(RuntimeError, match="not attached to a `Trainer`"):
        model.optimizers()  # as before the call

    planted = check_gradients(ManualGAN(toggle=False, unused_in="generator"), regression_batch())
    assert_flagged(planted, pair("generator.unused"), "unused", planted_at(_Net.__init__, "self.unused ="))
    toggled = check_gradients(ManualGAN(toggle=True, unused_in="discriminator"), regression_batch())
    assert toggled.missing == ["discriminator.unused.weight", "discriminator.unused.bias"]


def test_manual_optimization_zero_grad_between_backward_and_step():
    report = check_gradients(ClearedManualModel(clear_batches={0}), regression_batch())
    assert report.missing == ["l1.weight", "l1.bias", "l2.weight", "l2.bias"]
    assert {p.cause for p in report.params.values()} == {"cleared"}


def test_manual_optimization_step_without_backward():
    report = check_gradients(ClearedManualModel(step_without_backward={0}), regression_batch())
    assert report.missing == ["l1.weight", "l1.bias", "l2.weight", "l2.bias"] and report.micro_batches == 0
    assert {p.cause for p in report.params.values()} == {"no_backward"}


class ManualNoStep(ClearedManualModel):
    """Accumulates: a backward pass on every batch, an optimizer step only on every second one (none on batch 0)."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.manual_backward(F.mse_loss(self.l2(torch.relu(self.l1(x))), y))
        if batch_idx % 2 == 1:
            self.optimizers().step()


class ManualNeedsTrainer(ClearedManualModel):
    def configure_optimizers(self):
        steps = self.trainer.estimated_stepping_batches  # needs a Trainer
        return torch.optim.SGD(self.parameters(), lr=0.1 / steps)


def test_manual_optimization_without_a_step_checks_every_parameter():
    report = check_gradients(ManualNoStep(), regression_batch())
    assert_clean(report)
    assert report.steps == 1 and set(report.params) == pair("l1") | pair("l2")


def test_manual_optimization_optimizers_from_the_argument_when_configure_optimizers_needs_a_trainer():
    model = ManualNeedsTrainer()
    with pytest.raises(RuntimeError, match=r"configure_optimizers\(\).*optimizer=\[\.\.\.\]"):
        check_gradients(model, regression_batch())
    assert model.fabric is None
    report = check_gradients(model, regression_batch(), optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    assert_clean(report)


def test_training_step_returning_none_is_refused_clearly():
    with pytest.raises(ValueError, match="training_step returned None"):
        check_gradients(SkipBatchesMLP(skip_batches={0}), regression_batch())


def test_pytorch_lightning_namespace():
    import pytorch_lightning as pl

    class Model(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = nn.Linear(IN, 1), nn.Linear(IN, 1)

        def training_step(self, batch, batch_idx):
            self.log("loss", 0.0)
            return self.used(batch[0]).sum()

    report = check_gradients(Model(), regression_batch())
    assert_flagged(report, pair("unused"), "unused")


# ====================================================================== Hugging Face-style outputs
@dataclass
class TinyOutput:
    """What a Hugging Face model returns (a ``ModelOutput``): the loss when labels are given, and the logits."""

    loss: Optional[Tensor] = None
    logits: Optional[Tensor] = None
    aux_logits: Optional[Tensor] = None


class TinyLM(nn.Module):
    """Called with keyword arguments, like a Hugging Face model; ``aux`` feeds an output the loss never uses."""

    def __init__(self, as_dict: bool = False) -> None:
        super().__init__()
        self.as_dict = as_dict
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.lm_head = nn.Linear(HIDDEN, VOCAB)
        self.aux = nn.Linear(HIDDEN, 2)

    def forward(self, input_ids, labels=None):
        h = self.embed(input_ids)
        logits = self.lm_head(h)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten()) if labels is not None else None
        out = TinyOutput(loss=loss, logits=logits, aux_logits=self.aux(h))
        return dict(vars(out)) if self.as_dict else out


@pytest.mark.parametrize("as_dict", [False, True], ids=["dataclass", "dict"])
def test_hugging_face_style_outputs(as_dict):
    tokens = token_batch()
    report = check_gradients(TinyLM(as_dict), {"input_ids": tokens, "labels": tokens})  # model(**batch).loss
    assert_flagged(report, pair("aux"), "unused")
    assert "never reached the loss" in report.params["aux.weight"].detail
    assert_clean(check_gradients(TinyLM(as_dict), {"input_ids": tokens}))  # no loss: every output counts


def test_how_a_batch_is_passed():
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(IN, 1), nn.Linear(IN, 1)

        def forward(self, x, other=None):
            if isinstance(x, (list, dict)):  # the whole list or dict as one argument
                x, other = (x[0], x[1]) if isinstance(x, list) else (x["x"], x["other"])
            return self.a(x) + (self.b(other) if other is not None else 0)

    x = x_batch()
    assert check_gradients(TwoInputs(), x).missing == ["b.weight", "b.bias"]  # model(x)
    assert check_gradients(TwoInputs(), (x, x)).ok  # model(x, x)
    assert check_gradients(TwoInputs(), [x, x]).ok  # model(x, x)
    assert check_gradients(TwoInputs(), {"x": x, "other": x}).ok  # model(x=x, other=x)
    assert check_gradients(TwoInputs(), ([x, x],)).ok  # model([x, x])
    assert check_gradients(TwoInputs(), ({"x": x, "other": x},)).ok  # model({...})


def test_non_finite_gradients_fail_the_assertion():
    class NaNModel(MLP):
        def forward(self, x):
            return self.net(x) * float("nan")

    with pytest.raises(AssertionError, match=r"non-finite \(NaN or Inf\) gradients in net.0.weight, net.0.bias"):
        assert_gradients_flow(NaNModel(), x_batch())


# ====================================================================== state restoration
class CNNWithDropout(CNN):
    def forward(self, x):
        return self.head(F.dropout(self.stem(x).flatten(1), 0.5, self.training))


def test_the_model_is_left_exactly_as_it_was():
    model = CNNWithDropout()
    model.head.weight.grad = torch.full_like(model.head.weight, 0.5)
    head_grad = model.head.weight.grad
    model.stem[0].bias.requires_grad_(False)  # frozen
    model.eval()
    model.stem[1].train()  # modes differ per module
    modes = {name: m.training for name, m in model.named_modules()}
    stats = {name: b.clone() for name, b in model.named_buffers()}
    x = image_batch().requires_grad_(True)
    rng = torch.get_rng_state()
    with torch.no_grad():
        report = check_gradients(model, x)
        assert not torch.is_grad_enabled()
    assert report.ok and "stem.0.bias" not in report.params
    assert model.head.weight.grad is head_grad and torch.equal(head_grad, torch.full_like(head_grad, 0.5))
    assert all(p.grad is None for name, p in model.named_parameters() if name != "head.weight")
    assert x.grad is None
    assert not model.stem[0].bias.requires_grad and model.stem[0].weight.requires_grad
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert all(torch.equal(b, stats[name]) for name, b in model.named_buffers())  # BatchNorm statistics
    assert torch.equal(torch.get_rng_state(), rng)
    assert instruments_removed(model)



def test_lazy_modules_are_materialized_like_a_dry_run_and_their_statistics_reset():
    """The check's forward gives lazy modules their shapes (the dry run PyTorch asks for before training); a lazy
    batch norm's statistics come back to their initial values, and a lazy module never called stays lazy."""

    class LazyNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.LazyLinear(8), nn.LazyBatchNorm1d(), nn.ReLU(), nn.LazyLinear(1))
            self.spare = nn.LazyLinear(2)

        def forward(self, x: Tensor) -> Tensor:
            return self.body(x)

    model = LazyNet()
    report = check_gradients(model, torch.randn(16, 4) + 3.0)
    assert set(report.missing) == {"spare.weight", "spare.bias"}
    assert report.params["spare.weight"].cause == "unused"
    norm = model.body[1]
    assert torch.equal(norm.running_mean, torch.zeros(8)) and torch.equal(norm.running_var, torch.ones(8))
    assert int(norm.num_batches_tracked) == 0
    assert model.body[0].weight.shape == (8, 4)
    assert isinstance(model.spare.weight, nn.parameter.UninitializedParameter)
    assert instruments_removed(model.body)  # `spare` keeps the hook that will give it its shape
    assert not model._forward_hooks and not model._forward_pre_hooks

class Boom(Exception):
    pass


class RaisingForward(MLP):
    def forward(self, x):
        self.net(x)
        self.error = Boom("the user's own error")
        raise self.error


class RaisingStep(HealthyMLP):
    def training_step(self, batch, batch_idx):
        self(batch[0])
        raise Boom("in training_step")


def test_a_forward_that_raises_propagates_unchanged_and_the_model_is_restored():
    model = RaisingForward()
    model.net[0].weight.grad = torch.ones_like(model.net[0].weight)
    grad = model.net[0].weight.grad
    model.eval()
    with pytest.raises(Boom) as raised:
        check_gradients(model, x_batch())
    assert raised.value is model.error
    assert model.net[0].weight.grad is grad and torch.equal(grad, torch.ones_like(grad))
    assert model.net[3].weight.grad is None and not model.training
    assert instruments_removed(model)
    lightning = RaisingStep()
    with pytest.raises(Boom, match="in training_step"):
        check_gradients(lightning, regression_batch())
    assert lightning.fabric is None and instruments_removed(lightning)


# ====================================================================== the assertion's message
def test_assert_gradients_flow_message():
    with pytest.raises(AssertionError) as raised:
        assert_gradients_flow(MLPUnusedLayer(), x_batch())
    lines = str(raised.value).splitlines()
    assert lines[0] == "GradGuard: 2 trainable parameters received no gradient at global step 0 (1 micro-batch in " \
                       "this window):"
    assert lines[1] == "  skip:"
    assert lines[2].startswith("    skip.weight, skip.bias  [unused] module `skip` (Linear), defined at "
                               f"{planted_at(MLPUnusedLayer.__init__, 'self.skip =')} in __init__")
    assert "Fix:" in lines[2]
    assert lines[-1] == "  (allow_none=[...] silences parameters that are legitimately unused)"
    with pytest.raises(AssertionError) as raised:
        assert_gradients_flow(CNNPlainTensor(), image_batch())
    message = str(raised.value)
    assert message.startswith("GradGuard found 1 problem in the training set-up:\n  [unregistered] scale: `scale` is")


# ====================================================================== bad arguments
class ReturnsNothing(MLP):
    def forward(self, x):
        self.net(x)
        return {"done": True}


@pytest.mark.parametrize(
    ("call", "error", "named"),
    [
        (lambda: check_gradients("model", x_batch()), TypeError, "`model`"),
        (lambda: check_gradients(MLP(), x_batch(), loss_fn="mse"), TypeError, "`loss_fn`"),
        (lambda: check_gradients(MLP(), x_batch(), optimizer="sgd"), TypeError, "`optimizer`"),
        (lambda: check_gradients(MLP(), x_batch(), optimizer=[None]), TypeError, "`optimizer`"),
        (lambda: check_gradients(MLP(), x_batch(), allow_none=3), TypeError, "`allow_none`"),
        (lambda: check_gradients(MLP().requires_grad_(False), x_batch()), ValueError, "`model`"),
        (lambda: check_gradients(HealthyMLP(), regression_batch(), loss_fn=sum), ValueError, "`loss_fn`"),
        (lambda: check_gradients(MLP(), x_batch(), loss_fn=lambda out: "loss"), TypeError, "`loss_fn`"),
        (lambda: check_gradients(ReturnsNothing(), x_batch()), TypeError, "loss_fn="),
    ],
    ids=["model", "loss_fn", "optimizer", "optimizer-list", "allow_none", "nothing-trainable",
         "loss_fn-for-lightning", "loss_fn-result", "output-without-tensor"],
)
def test_bad_arguments_are_named(call, error, named):
    with pytest.raises(error, match=re.escape(named)):
        call()


# ====================================================================== the documented example
def test_the_documented_pytest_example_passes_and_its_failure_is_the_one_shown(tmp_path: Path):
    page = ROOT / "docs" / "preflight.md"
    example = next(b for b in python_blocks(page) if b.runnable and "def test_" in b.code)
    (tmp_path / "test_gradients.py").write_text(example.code, encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_gradients.py"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0 and "2 passed" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]

    # the page's failure: a .detach() slipped into forward, on the line the page names
    broken = example.code.replace("features = self.body(x)", "features = self.body(x).detach()")
    assert broken != example.code
    (tmp_path / "test_gradients.py").write_text(broken, encoding="utf-8")
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 1 and "2 failed" in done.stdout, done.stdout[-3000:]
    text = page.read_text(encoding="utf-8")
    shown = text[text.index("```text", text.index("Run it with")) + len("```text"):]
    shown = shown[: shown.index("```")].strip().splitlines()
    assert len(shown) == 7
    for line in shown:
        assert line.strip() in done.stdout, (line, done.stdout[-3000:])
