"""Each cause of a missing gradient, planted in several architectures: the exact flagged set, cause and line.

``unused``: a layer never called (MLP, transformer), a parameter a running module never touches (CNN), a result
left out of the loss (LSTM). ``no_grad``: a ``torch.no_grad()`` block (LSTM, CNN), ``torch.inference_mode()``
(transformer), a reentrant checkpoint segment whose inputs need no grad (MLP, CNN). ``detached``: ``.detach()``
(LSTM, CNN), ``.data`` (transformer), an ``.item()`` round trip (MLP, embedding model), integer results:
``argmax`` (embedding model) and a comparison (CNN).
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.utils.checkpoint as checkpoint
from diagnosis_helpers import (
    HIDDEN,
    IN_DIM,
    SEQ,
    VOCAB,
    Classification,
    Regression,
    assert_flagged,
    fit,
    planted_at,
    regression_data,
    token_data,
)
from torch import nn

IMAGE = (1, 6, 6)
LSTM_ENCODER = {f"encoder.{kind}_{gate}_l0" for kind in ("weight", "bias") for gate in ("ih", "hh")}


def names(prefix: str, *suffixes: str) -> set[str]:
    return {f"{prefix}.{s}" for s in suffixes}


# ====================================================================== unused
class MLPUnusedLayer(Regression):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(IN_DIM, HIDDEN)
        self.skip = nn.Linear(HIDDEN, HIDDEN)  # planted: never called
        self.l2 = nn.Linear(HIDDEN, 1)

    def forward(self, x):
        return self.l2(torch.relu(self.l1(x)))


class TransformerUnusedHead(Classification):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.encoder = nn.TransformerEncoderLayer(HIDDEN, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(HIDDEN, 2)
        self.aux_head = nn.Linear(HIDDEN, VOCAB)  # planted: on a branch never taken

    def forward(self, tokens, predict_tokens: bool = False):
        h = self.encoder(self.embed(tokens))
        if predict_tokens:
            return self.aux_head(h)
        return self.head(h.mean(dim=1))


class ScaledConv(nn.Module):
    """A conv block with a learnable output scale its forward forgets to apply."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.scale = nn.Parameter(torch.ones(3, 1, 1))  # planted: the forward below never uses it

    def forward(self, x):
        return torch.relu(self.conv(x))


class CNNUntouchedParameter(Regression):
    def __init__(self) -> None:
        super().__init__()
        self.block = ScaledConv()
        self.head = nn.Linear(3 * 4 * 4, 1)

    def forward(self, x):
        return self.head(self.block(x).flatten(1))


class LSTMDiscardedResult(Regression):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(IN_DIM, HIDDEN, batch_first=True)
        self.aux = nn.Linear(HIDDEN, 1)
        self.head = nn.Linear(HIDDEN, 1)

    def forward(self, x):
        out, _ = self.lstm(x.unsqueeze(1).repeat(1, SEQ, 1))
        aux = self.aux(out[:, -1])  # planted: computed, then left out of the loss  # noqa: F841
        return self.head(out[:, -1])


class ScaleFunction(torch.autograd.Function):
    """A custom autograd Function: its forward always runs with autograd off, which is not a no_grad bug."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return x @ weight

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        return grad @ weight.t(), x.t() @ grad


class MLPCustomFunctionLeftOut(Regression):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Parameter(torch.randn(IN_DIM, 1))
        self.side = nn.Parameter(torch.randn(IN_DIM, 1))
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        side = ScaleFunction.apply(x, self.side)  # planted: computed, then left out of the loss  # noqa: F841
        return ScaleFunction.apply(x, self.proj) + self.bias


class NoGradientForWeight(torch.autograd.Function):
    """A custom autograd Function whose backward returns None for its weight: the classic silent bug."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(weight)
        return x @ weight

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return grad @ weight.t(), None  # planted: no gradient for the weight


class MLPCustomFunctionReturnsNone(Regression):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Parameter(torch.randn(IN_DIM, IN_DIM))
        self.head = nn.Linear(IN_DIM, 1)

    def forward(self, x):
        return self.head(NoGradientForWeight.apply(x, self.proj))


class MLPNewTensorCopy(Regression):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(IN_DIM, IN_DIM)
        self.head = nn.Linear(IN_DIM, 1)

    def forward(self, x):
        h = x.new_tensor(self.encoder(x))  # planted: a copy without history
        return self.head(h)


