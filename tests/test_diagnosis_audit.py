"""Static findings at fit start (``unregistered``, ``not_in_optimizer``) and the gradient hidden by
``zero_grad(set_to_none=False)``."""

from __future__ import annotations

import torch
from diagnosis_helpers import HIDDEN, IN_DIM, Regression, fit, planted_at, regression_data
from torch import nn


class TrainableHiddenInAttributes(Regression):
    """Six ways to keep a trainable tensor where ``model.parameters()`` cannot see it."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(IN_DIM, 1)
        self.temperature = torch.ones(1, requires_grad=True)  # a plain tensor
        self.heads = [nn.Linear(IN_DIM, 1), nn.Linear(IN_DIM, 1)]  # modules in a plain list
        self.gains = {"a": nn.Parameter(torch.ones(1)), "b": nn.Parameter(torch.ones(1))}  # parameters in a dict
        self.pair = (nn.Parameter(torch.zeros(1)), nn.Linear(IN_DIM, 1))  # a tuple of both
        self.bias64 = nn.Parameter(torch.zeros(1)).to(torch.float64)  # wrapped, then cast: a plain tensor
        self.scale = nn.Parameter(torch.ones(1)) * 0.5  # wrapped, then scaled: a plain tensor too

    def forward(self, x):
        out = self.layer(x) * self.temperature + self.bias64.float()
        for head in self.heads:
            out = out + head(x) * self.gains["a"] * self.gains["b"]
        return out + self.pair[0] + self.pair[1](x)


def test_unregistered_trainable_tensors_are_named_with_their_fix(tmp_path, recwarn):
    report = fit(TrainableHiddenInAttributes(), regression_data(), tmp_path)
    findings = {f.name: f for f in report.findings}
    assert set(findings) == {"temperature", "heads", "gains", "pair", "bias64", "scale"}
    assert all(f.kind == "unregistered" for f in findings.values())
    assert "nn.Parameter(" in findings["temperature"].detail
    assert "2 modules with 4 trainable parameter tensors" in findings["heads"].detail
    assert "nn.ModuleList(...)" in findings["heads"].detail
    assert "nn.ParameterDict(...)" in findings["gains"].detail
    assert "nn.ModuleList(...) / nn.ParameterList(...)" in findings["pair"].detail
    assert "was an nn.Parameter" in findings["bias64"].detail and "wrap after moving" in findings["bias64"].detail
    scale = findings["scale"].detail  # not a move or a cast: the operation is named, and the fix that applies
    assert "was an nn.Parameter" in scale and "MulBackward0" in scale and "wrap the result" in scale
    assert ".to()" not in scale
    # the registered parameters all received gradients: nothing else is reported
    assert report.missing == [] and set(report.params) == {"layer.weight", "layer.bias"}
    assert any("GradGuard found 6 problems" in str(w.message) for w in recwarn)


class PartlyOptimized(Regression):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(IN_DIM, HIDDEN), nn.Tanh())
        self.head = nn.Sequential(nn.Linear(HIDDEN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 1))
        self.scale = nn.Parameter(torch.ones(1))
        self.frozen = nn.Linear(IN_DIM, 1).requires_grad_(False)  # frozen, not optimized: fine

    def forward(self, x):
        return self.head(self.encoder(x)) * self.scale + self.frozen(x)

    def configure_optimizers(self):
        head = self.head[0]
        return torch.optim.SGD([*self.encoder.parameters(), head.weight], lr=0.05)  # forgets the rest


def test_parameters_in_no_optimizer_are_grouped_by_module(tmp_path):
    report = fit(PartlyOptimized(), regression_data(), tmp_path)
    findings = {f.name: f for f in report.findings}
    assert set(findings) == {"head.0.bias", "head.2", "scale"}
    assert all(f.kind == "not_in_optimizer" for f in findings.values())
    assert "none of the 2 trainable parameter tensors of module `head.2`" in findings["head.2"].detail
    assert "`scale` requires grad but is in no optimizer's param groups" in findings["scale"].detail
    assert report.missing == []


class FirstBatchBranch(Regression):
    """``branch`` runs on the first batch only; zero_grad(set_to_none=False) then leaves it a zero gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(IN_DIM, 1)
        self.branch = nn.Linear(IN_DIM, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self.trunk(x)
        if batch_idx == 0:
            out = out + self.branch(x)
        return torch.nn.functional.mse_loss(out, y)

    def optimizer_zero_grad(self, epoch, batch_idx, optimizer):
        optimizer.zero_grad(set_to_none=False)


def test_gradient_hidden_by_zero_grad_set_to_none_false(tmp_path):
    model = FirstBatchBranch()
    report = fit(model, regression_data(n_batches=4), tmp_path)
    assert report.missing == ["branch.weight", "branch.bias"]
    p = report.params["branch.weight"]
    assert (p.steps, p.none_steps) == (4, 3)
    assert p.cause == "unused"  # diagnosed at step 1, inside the first window
    assert planted_at(FirstBatchBranch.__init__, "self.branch =") in p.detail and "was never called" in p.detail
    assert "Why .grad is not None" in p.detail and "zero_grad(set_to_none=False)" in p.detail
    assert model.branch.weight.grad is not None and not model.branch.weight.grad.any()
    assert not report.findings


class FirstBatchBranchNeverZeroed(FirstBatchBranch):
    """The same branch, in a loop that never zeroes gradients: the branch's first gradient stays in ``.grad``."""

    def optimizer_zero_grad(self, epoch, batch_idx, optimizer):
        pass


def test_an_old_gradient_no_zero_grad_cleared_is_named_as_applied_again(tmp_path):
    """Without any zero_grad, the leftover is the branch's first gradient, not zeros: the optimizer applies it again
    at every step, which the report must say (not blame zero_grad(set_to_none=False), which never ran)."""
    model = FirstBatchBranchNeverZeroed()
    report = fit(model, regression_data(n_batches=4), tmp_path)
    p = report.params["branch.weight"]
    assert (p.steps, p.none_steps, p.cause) == (4, 3, "unused")
    assert "still holds the gradient of an earlier step, because no zero_grad() ran since" in p.detail
    assert "set_to_none=False" not in p.detail
    assert model.branch.weight.grad.abs().sum() > 0


class FrozenAfterFirstBatch(FirstBatchBranch):
    """Like :class:`FirstBatchBranch`, but ``branch`` is frozen once it stops being used: healthy."""

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if batch_idx == 0:
            self.branch.requires_grad_(False)


def test_frozen_parameter_holding_a_zeroed_gradient_is_not_reported(tmp_path):
    report = fit(FrozenAfterFirstBatch(), regression_data(n_batches=4), tmp_path)
    assert report.missing == [] and report.intermittent == []
    # checked at the one step it was trainable, not at the three after it was frozen
    assert report.params["branch.weight"].steps == 1
    assert report.params["trunk.weight"].steps == 4


def test_audit_is_framework_free():
    from lightning_gradguard import GradGuardEngine, GuardConfig

    model = PartlyOptimized()
    engine = GradGuardEngine(GuardConfig(), warn=lambda message: None)
    engine.bind(model.named_parameters(), module=model)
    found = engine.audit([model.configure_optimizers()])
    assert {f.name for f in found} == {"head.0.bias", "head.2", "scale"}
    engine.audit([torch.optim.SGD(model.parameters(), lr=0.1)])  # fixed: earlier findings are replaced
    assert engine.findings == []
    engine.end_diagnosis()
