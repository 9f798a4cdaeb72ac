"""Optimizers whose ``step()`` is not one plain call: a closure that computes the gradients inside ``step()`` (LBFGS
calls it several times per step), a subclass whose ``step()`` calls ``super().step()`` (the step hooks then run
twice), a custom optimizer's own argument to ``step()``. Every adapter checks such a step once, right after the
gradients exist and before any weight moves; checked before the closure ran, or twice, every parameter would look as
if no backward pass had given it a gradient.
"""

from __future__ import annotations

import warnings
from collections import defaultdict

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from torch import nn

from lightning_gradguard import GradGuard, GradGuardError, GradGuardWarning, watch, watch_fabric


class WithUnused(nn.Module):
    def __init__(self, unused: bool = True) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.unused = nn.Linear(2, 2) if unused else None  # planted: never called

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(16, 4, generator=generator), torch.randn(16, 1, generator=generator)


def lbfgs_loop(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, keyword: bool) -> list[int]:
    x, y = data()
    calls = []

    def closure() -> torch.Tensor:
        calls.append(1)
        optimizer.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss

    for _ in range(steps):
        if keyword:
            optimizer.step(closure=closure)
        else:
            optimizer.step(closure)
    return calls


@pytest.mark.parametrize("keyword", [False, True], ids=["positional", "keyword"])
def test_lbfgs_in_a_plain_loop_is_checked_once_per_step_after_the_closure(keyword):
    torch.manual_seed(0)
    model = WithUnused(unused=False)
    optimizer = torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with watch(model, optimizer, summary=False) as guard:
            calls = lbfgs_loop(model, optimizer, steps=3, keyword=keyword)
    report = guard.report()
    assert len(calls) > 3  # the closure ran several times per step
    assert report.ok and report.steps == 3 and report.missing == []
    assert all(p.steps == 3 and p.none_steps == 0 for p in report.params.values())
    assert not [w for w in caught if "GradGuard" in type(w.message).__name__]


def test_lbfgs_in_a_plain_loop_reports_what_the_closure_leaves_out():
    torch.manual_seed(0)
    model = WithUnused()
    optimizer = torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with watch(model, optimizer, summary=False) as guard:
            lbfgs_loop(model, optimizer, steps=3, keyword=False)
    report = guard.report()
    assert report.missing == ["unused.weight", "unused.bias"]
    assert report.params["unused.weight"].cause == "unused"
    assert (report.params["unused.weight"].steps, report.params["unused.weight"].none_steps) == (3, 3)
    assert report.params["body.0.weight"].none_steps == 0


def test_strict_lbfgs_raises_from_the_first_closure_call_before_any_weight_moves():
    torch.manual_seed(0)
    model = WithUnused()
    optimizer = torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=4)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        guard = watch(model, optimizer, strict=True, summary=False)
        with pytest.raises(GradGuardError) as info:
            lbfgs_loop(model, optimizer, steps=1, keyword=False)
        guard.close()
    assert info.value.params == ["unused.weight", "unused.bias"] and info.value.step == 0
    assert all(torch.equal(before[name], p) for name, p in model.named_parameters())