class EmbeddingMaxNormLeftOut(Classification):
    """``nn.Embedding(max_norm=...)`` renormalizes its rows under no_grad inside PyTorch: not the user's no_grad."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.side = nn.Embedding(VOCAB, HIDDEN, max_norm=1.0)
        self.classify = nn.Linear(HIDDEN, 2)

    def forward(self, tokens):
        side = self.side(tokens)  # planted: computed, then left out of the loss  # noqa: F841
        return self.classify(self.embed(tokens).mean(dim=1))


def test_unused_layer_in_an_mlp(tmp_path):
    report = fit(MLPUnusedLayer(), regression_data(), tmp_path)
    # no line cuts anything here: the detail points at where the layer is defined
    where = planted_at(MLPUnusedLayer.__init__, "self.skip =")
    assert_flagged(report, names("skip", "weight", "bias"), "unused", where)
    assert "module `skip` (Linear), defined at" in report.params["skip.weight"].detail
    assert "was never called in the forward pass" in report.params["skip.weight"].detail
    assert "allow_none" in report.params["skip.weight"].detail


def test_unused_head_in_a_transformer(tmp_path):
    report = fit(TransformerUnusedHead(), token_data(), tmp_path)
    where = planted_at(TransformerUnusedHead.__init__, "self.aux_head =")
    assert_flagged(report, names("aux_head", "weight", "bias"), "unused", where)
    assert "was never called in the forward pass" in report.params["aux_head.bias"].detail


def test_parameter_a_running_cnn_block_never_touches(tmp_path):
    report = fit(CNNUntouchedParameter(), regression_data(shape=IMAGE), tmp_path)
    assert_flagged(report, {"block.scale"}, "unused", planted_at(ScaledConv.__init__, "self.scale ="))
    assert "`block` (ScaledConv) ran, but its forward never used `block.scale`" in report.params["block.scale"].detail


class PromptBank(nn.Module):
    """Learned prompts in a ``ParameterList``: the forward indexes the list, it never calls it."""

    def __init__(self) -> None:
        super().__init__()
        self.prompts = nn.ParameterList([nn.Parameter(torch.randn(IN_DIM)) for _ in range(3)])

    def forward(self, x):
        return x + self.prompts[0] + self.prompts[1]  # planted: prompts[2] is never indexed


class MLPWithParameterContainers(Regression):
    def __init__(self) -> None:
        super().__init__()
        self.bank = PromptBank()
        self.scales = nn.ParameterDict({"used": nn.Parameter(torch.ones(1)), "spare": nn.Parameter(torch.ones(1))})
        self.head = nn.Linear(IN_DIM, 1)

    def forward(self, x):
        return self.head(self.bank(x)) * self.scales["used"]


def test_parameters_a_container_holds_are_charged_to_the_module_that_indexes_it(tmp_path):
    """``ParameterList``/``ParameterDict`` are never called: a parameter of theirs left unused is one the module
    holding them did not use, not a module that "was never called"."""
    report = fit(MLPWithParameterContainers(), regression_data(), tmp_path)
    assert_flagged(report, {"bank.prompts.2", "scales.spare"}, "unused")
    assert "module `bank` (PromptBank) ran, but its forward never used `bank.prompts.2`" in (
        report.params["bank.prompts.2"].detail
    )
    assert "the model (MLPWithParameterContainers) ran, but its forward never used `scales.spare`" in (
        report.params["scales.spare"].detail
    )
    assert all("never called" not in report.params[n].detail for n in ("bank.prompts.2", "scales.spare"))


def test_lstm_result_left_out_of_the_loss(tmp_path):
    report = fit(LSTMDiscardedResult(), regression_data(), tmp_path)
    assert_flagged(report, names("aux", "weight", "bias"), "unused")
    assert "never reached the loss" in report.params["aux.weight"].detail


# ====================================================================== no_grad
class LSTMEncoderUnderNoGrad(Regression):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.LSTM(IN_DIM, HIDDEN, batch_first=True)
        self.head = nn.Linear(HIDDEN, 1)

    def forward(self, x):
        with torch.no_grad():  # planted
            out, _ = self.encoder(x.unsqueeze(1).repeat(1, SEQ, 1))
        return self.head(out[:, -1])


class CNNStemUnderNoGrad(Regression):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
        self.body = nn.Conv2d(2, 2, 3, padding=1)
        self.head = nn.Linear(2 * 4 * 4, 1)

    def features(self, x):
        return self.stem(x)

    def forward(self, x):
        with torch.no_grad():  # planted: around a helper method, not the layer call itself
            h = self.features(x)
        return self.head(torch.relu(self.body(h)).flatten(1))


class TransformerUnderInferenceMode(Classification):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.encoder = nn.TransformerEncoderLayer(HIDDEN, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(HIDDEN, 2)

    def forward(self, tokens):
        with torch.inference_mode():  # planted
            h = self.encoder(self.embed(tokens))
        return self.head(h.clone().mean(dim=1))


class MLPReentrantCheckpoint(Regression):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(IN_DIM, HIDDEN), nn.Tanh())
        self.head = nn.Linear(HIDDEN, 1)

    def forward(self, x):
        h = checkpoint.checkpoint(self.block, x, use_reentrant=True)  # planted: x needs no grad
        return self.head(h)


class CNNReentrantCheckpoint(Regression):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 2, 3)
        self.head = nn.Linear(2 * 4 * 4, 1)

    def stem_fn(self, x):
        return torch.relu(self.stem(x))

    def forward(self, x):
        h = checkpoint.checkpoint(self.stem_fn, x, use_reentrant=True)  # planted: a user function inside
        return self.head(h.flatten(1))


class GateLeftOutInAReentrantCheckpoint(Regression):
    """The segment's input requires grad (the pitfall does not apply); a gate inside it is computed and dropped."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(IN_DIM, HIDDEN)
        self.body = nn.Linear(HIDDEN, HIDDEN)
        self.gate = nn.Linear(HIDDEN, HIDDEN)
        self.head = nn.Linear(HIDDEN, 1)

    def segment(self, h):
        gate = torch.sigmoid(self.gate(h))  # planted: computed, never applied
        del gate
        return torch.tanh(self.body(h))

    def forward(self, x):
        return self.head(checkpoint.checkpoint(self.segment, self.stem(x), use_reentrant=True))


