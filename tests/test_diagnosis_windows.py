"""The diagnosis window: when instruments are installed, that they always come out, and that the causes it finds
hold for every adapter (a plain loop driving the engine, torch.compile, evaluation loops, accumulation)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from diagnosis_helpers import HIDDEN, IN_DIM, Regression, fit, instruments_removed, planted_at, regression_data
from torch import nn

from lightning_gradguard import GradGuard, GradGuardEngine, GradGuardError, GuardConfig, watch


class LateBranch(Regression):
    """``branch`` is used on the first ``until`` batches only; records whether instruments were in on each batch."""

    def __init__(self, until: int = 4) -> None:
        super().__init__()
        self.until = until
        self.trunk = nn.Linear(IN_DIM, 1)
        self.branch = nn.Linear(IN_DIM, 1)
        self.instrumented: list[bool] = []

    def training_step(self, batch, batch_idx):
        self.instrumented.append(torch._C._len_torch_function_stack() > 0 or bool(self.trunk._forward_hooks))
        x, y = batch
        out = self.trunk(x)
        if batch_idx < self.until:
            out = out + self.branch(x)
        return F.mse_loss(out, y)


def test_instruments_only_in_the_first_steps_and_after_a_parameter_first_goes_missing(tmp_path):
    model = LateBranch(until=4)
    report = fit(model, regression_data(n_batches=10), tmp_path)
    # steps 0-1: the first window; step 4: `branch` goes missing without a known cause; steps 5-6: its window
    assert [i for i, on in enumerate(model.instrumented) if on] == [0, 1, 5, 6]
    p = report.params["branch.weight"]
    assert (p.steps, p.none_steps) == (10, 6)
    assert p.cause == "unused" and "was never called" in p.detail
    assert planted_at(LateBranch.__init__, "self.branch =") in p.detail
    assert instruments_removed(model)


class Crashes(Regression):
    def __init__(self, at: int) -> None:
        super().__init__()
        self.at = at
        self.layer = nn.Linear(IN_DIM, 1)

    def forward(self, x):
        return self.layer(x)

    def training_step(self, batch, batch_idx):
        if batch_idx == self.at:
            with torch.no_grad():
                raise ValueError("the user's own bug")
        return super().training_step(batch, batch_idx)


def test_instruments_are_removed_when_the_forward_raises(tmp_path):
    model = Crashes(at=1)
    with pytest.raises(ValueError, match="the user's own bug"):
        fit(model, regression_data(), tmp_path)
    assert instruments_removed(model)
    assert torch.is_grad_enabled()


class Unused(Regression):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(IN_DIM, 1)
        self.unused = nn.Linear(IN_DIM, 1)

    def forward(self, x):
        return self.used(x)


def test_strict_mode_error_carries_the_cause_and_removes_instruments(tmp_path):
    model = Unused()
    with pytest.raises(GradGuardError) as info:
        fit(model, regression_data(), tmp_path, guard=GradGuard(strict=True, summary=False))
    assert info.value.params == ["unused.weight", "unused.bias"]
    assert "[unused] module `unused` (Linear), defined at " in str(info.value)
    assert planted_at(Unused.__init__, "self.unused =") in str(info.value)
    assert info.value.report.params["unused.bias"].cause == "unused"
    assert instruments_removed(model)


class ValidationOnlyHead(Regression):
    """``val_head`` is only ever run in validation (under inference mode): in training it is unused."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(IN_DIM, 1)
        self.val_head = nn.Linear(IN_DIM, 1)

    def forward(self, x):
        return self.body(x)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.val_head(x), y)

    def val_dataloader(self):
        return regression_data(n_batches=1)


def test_an_evaluation_loop_inside_the_window_is_not_a_no_grad_cause(tmp_path):
    data = regression_data(n_batches=1)
    report = fit(ValidationOnlyHead(), data, tmp_path, max_epochs=3)  # validation runs between steps 0 and 1
    assert report.params["val_head.weight"].cause == "unused"
    assert "was never called" in report.params["val_head.weight"].detail