def test_sgd_with_a_closure_is_checked_after_it():
    torch.manual_seed(0)
    model = WithUnused(unused=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with watch(model, optimizer, summary=False) as guard:
        lbfgs_loop(model, optimizer, steps=2, keyword=True)
    report = guard.report()
    assert report.ok and report.steps == 2


class LBFGSModule(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = WithUnused()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.LBFGS(self.parameters(), lr=0.1, max_iter=5)


def test_lbfgs_under_the_trainer_counts_optimizer_steps_not_closure_calls(tmp_path):
    torch.manual_seed(0)
    guard = GradGuard(summary=False)
    x, y = data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    trainer = Trainer(max_steps=3, callbacks=[guard], logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(LBFGSModule(), loader)
    report = guard.report()
    assert trainer.global_step == 3 and report.steps == 3
    assert report.missing == ["model.unused.weight", "model.unused.bias"]
    unused = report.params["model.unused.weight"]
    assert (unused.steps, unused.none_steps, unused.micro_batches) == (3, 3, 3)
    assert report.params["model.body.0.weight"].none_steps == 0


def test_lbfgs_under_fabric_is_checked_once_per_step():
    torch.manual_seed(0)
    fabric = L.Fabric(accelerator="cpu", devices=1)
    model = WithUnused(unused=False)
    model, optimizer = fabric.setup(model, torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=4))
    x, y = data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        guard = watch_fabric(fabric, model, optimizer, summary=False)

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = F.mse_loss(model(x), y)
            fabric.backward(loss)
            return loss

        for _ in range(3):
            optimizer.step(closure)
        report = guard.close()
    assert report.ok and report.steps == 3 and report.missing == []


class StepWithLoss(torch.optim.SGD):
    """A custom optimizer whose step takes the loss value, not a closure."""

    def step(self, loss_value=None):  # noqa: D102
        assert loss_value is None or isinstance(loss_value, torch.Tensor)
        return super().step()


def test_a_custom_optimizer_argument_that_is_not_a_closure_is_passed_on_untouched():
    torch.manual_seed(0)
    model = WithUnused(unused=False)
    optimizer = StepWithLoss(model.parameters(), lr=0.1)
    x, y = data()
    with watch(model, optimizer, summary=False, strict=True) as guard:
        for _ in range(2):
            loss = F.mse_loss(model(x), y)
            loss.backward()
            optimizer.step(loss.detach())
            optimizer.zero_grad()
    assert guard.report().ok and guard.report().steps == 2


class SGDWithLogging(torch.optim.SGD):
    """A subclass that adds to step() and calls super().step(): with a plain SGD also in the process, torch has
    wrapped both classes' step, and the step hooks run twice per step."""

    def step(self, closure=None):  # noqa: D102
        return super().step(closure)


@pytest.mark.parametrize("with_closure", [False, True], ids=["plain", "closure"])
def test_a_subclass_calling_super_step_is_checked_once_per_step(with_closure):
    torch.manual_seed(0)
    torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)  # wraps SGD.step itself, as any plain SGD in a program
    model = WithUnused()
    optimizer = SGDWithLogging(model.parameters(), lr=0.1)
    x, y = data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with watch(model, optimizer, summary=False) as guard:
            if with_closure:
                lbfgs_loop(model, optimizer, steps=3, keyword=False)
            else:
                for _ in range(3):
                    F.mse_loss(model(x), y).backward()
                    optimizer.step()
                    optimizer.zero_grad()
    report = guard.report()
    assert report.steps == 3 and report.missing == ["unused.weight", "unused.bias"]
    assert report.params["body.0.weight"].none_steps == 0 and report.params["unused.weight"].cause == "unused"


class Lookahead:
    """A Lookahead-style wrapper that is not a torch optimizer: it keeps one in ``.optimizer`` and steps it."""

    def __init__(self, optimizer: torch.optim.Optimizer, k: int = 2) -> None:
        self.optimizer = optimizer
        self.k, self.steps = k, 0
        self.slow = [p.detach().clone() for group in optimizer.param_groups for p in group["params"]]

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none)

    def step(self, closure=None):
        loss = self.optimizer.step(closure)
        self.steps += 1
        if self.steps % self.k == 0:
            params = [p for group in self.param_groups for p in group["params"]]
            for p, slow in zip(params, self.slow):
                slow.add_(p.detach() - slow, alpha=0.5)
                p.data.copy_(slow)
        return loss


def test_an_optimizer_wrapper_is_watched_through_the_optimizer_it_keeps():
    torch.manual_seed(0)
    model = WithUnused()
    optimizer = Lookahead(torch.optim.Adam(model.parameters(), lr=0.1))
    x, y = data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with watch(model, optimizer, summary=False) as guard:
            for _ in range(4):
                optimizer.zero_grad()
                F.mse_loss(model(x), y).backward()
                optimizer.step()
    report = guard.report()
    assert report.steps == 4 and report.missing == ["unused.weight", "unused.bias"]
    assert report.params["body.0.weight"].none_steps == 0