def test_lstm_encoder_under_no_grad(tmp_path):
    report = fit(LSTMEncoderUnderNoGrad(), regression_data(), tmp_path)
    where = planted_at(LSTMEncoderUnderNoGrad.forward, "with torch.no_grad()")
    assert_flagged(report, LSTM_ENCODER, "no_grad", where)
    assert planted_at(LSTMEncoderUnderNoGrad.forward, "self.encoder(") in report.params["encoder.weight_ih_l0"].detail


def test_cnn_stem_under_no_grad_through_a_helper(tmp_path):
    report = fit(CNNStemUnderNoGrad(), regression_data(shape=IMAGE), tmp_path)
    where = planted_at(CNNStemUnderNoGrad.forward, "with torch.no_grad()")
    assert_flagged(report, names("stem.0", "weight", "bias"), "no_grad", where)


def test_transformer_under_inference_mode(tmp_path):
    report = fit(TransformerUnderInferenceMode(), token_data(), tmp_path)
    expected = {name for name, _ in TransformerUnderInferenceMode().named_parameters() if not name.startswith("head")}
    where = planted_at(TransformerUnderInferenceMode.forward, "with torch.inference_mode()")
    assert_flagged(report, expected, "no_grad", where)
    assert "inference_mode" in report.params["embed.weight"].detail


def test_mlp_reentrant_checkpoint_without_inputs_that_require_grad(tmp_path):
    report = fit(MLPReentrantCheckpoint(), regression_data(), tmp_path)
    where = planted_at(MLPReentrantCheckpoint.forward, "checkpoint.checkpoint(")
    assert_flagged(report, names("block.0", "weight", "bias"), "no_grad", where)
    assert "use_reentrant=False" in report.params["block.0.weight"].detail


def test_cnn_reentrant_checkpoint_of_a_user_function(tmp_path):
    report = fit(CNNReentrantCheckpoint(), regression_data(shape=IMAGE), tmp_path)
    where = planted_at(CNNReentrantCheckpoint.forward, "checkpoint.checkpoint(")
    assert_flagged(report, names("stem", "weight", "bias"), "no_grad", where)
    assert "reentrant torch.utils.checkpoint" in report.params["stem.bias"].detail