class AccumulatedBranch(Regression):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(IN_DIM, 1)
        self.branch = nn.Linear(IN_DIM, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self.trunk(x)
        if batch_idx % 2 == 0:
            out = out + self.branch(x)
        return F.mse_loss(out, y)


def test_intermittent_parameter_under_accumulation_gets_the_cause_of_the_micro_batches_it_missed(tmp_path):
    report = fit(AccumulatedBranch(), regression_data(n_batches=4), tmp_path, accumulate_grad_batches=2)
    assert report.intermittent == ["branch.weight", "branch.bias"]
    assert report.params["branch.weight"].cause == "unused"
    assert report.missing == []


# ---------------------------------------------------------------------- without Lightning
class PlainModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(IN_DIM, HIDDEN)
        self.decoder = nn.Linear(HIDDEN, 1)

    def forward(self, x):
        h = torch.tanh(self.encoder(x))
        return self.decoder(h.detach())  # the bug


def _plain_loop(model, engine, steps, loss_at_backward=True):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(steps):
        engine.start_micro_batch()
        loss = F.mse_loss(model(torch.randn(2, IN_DIM)), torch.randn(2, 1))
        engine.before_backward(loss if loss_at_backward else None)
        loss.backward()
        engine.after_backward()
        engine.check_step(optimizer, step)
        optimizer.step()
        optimizer.zero_grad()


def test_plain_loop_driving_the_engine_gets_the_same_cause_and_line():
    model = PlainModel()
    engine = GradGuardEngine(GuardConfig(), warn=lambda message: None)
    engine.bind(model.named_parameters(), module=model)
    _plain_loop(model, engine, steps=4, loss_at_backward=False)  # adapters that cannot see the loss
    engine.end_diagnosis()
    report = engine.report()
    assert report.missing == ["encoder.weight", "encoder.bias"]
    assert report.params["encoder.weight"].cause == "detached"
    assert planted_at(PlainModel.forward, "h.detach()") in report.params["encoder.weight"].detail
    assert instruments_removed(model)


def test_engine_micro_batches_started_from_inside_backward_keep_the_forward_records():
    """Plain-loop adapters notice a micro-batch at its first gradient, after the forward pass already ran."""
    model = PlainModel()
    engine = GradGuardEngine(GuardConfig(), warn=lambda message: None, micro_batch_per_backward=True)
    engine.bind(model.named_parameters(), module=model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(2):
        loss = F.mse_loss(model(torch.randn(2, IN_DIM)), torch.randn(2, 1))
        engine.before_backward(loss)  # starts the micro-batch
        loss.backward()
        engine.after_backward()
        engine.check_step(optimizer, step)
        optimizer.step()
        optimizer.zero_grad()
    engine.end_diagnosis()
    assert engine.report().params["encoder.bias"].cause == "detached"
    assert instruments_removed(model)


def test_torch_compile_is_not_recompiled_and_causes_are_not_guessed():
    graphs = []

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    model = PlainModel()
    compiled = torch.compile(model, backend=backend)
    engine = GradGuardEngine(GuardConfig(), warn=lambda message: None)
    engine.bind(compiled.named_parameters(), module=compiled)
    _plain_loop(compiled, engine, steps=4)
    engine.end_diagnosis()
    report = engine.report()
    assert report.missing == ["encoder.weight", "encoder.bias"]
    assert report.params["encoder.weight"].cause is None  # unknown inside compiled code, never guessed
    assert "torch.compile" in report.params["encoder.weight"].detail
    assert len(graphs) == 1  # no instrument made Dynamo compile again
    assert instruments_removed(compiled)


def test_plain_loop_evaluation_between_steps_is_not_a_no_grad_cause():
    """No micro-batch boundary separates an evaluation pass from the next forward pass in a plain loop."""
    model = ValidationOnlyHead()
    engine = GradGuardEngine(GuardConfig(), warn=lambda message: None, micro_batch_per_backward=True)
    engine.bind(model.named_parameters(), module=model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(2):
        model.eval()  # evaluate, then train
        with torch.no_grad():
            model.val_head(torch.randn(2, IN_DIM))
        model.train()
        loss = F.mse_loss(model(torch.randn(2, IN_DIM)), torch.randn(2, 1))
        engine.before_backward(loss)
        loss.backward()
        engine.after_backward()
        engine.check_step(optimizer, step)
        optimizer.step()
        optimizer.zero_grad()
    engine.end_diagnosis()
    assert engine.report().params["val_head.weight"].cause == "unused"


def test_an_evaluation_pass_that_leaves_autograd_on_is_named_for_what_it_is():
    """An evaluation pass between steps without ``torch.no_grad()``: the head it alone uses was used with autograd
    on, but only in eval mode; the detail says both readings and how to silence an evaluation-only head."""
    model = ValidationOnlyHead()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with watch(model, optimizer, summary=False) as guard:
            for _ in range(3):
                model.eval()
                model.val_head(torch.randn(2, IN_DIM))  # autograd left on
                model.train()
                F.mse_loss(model(torch.randn(2, IN_DIM)), torch.randn(2, 1)).backward()
                optimizer.step()
                optimizer.zero_grad()
    head = guard.report().params["val_head.weight"]
    assert head.cause == "unused" and head.none_steps == 3
    assert "only while the model was in eval mode" in head.detail
    assert "add 'val_head.*' to allow_none if it is for evaluation only" in head.detail


class CutInEvalMode(nn.Module):
    """``first`` is cut from the loss, by ``.detach()`` or inside ``torch.no_grad()``."""

    def __init__(self, cut: str) -> None:
        super().__init__()
        self.first = nn.Linear(IN_DIM, IN_DIM)
        self.second = nn.Linear(IN_DIM, 1)
        self.cut = cut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cut == "detach":
            h = self.first(x).detach()
        else:
            with torch.no_grad():
                h = self.first(x)
        return self.second(h)


@pytest.mark.parametrize(("cut", "cause", "line"), [("detach", "detached", ".detach()"),
                                                     ("no_grad", "no_grad", "torch.no_grad()")])
def test_a_model_trained_in_eval_mode_gets_the_true_cause(cut, cause, line):
    """Frozen batch norm, or a ``model.train()`` forgotten after evaluation: the forward pass runs in eval mode with
    autograd on, and is a training pass; an evaluation pass between the steps (eval mode, autograd off) is not."""
    torch.manual_seed(0)
    model = CutInEvalMode(cut).eval()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with watch(model, optimizer, summary=False) as guard:
            for _ in range(3):
                F.mse_loss(model(torch.randn(2, IN_DIM)), torch.randn(2, 1)).backward()
                optimizer.step()
                optimizer.zero_grad()
                with torch.no_grad():  # evaluation between steps
                    model(torch.randn(2, IN_DIM))
    first = guard.report().params["first.weight"]
    assert first.none_steps == 3 and first.cause == cause
    assert line in first.detail and "never called" not in first.detail


@pytest.mark.internal_error
def test_an_internal_diagnosis_error_never_breaks_the_run(tmp_path, monkeypatch, recwarn):
    from lightning_gradguard.core.diagnosis import recording

    def broken(self, args, kwargs):
        raise RuntimeError("planted bug inside GradGuard")

    monkeypatch.setattr(recording.Recording, "note_use", broken)
    model = Unused()
    report = fit(model, regression_data(), tmp_path)
    assert report.missing == ["unused.weight", "unused.bias"]  # detection goes on
    assert report.params["unused.weight"].none_steps == 3
    assert report.params["unused.weight"].cause is None  # diagnosis turned itself off: no guess
    assert any("internal error in the diagnosis" in str(w.message) for w in recwarn)
    assert instruments_removed(model)


class PlainWithExtras(PlainModel):
    def __init__(self) -> None:
        super().__init__()
        self.extra = [nn.Linear(IN_DIM, 1)]  # modules in a plain list: a static finding


def test_plain_pytorch_adapter_gets_causes_findings_and_cleans_up():
    from lightning_gradguard import watch

    model = PlainWithExtras()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = watch(model, optimizer, summary=False)
    try:
        for _ in range(3):
            loss = F.mse_loss(model(torch.randn(2, IN_DIM)), torch.randn(2, 1))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    finally:
        report = guard.close()
    assert report.missing == ["encoder.weight", "encoder.bias"]
    assert report.params["encoder.bias"].cause == "detached"
    assert planted_at(PlainModel.forward, "h.detach()") in report.params["encoder.bias"].detail
    assert [(f.kind, f.name) for f in report.findings] == [("unregistered", "extra")]
    assert instruments_removed(model)


def test_plain_pytorch_loop_that_raises_inside_the_window_leaves_no_instrument():
    from lightning_gradguard import watch

    model = PlainModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="the loop's own bug"):
        with watch(model, optimizer, summary=False):
            model(torch.randn(2, IN_DIM)).sum().backward()
            raise ValueError("the loop's own bug")
    assert instruments_removed(model)


def _padded_encoder() -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)


def _padding() -> torch.Tensor:
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[0, 3:] = True
    return pad


def test_an_evaluation_pass_in_the_window_computes_what_it_computes_without_the_guard():
    """With a torch-function mode on the stack, ``nn.TransformerEncoder`` skips its inference fast path, which fills
    padded positions with zeros: an evaluation pass during the diagnosis window gave other outputs."""
    torch.manual_seed(0)
    model = _padded_encoder().eval()
    x, pad = torch.randn(2, 6, 16), _padding()
    with torch.no_grad():
        expected = model(x, src_key_padding_mask=pad)
    guard = watch(model, torch.optim.SGD(model.parameters(), lr=0.1), summary=False)
    recording = torch._C._len_torch_function_stack()
    with torch.no_grad():
        got = model(x, src_key_padding_mask=pad)
    assert torch.equal(got, expected) and got[0, 3:].abs().sum() == 0
    assert torch._C._len_torch_function_stack() == recording == 1  # back for the training passes of the window
    guard.close()
    assert instruments_removed(model)


class PaddedEncoder(Regression):
    """Validation through a submodule (not ``self(x)``), with padding masks."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = _padded_encoder()
        self.head = nn.Linear(16, 1)
        self.val_outputs: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        x = batch[0].reshape(-1, 6, 16)
        return self.head(self.encoder(x)).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        x = batch[0].reshape(-1, 6, 16)
        self.val_outputs.append(self.encoder(x, src_key_padding_mask=_padding()))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)  # weights stay put: every validation pass is the same

    def val_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(2, 96)), batch_size=2)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(2, 96)), batch_size=2)


@pytest.mark.parametrize("guarded", [False, True])
def test_a_validation_loop_in_the_window_computes_what_it_computes_without_the_guard(tmp_path, guarded):
    torch.manual_seed(0)
    model = PaddedEncoder()
    guards = [GradGuard(summary=False)] if guarded else []
    options = dict(max_epochs=2, num_sanity_val_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    from lightning import Trainer

    Trainer(callbacks=guards, **options).fit(model)
    # sanity check, then after each epoch of one step: the first two are inside the diagnosis window
    assert len(model.val_outputs) == 3
    for out in model.val_outputs:
        assert torch.equal(out, model.val_outputs[0]) and out[0, 3:].abs().sum() == 0
    assert instruments_removed(model)