class SAM(torch.optim.Optimizer):
    """Sharpness-Aware Minimization as the widely copied davda54/sam implements it: a wrapper that shares its base
    optimizer's param groups and steps it from ``second_step()``."""

    def __init__(self, params, base_optimizer, rho=0.05, **kwargs):
        super().__init__(params, dict(rho=rho, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups

    @torch.no_grad()
    def first_step(self, zero_grad=False):
        norm = torch.norm(torch.stack([p.grad.norm() for g in self.param_groups for p in g["params"]
                                       if p.grad is not None]))
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.state[p]["old_p"] = p.data.clone()
                    p.add_(p.grad * group["rho"] / (norm + 1e-12))
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad=False):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.data = self.state[p]["old_p"]
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def step(self, closure=None):
        closure = torch.enable_grad()(closure)
        self.first_step(zero_grad=True)
        closure()
        self.second_step()


@pytest.mark.parametrize("usage", ["step(closure)", "first_step/second_step"])
def test_sam_is_one_checked_step_per_update_and_healthy(usage):
    # its base optimizer's step inside SAM's (or from second_step) is the same update, checked once
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    optimizer = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradGuardWarning)
        guard = watch(model, optimizer, summary=False, strict=True)
        for _ in range(4):
            x, y = torch.randn(16, 4), torch.randn(16, 1)
            F.mse_loss(model(x), y).backward()
            if usage == "step(closure)":
                def closure(x=x, y=y):
                    loss = F.mse_loss(model(x), y)
                    loss.backward()
                    return loss

                optimizer.step(closure)
                optimizer.zero_grad()
            else:
                optimizer.first_step(zero_grad=True)
                F.mse_loss(model(x), y).backward()
                optimizer.second_step(zero_grad=True)
        report = guard.close()
    assert report.ok and report.steps == 4 and report.missing == [] and report.intermittent == []
    assert {(p.steps, p.none_steps, p.none_micro_batches) for p in report.params.values()} == {(4, 0, 0)}


class UninitializedLookahead(torch.optim.Optimizer):
    """Lookahead as many repositories copy it: an Optimizer subclass that never calls ``Optimizer.__init__``."""

    def __init__(self, optimizer, k=2, alpha=0.5):
        self.optimizer, self.k, self.alpha = optimizer, k, alpha
        self.param_groups = optimizer.param_groups
        self.state = defaultdict(dict)
        self.steps = 0

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none)

    def step(self, closure=None):
        loss = self.optimizer.step(closure)
        self.steps += 1
        if self.steps % self.k == 0:
            for group in self.param_groups:
                for fast in group["params"]:
                    slow = self.state[fast].setdefault("slow", fast.detach().clone())
                    slow += (fast.detach() - slow) * self.alpha
                    fast.data.copy_(slow)
        return loss


def test_a_lookahead_that_never_initialized_its_optimizer_base_is_watched_through_the_inner_one():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1), nn.Linear(1, 1))
    optimizer = UninitializedLookahead(torch.optim.Adam(model[:4].parameters(), lr=1e-2))
    guard = watch(model[:4], optimizer, summary=False)
    for _ in range(4):
        optimizer.zero_grad()
        F.mse_loss(model[:4](torch.randn(8, 4)), torch.randn(8, 1)).backward()
        optimizer.step()
    report = guard.close()
    assert report.steps == 4 and report.ok and report.missing == []


def test_a_watch_whose_set_up_fails_leaves_no_hook_and_frees_its_directory(tmp_path, monkeypatch):
    from lightning_gradguard.adapters import loop

    model = nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monkeypatch.setattr(loop.LoopGuard, "_install", lambda self: (_ for _ in ()).throw(RuntimeError("planted")))
    with pytest.raises(RuntimeError, match="planted"):
        watch(model, optimizer, log_dir=str(tmp_path))
    assert not model._forward_hooks and not model._forward_pre_hooks
    monkeypatch.undo()
    watch(model, optimizer, log_dir=str(tmp_path), summary=False).close()  # not refused as a second guard