# ====================================================================== detached
class LSTMDetachedEncoder(Regression):
    """The seed article's real bug: an encoder-decoder whose encoder output is detached."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.LSTM(IN_DIM, HIDDEN, batch_first=True)
        self.decoder = nn.LSTM(HIDDEN, HIDDEN, batch_first=True)
        self.head = nn.Linear(HIDDEN, 1)

    def forward(self, x):
        states, _ = self.encoder(x.unsqueeze(1).repeat(1, SEQ, 1))
        states = states.detach()  # planted
        out, _ = self.decoder(states)
        return self.head(out[:, -1])


class CNNDetachedFeatures(Regression):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.head = nn.Linear(2 * 4 * 4, 1)

    def forward(self, x):
        h = torch.relu(self.conv(x)).flatten(1).detach()  # planted
        return self.head(h)


class TransformerThroughData(Classification):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.encoder = nn.TransformerEncoderLayer(HIDDEN, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(HIDDEN, 2)

    def forward(self, tokens):
        h = self.encoder(self.embed(tokens))
        pooled = h.mean(dim=1).data  # planted
        return self.head(pooled)


class MLPItemRoundTrip(Regression):
    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(IN_DIM, 1)
        self.body = nn.Linear(IN_DIM, 1)

    def forward(self, x):
        g = torch.tensor(torch.sigmoid(self.gate(x)).mean().item())  # planted
        return self.body(x) * g


class EmbeddingArgmaxFeedsLoss(Classification):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.pick = nn.Linear(HIDDEN, VOCAB)
        self.classify = nn.Embedding(VOCAB, 2)

    def forward(self, tokens):
        choice = self.pick(self.embed(tokens).mean(dim=1)).argmax(dim=-1)  # planted
        return self.classify(choice)


class EmbeddingItemRoundTrip(Classification):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.temperature = nn.Linear(HIDDEN, 1)
        self.classify = nn.Linear(HIDDEN, 2)

    def forward(self, tokens):
        h = self.embed(tokens).mean(dim=1)
        t = self.temperature(h).abs().mean().tolist()  # planted
        return self.classify(h) / (1.0 + torch.tensor(t))


class CNNComparisonMask(Regression):
    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Conv2d(1, 1, 3)
        self.conv = nn.Conv2d(1, 1, 3)
        self.head = nn.Linear(16, 1)

    def forward(self, x):
        mask = self.gate(x) > 0  # planted: a boolean mask carries no gradient into `gate`
        return self.head((self.conv(x) * mask).flatten(1))


def test_lstm_detached_encoder_output(tmp_path):
    report = fit(LSTMDetachedEncoder(), regression_data(), tmp_path)
    where = planted_at(LSTMDetachedEncoder.forward, "states.detach()")
    assert_flagged(report, LSTM_ENCODER, "detached", where)
    assert "`states = states.detach()`" in report.params["encoder.weight_hh_l0"].detail


def test_cnn_detached_features(tmp_path):
    report = fit(CNNDetachedFeatures(), regression_data(shape=IMAGE), tmp_path)
    where = planted_at(CNNDetachedFeatures.forward, ".detach()")
    assert_flagged(report, names("conv", "weight", "bias"), "detached", where)


def test_transformer_through_dot_data(tmp_path):
    report = fit(TransformerThroughData(), token_data(), tmp_path)
    expected = {name for name, _ in TransformerThroughData().named_parameters() if not name.startswith("head")}
    where = planted_at(TransformerThroughData.forward, ".data")
    assert_flagged(report, expected, "detached", where)
    assert ".data returns" in report.params["embed.weight"].detail


def test_mlp_item_round_trip(tmp_path):
    report = fit(MLPItemRoundTrip(), regression_data(), tmp_path)
    where = planted_at(MLPItemRoundTrip.forward, ".item()")
    assert_flagged(report, names("gate", "weight", "bias"), "detached", where)
    assert ".item() turns it into a Python number" in report.params["gate.weight"].detail


def test_embedding_model_argmax_feeds_the_loss(tmp_path):
    report = fit(EmbeddingArgmaxFeedsLoss(), token_data(), tmp_path)
    where = planted_at(EmbeddingArgmaxFeedsLoss.forward, ".argmax(")
    assert_flagged(report, {"embed.weight", "pick.weight", "pick.bias"}, "detached", where)
    assert "`argmax` returns an integer" in report.params["pick.weight"].detail


def test_embedding_model_tolist_round_trip(tmp_path):
    report = fit(EmbeddingItemRoundTrip(), token_data(), tmp_path)
    where = planted_at(EmbeddingItemRoundTrip.forward, ".tolist()")
    assert_flagged(report, names("temperature", "weight", "bias"), "detached", where)


def test_cnn_comparison_mask(tmp_path):
    report = fit(CNNComparisonMask(), regression_data(shape=IMAGE), tmp_path)
    where = planted_at(CNNComparisonMask.forward, "> 0")
    assert_flagged(report, names("gate", "weight", "bias"), "detached", where)
    assert "integer or boolean" in report.params["gate.bias"].detail


# ====================================================================== several causes in one model
class SeveralBugs(Regression):
    """One model, three bugs: each parameter gets its own cause and line."""

    def __init__(self) -> None:
        super().__init__()
        self.never = nn.Linear(IN_DIM, 1)
        self.frozen_by_mistake = nn.Linear(IN_DIM, 1)
        self.cut = nn.Linear(IN_DIM, 1)
        self.ok = nn.Linear(IN_DIM, 1)

    def forward(self, x):
        with torch.no_grad():
            a = self.frozen_by_mistake(x)
        b = self.cut(x).detach()
        return self.ok(x) + a + b


def test_each_parameter_gets_its_own_cause_and_line(tmp_path, recwarn):
    report = fit(SeveralBugs(), regression_data(), tmp_path)
    causes = {name: report.params[name].cause for name in report.missing}
    assert causes == {
        "never.weight": "unused", "never.bias": "unused",
        "frozen_by_mistake.weight": "no_grad", "frozen_by_mistake.bias": "no_grad",
        "cut.weight": "detached", "cut.bias": "detached",
    }  # fmt: skip
    assert planted_at(SeveralBugs.forward, "with torch.no_grad()") in report.params["frozen_by_mistake.weight"].detail
    assert planted_at(SeveralBugs.forward, ".detach()") in report.params["cut.bias"].detail
    # the first-step warning already carries the causes
    warning = next(str(w.message) for w in recwarn if str(w.message).startswith("GradGuard: 6 trainable"))
    assert "[no_grad]" in warning and "[detached]" in warning and "[unused]" in warning


def test_custom_autograd_function_result_left_out_is_unused_not_no_grad(tmp_path):
    report = fit(MLPCustomFunctionLeftOut(), regression_data(), tmp_path)
    assert_flagged(report, {"side"}, "unused")
    assert "never reached the loss" in report.params["side"].detail


def test_custom_autograd_function_that_returns_none_is_named(tmp_path):
    report = fit(MLPCustomFunctionReturnsNone(), regression_data(), tmp_path)
    assert_flagged(report, {"proj"}, "detached")
    detail = report.params["proj"].detail
    assert "the backward pass reached it, but its gradient came back None from `NoGradientForWeightBackward`" in detail
    assert "custom torch.autograd.Function `NoGradientForWeight` returns None for this input" in detail
    assert "never reached the loss" not in detail


def test_a_new_tensor_copy_is_a_cut(tmp_path, recwarn):
    report = fit(MLPNewTensorCopy(), regression_data(), tmp_path)
    where = planted_at(MLPNewTensorCopy.forward, "new_tensor(")
    assert_flagged(report, names("encoder", "weight", "bias"), "detached", where)
    assert "`new_tensor` returns a result without autograd history" in report.params["encoder.weight"].detail


def test_embedding_with_max_norm_left_out_is_unused_not_no_grad(tmp_path):
    report = fit(EmbeddingMaxNormLeftOut(), token_data(), tmp_path)
    assert_flagged(report, {"side.weight"}, "unused")
    assert "never reached the loss" in report.params["side.weight"].detail


def test_a_reentrant_checkpoint_whose_input_requires_grad_is_not_blamed(tmp_path):
    """Reentrant segments run their forward without autograd whatever their inputs: only a segment none of whose
    inputs requires grad cuts its parameters off, so only that one may be named as the cause."""
    report = fit(GateLeftOutInAReentrantCheckpoint(), regression_data(), tmp_path)
    assert sorted(report.missing) == ["gate.bias", "gate.weight"]
    detail = report.params["gate.weight"].detail
    assert report.params["gate.weight"].cause == "unused"
    assert "reentrant" not in detail and "use_reentrant" not in detail
    assert "never reached the loss" in detail
    assert report.params["body.weight"].none_steps == 0


class ActorCriticRollout(Regression):
    """An RL step: a rollout under ``torch.no_grad()`` (old values for the advantage), then the training forward,
    whose value loss is planted detached (or left out): the rollout's no_grad is not the cause."""

    def __init__(self, bug: str) -> None:
        super().__init__()
        self.bug = bug
        self.actor = nn.Linear(IN_DIM, 1)
        self.critic = nn.Linear(IN_DIM, 1)

    def forward(self, x):
        return self.actor(x), self.critic(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        with torch.no_grad():
            _, old_values = self(x)
        action, values = self(x)
        policy_loss = torch.nn.functional.mse_loss(action, y - old_values)
        if self.bug == "unused":  # planted: the value loss is left out
            return policy_loss
        value_loss = torch.nn.functional.mse_loss(values.detach(), y)  # planted: the critic's loss is cut
        return policy_loss + value_loss


@pytest.mark.parametrize("bug", ["detached", "unused"])
def test_a_rollout_under_no_grad_is_not_blamed_for_a_later_cut(tmp_path, bug):
    report = fit(ActorCriticRollout(bug), regression_data(), tmp_path)
    critic = names("critic", "weight", "bias")
    where = planted_at(ActorCriticRollout.training_step, "values.detach()") if bug == "detached" else None
    assert_flagged(report, critic, bug, where)
    assert "no_grad" not in report.params["critic.weight"].detail


class ReentrantSegmentThenDetach(Regression):
    """A reentrant checkpoint segment whose input requires grad, its output then cut by ``.detach()``: the segment's
    parameters sit behind that cut (as without checkpointing), though the graph holds only the segment's node."""

    def __init__(self, call: str) -> None:
        super().__init__()
        self.call = call
        self.stem = nn.Linear(IN_DIM, HIDDEN)
        self.block = nn.Sequential(nn.Linear(HIDDEN, HIDDEN), nn.Tanh())
        self.head = nn.Linear(HIDDEN, 1)

    def forward(self, x):
        h = self.stem(x)
        if self.call == "module":
            h = checkpoint.checkpoint(self.block, h, use_reentrant=True)
        else:  # as Hugging Face's layers call it: the unbound forward, the module as first argument
            h = checkpoint.checkpoint(functools.partial(nn.Sequential.forward, self.block), h, use_reentrant=True)
        h = h.detach()  # planted
        return self.head(h)


@pytest.mark.parametrize("call", ["module", "partial"])
def test_a_reentrant_segment_behind_a_later_cut_is_named_with_that_cut(tmp_path, call):
    report = fit(ReentrantSegmentThenDetach(call), regression_data(), tmp_path)
    where = planted_at(ReentrantSegmentThenDetach.forward, "h.detach()")
    assert_flagged(report, names("stem", "weight", "bias") | names("block.0", "weight", "bias"), "detached", where)


class HeadUnderNoGrad(Regression):
    """The encoder runs with autograd on; the pooler ran once with autograd on (its result discarded, as a library's
    model does) and then, planted, under ``torch.no_grad()`` feeding the head."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(IN_DIM, HIDDEN)
        self.pooler = nn.Linear(HIDDEN, HIDDEN)
        self.head = nn.Linear(HIDDEN, 1)

    def forward(self, x):
        h = torch.tanh(self.encoder(x))
        self.pooler(h)  # computed by the "library" and discarded
        with torch.no_grad():
            pooled = self.pooler(h)
        return self.head(pooled)


def test_a_no_grad_block_names_what_ran_in_it_and_what_only_fed_it(tmp_path):
    report = fit(HeadUnderNoGrad(), regression_data(), tmp_path)
    where = planted_at(HeadUnderNoGrad.forward, "with torch.no_grad()")
    assert_flagged(report, names("encoder", "weight", "bias") | names("pooler", "weight", "bias"), "no_grad", where)
    assert report.params["pooler.weight"].detail.startswith("it was used with autograd off")
    assert report.params["encoder.weight"].detail.startswith(
        "it was used with autograd on, but its result was then used with autograd off"
    )
