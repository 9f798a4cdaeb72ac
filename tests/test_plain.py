"""The plain PyTorch adapter: ``watch(model, optimizer)`` in hand-written training loops.

Every loop here is an ordinary PyTorch loop (``loss.backward()``, ``optimizer.step()``, ``optimizer.zero_grad()``)
with the one added ``watch(...)`` line. Counts are exact: the loops are deterministic and tiny.
"""

from __future__ import annotations

import importlib.util
import json
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from plain_models import PLANTED, USED, BranchNet, HealthyNet, PlantedNet, batches
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from lightning_gradguard import GradGuardError, GradGuardWarning
from lightning_gradguard.adapters.loop import LoopGuard, watch
from lightning_gradguard.report_text import report_from_text

DIAGNOSIS = importlib.util.find_spec("lightning_gradguard.core.diagnosis") is not None


def train(model: nn.Module, optimizer: torch.optim.Optimizer, n_steps: int, accumulate: int = 1) -> None:
    """An ordinary loop with gradient accumulation; the last window may be partial."""
    for i, (x, y) in enumerate(batches(n_steps * accumulate)):
        loss = F.mse_loss(model(x), y) / accumulate
        loss.backward()
        if (i + 1) % accumulate == 0:
            optimizer.step()
            optimizer.zero_grad()


@pytest.fixture
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def as_dict(guard: LoopGuard) -> dict:
    return guard.report().to_dict()["params"]


# ---------------------------------------------------------------------------------------------- finding problems
def test_unused_layer_and_detached_path_are_named_with_exact_counts(quiet):
    torch.manual_seed(0)
    model = PlantedNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = watch(model, optimizer, summary=False)
    train(model, optimizer, n_steps=5, accumulate=2)
    guard.close()

    report = guard.report()
    assert report.steps == 5
    assert report.micro_batches == 10
    assert set(report.missing) == PLANTED
    params = as_dict(guard)
    for name in PLANTED:
        assert params[name]["steps"] == 5
        assert params[name]["none_steps"] == 5
        assert params[name]["micro_batches"] == 10
        assert params[name]["none_micro_batches"] == 10
    for name in USED:
        assert params[name] == {**params[name], "none_steps": 0, "none_micro_batches": 0, "micro_batches": 10}
    if DIAGNOSIS:
        assert params["unused.weight"]["cause"] == "unused"
        assert params["side.weight"]["cause"] == "detached"


def test_warning_names_the_parameters_and_points_at_the_step_line():
    model = PlantedNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = watch(model, optimizer, summary=False)
    with pytest.warns(UserWarning, match="received no gradient") as record:
        train(model, optimizer, n_steps=3)
    guard.close()
    messages = [w for w in record if "GradGuard" in str(w.message)]
    assert len(messages) == 1  # once per parameter, at its first step
    assert all(name in str(messages[0].message) for name in PLANTED)
    assert os.path.basename(messages[0].filename) == "test_plain.py"  # the user's optimizer.step() line


def test_healthy_model_reports_nothing(quiet, capsys):
    model = HealthyNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    with watch(model, optimizer) as guard:
        train(model, optimizer, n_steps=4, accumulate=3)
    report = guard.report()
    assert report.ok and not report.intermittent and not report.findings
    assert report.steps == 4 and report.micro_batches == 12
    assert "all 4 trainable parameters received a gradient at each of 4 optimizer steps" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- micro-batches
def test_accumulation_in_a_hand_written_loop_separates_never_from_sometimes(quiet):
    """k=4 with a partial final window (10 micro-batches: windows of 4, 4 and 2); the branch runs on odd ones."""
    torch.manual_seed(0)
    model = BranchNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = watch(model, optimizer, summary=False)
    data = batches(10)
    for i, (x, y) in enumerate(data):
        loss = F.mse_loss(model(x, use_branch=i % 2 == 1), y) / 4
        loss.backward()
        if (i + 1) % 4 == 0 or i == len(data) - 1:
            optimizer.step()
            optimizer.zero_grad()
    guard.close()

    report = guard.report()
    assert report.steps == 3 and report.micro_batches == 10
    assert report.missing == []
    assert set(report.intermittent) == {"branch.weight", "branch.bias"}
    branch = as_dict(guard)["branch.weight"]
    assert (branch["steps"], branch["none_steps"]) == (3, 0)
    assert (branch["micro_batches"], branch["none_micro_batches"]) == (10, 5)


def test_branch_missing_from_a_whole_window_is_a_none_step(quiet):
    model = BranchNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = watch(model, optimizer, summary=False)
    for i, (x, y) in enumerate(batches(8)):
        F.mse_loss(model(x, use_branch=i < 2), y).backward()  # the branch runs in the first window only
        if (i + 1) % 2 == 0:
            optimizer.step()
            optimizer.zero_grad()
    guard.close()
    branch = as_dict(guard)["branch.bias"]
    assert (branch["steps"], branch["none_steps"], branch["micro_batches"], branch["none_micro_batches"]) == (
        4,
        3,
        8,
        6,
    )


def test_several_losses_from_one_forward_are_one_micro_batch(quiet):
    """Two backward passes after one forward call (retain_graph) are one micro-batch: no false "sometimes"."""
    model = BranchNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = watch(model, optimizer, summary=False)
    for x, y in batches(3):
        out = model(x, use_branch=True)
        F.mse_loss(out, y).backward(retain_graph=True)
        out.abs().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    guard.close()
    report = guard.report()
    assert (report.steps, report.micro_batches) == (3, 6)  # six backward passes
    assert as_dict(guard)["trunk.weight"]["micro_batches"] == 3  # in three micro-batches
    assert report.ok and report.intermittent == []


def test_loop_that_calls_submodules_counts_each_backward_as_a_micro_batch(quiet):
    model = BranchNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = watch(model, optimizer, summary=False)
    for i, (x, y) in enumerate(batches(6)):
        h = torch.relu(model.trunk(x))  # the root module is never called
        if i % 3 == 0:
            h = h + model.branch(h)
        F.mse_loss(model.head(h), y).backward()
        if (i + 1) % 3 == 0:
            optimizer.step()
            optimizer.zero_grad()
    guard.close()
    branch = as_dict(guard)["branch.weight"]
    assert (branch["steps"], branch["none_steps"], branch["micro_batches"], branch["none_micro_batches"]) == (
        2,
        0,
        6,
        4,
    )


def test_evaluation_forwards_do_not_disturb_micro_batch_counts(quiet):
    model = HealthyNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = watch(model, optimizer, summary=False)
    for i, (x, y) in enumerate(batches(6)):
        F.mse_loss(model(x), y).backward()
        with torch.no_grad():
            model(x)  # evaluation inside the window
        model(x).sum()  # a forward with autograd on but no backward (a metric computed carelessly)
        if (i + 1) % 2 == 0:
            optimizer.step()
            optimizer.zero_grad()
    guard.close()
    report = guard.report()
    assert (report.steps, report.micro_batches) == (3, 6)
    assert report.ok and report.intermittent == []
    assert as_dict(guard)["head.weight"]["micro_batches"] == 6


def test_gan_loop_with_two_optimizers_reports_nothing(quiet):
    """D's backward gives G nothing; G's window starts at its own zero_grad, so G is never "sometimes" missing."""
    torch.manual_seed(0)
    gan = nn.ModuleDict({"G": nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 3)), "D": nn.Linear(3, 1)})
    opt_g = torch.optim.Adam(gan["G"].parameters(), lr=1e-3)
    opt_d = torch.optim.Adam(gan["D"].parameters(), lr=1e-3)
    guard = watch(gan, [opt_g, opt_d], summary=False)
    for _ in range(4):
        fake = gan["G"](torch.randn(5, 2))
        opt_d.zero_grad()
        d_loss = F.softplus(gan["D"](fake.detach())).mean() + F.softplus(-gan["D"](torch.randn(5, 3))).mean()
        d_loss.backward()
        opt_d.step()
        opt_g.zero_grad()
        F.softplus(-gan["D"](fake)).mean().backward()
        opt_g.step()
    guard.close()
    report = guard.report()
    assert report.steps == 8
    assert report.ok and report.intermittent == [], report.format_table()
    assert as_dict(guard)["G.0.weight"]["micro_batches"] == 4


def test_a_lazy_r1_step_whose_loss_reaches_the_model_only_through_autograd_grad_is_counted(quiet):
    """StyleGAN2's lazy R1 regularization: every other step, zero_grad() and a backward pass of the gradient penalty
    alone, which never goes through the model's output. Its gradients are the step's: nothing is missing but the
    output bias, which the penalty does not depend on; and strict mode (that bias allowed) lets the run go on."""

    def run(set_to_none=True, **options):
        torch.manual_seed(0)
        critic = nn.Sequential(nn.Linear(2, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))
        optimizer = torch.optim.Adam(critic.parameters(), lr=1e-3)
        guard = watch(critic, optimizer, summary=False, **options)
        for i in range(4):
            real = torch.randn(16, 2)
            optimizer.zero_grad(set_to_none=set_to_none)
            F.softplus(-critic(real)).mean().backward()
            optimizer.step()
            if i % 2 == 0:
                real.requires_grad_(True)
                (gradient,) = torch.autograd.grad(critic(real).sum(), real, create_graph=True)
                optimizer.zero_grad(set_to_none=set_to_none)
                gradient.pow(2).sum(1).mean().backward()
                optimizer.step()
        return guard.close()

    report = run()
    assert report.steps == 6 and report.missing == ["2.bias"] and report.intermittent == []
    assert {name: p.none_steps for name, p in report.params.items()} == {
        "0.weight": 0, "0.bias": 0, "2.weight": 0, "2.bias": 2
    }
    assert report.params["0.weight"].micro_batches == 6
    bias = report.params["2.bias"]
    assert bias.cause == "no_backward" and "does not depend on it" in bias.detail
    assert run(strict=True, allow_none="2.bias").ok
    # zero_grad(set_to_none=False): the penalty's pass writes into the zeros, in place
    assert run(set_to_none=False, strict=True, allow_none="2.bias").ok


def test_a_discriminator_called_apart_from_the_watched_model_is_counted_at_its_step(quiet):
    """CycleGAN's order: one generator forward through the watched model, the discriminator frozen for the
    generator's step, then unfrozen, zeroed and trained on fake.detach(): its backward pass never reaches the
    watched model's output, and is counted at its step."""
    torch.manual_seed(0)
    gan = nn.ModuleDict({"G": nn.Linear(4, 2), "D": nn.Linear(2, 1)})
    model = _CallsG(gan)
    opt_g = torch.optim.Adam(gan["G"].parameters(), lr=2e-4)
    opt_d = torch.optim.Adam(gan["D"].parameters(), lr=2e-4)
    guard = watch(model, [opt_g, opt_d], summary=False)
    for _ in range(4):
        fake = model(torch.randn(8, 4))
        gan["D"].requires_grad_(False)
        opt_g.zero_grad()
        F.softplus(-gan["D"](fake)).mean().backward()
        opt_g.step()
        gan["D"].requires_grad_(True)
        opt_d.zero_grad()
        (F.softplus(gan["D"](fake.detach())).mean() + F.softplus(-gan["D"](torch.randn(8, 2))).mean()).backward()
        opt_d.step()
    report = guard.close()
    assert report.ok and report.missing == [] and report.intermittent == [], report.format_table()
    assert {(p.steps, p.micro_batches, p.none_micro_batches) for p in report.params.values()} == {(4, 4, 0)}


class _CallsG(nn.Module):
    def __init__(self, gan: nn.ModuleDict) -> None:
        super().__init__()
        self.gan = gan

    def forward(self, z):
        return self.gan["G"](z)


def test_optimizer_steps_inside_the_backward_pass_are_healthy():
    """The optimizer-in-backward pattern: one optimizer per parameter, stepped (and zeroed) from a post-accumulate
    gradient hook while the backward pass runs. Each step's gradient comes from the pass that is running."""
    torch.manual_seed(0)
    model = HealthyNet()
    optimizers = {p: torch.optim.Adam([p], lr=1e-3) for p in model.parameters()}

    def step_now(param: torch.Tensor) -> None:
        optimizers[param].step()
        optimizers[param].zero_grad()

    for param in model.parameters():
        param.register_post_accumulate_grad_hook(step_now)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradGuardWarning)
        guard = watch(model, list(optimizers.values()), summary=False)
        for x, y in batches(5):
            F.mse_loss(model(x), y).backward()
        guard.close()
    report = guard.report()
    assert report.ok and report.steps == 4 * 5 and report.micro_batches == 5
    params = as_dict(guard)
    assert all(p["steps"] == 5 and p["micro_batches"] == 5 and p["none_steps"] == 0 for p in params.values())
    assert len(params) == 4
    # the diagnosis window ended inside a backward pass: its instruments came out all the same
    assert torch._C._len_torch_function_stack() == 0
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_a_parameter_whose_gradient_never_comes_never_steps_its_optimizer_and_is_named_in_a_note(quiet):
    """Stepping from gradient hooks, an unused parameter's optimizer never steps: it is never checked, and the
    report's ``never_stepped`` note names it."""
    torch.manual_seed(0)
    model = PlantedNet()
    optimizers = {p: torch.optim.SGD([p], lr=0.1) for p in model.parameters()}

    def step_now(param: torch.Tensor) -> None:
        optimizers[param].step()
        optimizers[param].zero_grad()

    for param in model.parameters():
        param.register_post_accumulate_grad_hook(step_now)
    guard = watch(model, list(optimizers.values()), summary=False)
    for x, y in batches(3):
        F.mse_loss(model(x), y).backward()
    guard.close()
    (note,) = [f for f in guard.report().findings if f.kind == "never_stepped"]
    # the detached side path and the layer never called
    assert "4 trainable parameters (side.weight, side.bias, unused.weight, unused.bias) are updated only by 4 " \
        "optimizers, which never stepped" in note.detail
    assert "a step in a gradient hook, which never runs for a parameter whose gradient never comes" in note.detail


def test_autograd_grad_calls_are_not_backward_passes(quiet):
    """A gradient penalty through torch.autograd.grad writes no .grad; it must not count as a micro-batch."""
    model = HealthyNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = watch(model, optimizer, summary=False)
    for x, y in batches(3):
        x = x.requires_grad_()
        out = model(x)
        (gx,) = torch.autograd.grad(out.sum(), x, create_graph=True)
        grads = torch.autograd.grad(out.sum(), list(model.parameters()), retain_graph=True)
        assert all(g is not None for g in grads)
        loss = F.mse_loss(out, y) + gx.pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    guard.close()
    report = guard.report()
    assert (report.steps, report.micro_batches) == (3, 3)
    assert report.ok and report.intermittent == []


# ---------------------------------------------------------------------------------------------- causes the engine tells
def test_zero_grad_between_backward_and_step_is_cleared(quiet):
    model = HealthyNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = watch(model, optimizer, summary=False)
    for x, y in batches(2):
        F.mse_loss(model(x), y).backward()
        optimizer.zero_grad()  # planted: between backward and step
        optimizer.step()
    guard.close()
    params = as_dict(guard)
    assert set(guard.report().missing) == {"encoder.weight", "encoder.bias", "head.weight", "head.bias"}
    assert {p["cause"] for p in params.values()} == {"cleared"}
    assert params["head.bias"]["none_steps"] == 2


def test_zero_grad_without_set_to_none_between_backward_and_step_is_cleared_not_zero(quiet):
    """The older default, ``zero_grad(set_to_none=False)``, in the wrong place: the step applies zeros. That is
    the misplaced ``zero_grad``, not a gradient that is zero by nature (a dead ReLU, a mask). (The optimizer's
    ``zero_grad`` is wrapped; the model's is not, so that copies of the model carry nothing of the guard.)"""
    model = HealthyNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = watch(model, optimizer, summary=False)
    for x, y in batches(3):
        F.mse_loss(model(x), y).backward()
        optimizer.zero_grad(set_to_none=False)  # planted
        optimizer.step()
    report = guard.close()
    assert set(report.missing) == {"encoder.weight", "encoder.bias", "head.weight", "head.bias"}
    assert {(p.cause, p.none_steps, p.zero_steps) for p in report.params.values()} == {("cleared", 3, 0)}
    assert "zero_grad(set_to_none=False)" in report.params["head.weight"].detail


def test_zero_grad_without_set_to_none_in_the_right_place_is_silent(quiet):
    model = HealthyNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = watch(model, optimizer, summary=False)
    for x, y in batches(3):
        optimizer.zero_grad(set_to_none=False)
        F.mse_loss(model(x), y).backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=False)
    report = guard.close()
    assert report.ok and report.missing == [] and report.findings == []


@pytest.mark.parametrize("which", ["every parameter", "one parameter"])
def test_grad_set_to_none_by_hand_between_backward_and_step_is_cleared(quiet, which):
    """``for p in model.parameters(): p.grad = None`` (the PyTorch performance guide's way of zeroing) in the wrong
    place: the step applies nothing. The read right after backward must not stand in for the step's own."""
    model = HealthyNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = watch(model, optimizer, summary=False)
    dropped = list(model.parameters()) if which == "every parameter" else [model.head.weight]
    for x, y in batches(3):
        F.mse_loss(model(x), y).backward()
        for param in dropped:
            param.grad = None
        optimizer.step()
    report = guard.close()
    names = {"encoder.weight", "encoder.bias", "head.weight", "head.bias"} if len(dropped) > 1 else {"head.weight"}
    assert set(report.missing) == names
    assert {report.params[name].cause for name in names} == {"cleared"}
    assert {report.params[name].none_steps for name in names} == {3}
    # the others kept their gradients and were updated: nothing to say about them (not "skipped by the optimizer")
    assert all(report.params[name].cause is None for name in set(report.params) - names)


def test_step_without_backward_is_no_backward(quiet):
    model = HealthyNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = watch(model, optimizer, summary=False)
    x, y = batches(1)[0]
    F.mse_loss(model(x), y).backward()
    optimizer.step()
    optimizer.zero_grad()
    model(x)  # forward only: the loss was never back-propagated
    optimizer.step()
    guard.close()
    params = as_dict(guard)
    assert params["head.weight"]["none_steps"] == 1 and params["head.weight"]["steps"] == 2
    assert params["head.weight"]["cause"] == "no_backward"


# ---------------------------------------------------------------------------------------------- strict, allow_none
def test_strict_raises_from_optimizer_step_before_any_weight_changes():
    model = PlantedNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    guard = watch(model, optimizer, strict=True, summary=False)
    x, y = batches(1)[0]
    F.mse_loss(model(x), y).backward()
    with pytest.raises(GradGuardError) as info:
        optimizer.step()
    guard.close()
    assert set(info.value.params) == PLANTED
    assert info.value.step == 0
    assert set(info.value.report.missing) == PLANTED
    message = str(info.value)
    assert "side:" in message and "unused:" in message  # grouped by module
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name
    assert optimizer.state_dict()["state"] == {}  # no momentum buffer: the step never ran


def test_strict_checks_the_next_step_after_a_caught_error(quiet):
    """A loop (or a re-run notebook cell) that catches the GradGuardError and steps again: that step has the same
    missing gradients, and strict mode must refuse it too (it went unchecked, and applied)."""
    model = PlantedNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = watch(model, optimizer, strict=True, summary=False)
    raised = []
    for x, y in batches(3):
        F.mse_loss(model(x), y).backward()
        try:
            optimizer.step()
        except GradGuardError as err:
            raised.append(err.step)
        optimizer.zero_grad()
    report = guard.close()
    assert raised == [0, 1, 2]
    assert report.params["unused.weight"].none_steps == 3


def test_allow_none_silences_matching_parameters(quiet):
    model = PlantedNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = watch(model, optimizer, allow_none=["unused.*"], strict=False, summary=False)
    train(model, optimizer, n_steps=2)
    guard.close()
    assert set(guard.report().missing) == {"side.weight", "side.bias"}
    assert "unused.weight" not in as_dict(guard)


def test_frozen_parameters_are_not_reported(quiet):
    model = HealthyNet()
    model.encoder.requires_grad_(False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # the optimizer holds the frozen ones too
    with watch(model, optimizer, summary=False) as guard:
        train(model, optimizer, n_steps=3)
    assert guard.report().ok
    assert set(as_dict(guard)) == {"head.weight", "head.bias"}



def test_lazy_modules_watched_before_their_first_forward(quiet):
    """``nn.LazyLinear`` parameters have no shape until the first forward call; watching them before it works."""

    class LazyNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.LazyLinear(1))
            self.spare = nn.LazyLinear(2)  # never called: never materialized, never given a gradient

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x)

    torch.manual_seed(0)
    model = LazyNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    guard = watch(model, optimizer, summary=False)
    train(model, optimizer, n_steps=4)
    guard.close()
    report = guard.report()
    assert report.steps == 4
    assert set(report.missing) == {"spare.weight", "spare.bias"}
    params = as_dict(guard)
    assert all(params[f"body.{i}.{kind}"]["none_steps"] == 0 for i in (0, 2) for kind in ("weight", "bias"))
    assert params["spare.weight"]["none_steps"] == 4
    if DIAGNOSIS:
        assert params["spare.weight"]["cause"] == "unused"

# ---------------------------------------------------------------------------------------------- AMP
@pytest.mark.parametrize("fused", [False, True])
def test_grad_scaler_norms_are_unscaled(tmp_path, quiet, fused):
    """GradScaler on the CPU: unscale_ before the step, or (fused Adam) the scale the optimizer divides itself."""
    torch.manual_seed(0)
    model = HealthyNet()
    try:
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused)
    except RuntimeError as err:  # pragma: no cover - a build without fused CPU kernels
        pytest.skip(str(err))
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    guard = watch(model, optimizer, log_dir=tmp_path, log_every_n_steps=1, summary=False)
    expected = {}
    for step, (x, y) in enumerate(batches(3)):
        scaler.scale(F.mse_loss(model(x), y)).backward()
        expected[step] = (model.head.weight.grad / scaler.get_scale()).norm().item()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
    guard.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    logged = {e.step: e.value for e in acc.Scalars("gradguard/norm/head.weight")}
    assert logged.keys() == expected.keys()
    for step, value in expected.items():
        assert logged[step] == pytest.approx(value, rel=1e-5)


# ---------------------------------------------------------------------------------------------- output
def test_log_dir_gets_scalars_dashboard_text_and_json(tmp_path, quiet):
    torch.manual_seed(0)
    model = PlantedNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = watch(model, optimizer, log_dir=tmp_path, log_every_n_steps=2, summary=False)
    norms = {}
    for step, (x, y) in enumerate(batches(4)):
        F.mse_loss(model(x), y).backward()
        norms[step] = model.encoder.weight.grad.norm().item()
        optimizer.step()
        optimizer.zero_grad()
    report = guard.close()

    acc = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {"gradguard/total_norm", "gradguard/none_params", "gradguard/norm/encoder.weight"} <= scalars
    assert {f"gradguard/none_steps/{n}" for n in PLANTED} <= scalars
    logged = {e.step: e.value for e in acc.Scalars("gradguard/norm/encoder.weight")}
    assert sorted(logged) == [1, 3]  # every 2nd step
    assert logged[3] == pytest.approx(norms[3], rel=1e-6)
    assert [e.value for e in acc.Scalars("gradguard/none_params")] == [4.0, 4.0]
    assert [e.value for e in acc.Scalars("gradguard/none_steps/unused.bias")] == [2.0, 4.0]
    assert "custom_scalars__config__" in acc.Tags()["tensors"]
    texts = acc.Tensors("gradguard/report/text_summary")
    assert [t.step for t in texts] == [0, 4]  # the first missing gradient, then the end
    final = report_from_text(texts[-1].tensor_proto.string_val[0].decode())
    assert final.to_dict() == report.to_dict()
    assert guard.report_path == os.path.join(str(tmp_path), "gradguard.json")
    with open(guard.report_path) as f:
        assert json.load(f) == report.to_dict()


def test_summary_writer_argument(tmp_path, quiet):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tmp_path / "run"))
    model = PlantedNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with watch(model, optimizer, writer=writer, log_every_n_steps=1, summary=False) as guard:
        train(model, optimizer, n_steps=2)
    writer.close()  # the user's writer stays the user's: GradGuard flushed it but did not close it
    acc = EventAccumulator(str(tmp_path / "run"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("gradguard/none_params")] == [0, 1]
    assert guard.report_path == str(tmp_path / "run" / "gradguard.json")


def test_close_removes_every_hook(quiet):
    model = PlantedNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with watch(model, optimizer, summary=False) as guard:
        train(model, optimizer, n_steps=2)
    assert guard.report().steps == 2
    assert not model._forward_pre_hooks
    assert all(not p._backward_hooks for p in model.parameters())
    assert not optimizer._optimizer_step_pre_hooks
    train(model, optimizer, n_steps=2)  # nothing counts any more
    assert guard.report().steps == 2


@pytest.mark.internal_error
def test_an_internal_error_turns_the_check_off_and_training_continues():
    model = HealthyNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = watch(model, optimizer, summary=False)

    def broken(*args, **kwargs):
        raise KeyError("boom")

    guard.engine.check_step = broken  # a bug inside GradGuard, not in the user's code
    before = model.head.weight.detach().clone()
    with pytest.warns(GradGuardWarning, match="internal error in 'check'"):
        train(model, optimizer, n_steps=3)
    guard.close()
    assert not torch.equal(before, model.head.weight)  # the optimizer still stepped


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"model": "not a module"}, TypeError, "`model` must be a torch.nn.Module"),
        ({"optimizer": "sgd"}, TypeError, "`optimizer` must be a torch.optim.Optimizer"),
        ({"optimizer": []}, ValueError, "at least one"),
        ({"log_dir": "x", "writer": object()}, ValueError, "either `log_dir`"),
        ({"writer": object()}, TypeError, "`writer` must be a SummaryWriter"),
        ({"log_dir": 3}, TypeError, "`log_dir` must be a path"),
        ({"log_every_n_steps": 0}, ValueError, "log_every_n_steps"),
        ({"histogram_every_n_steps": -1}, ValueError, "histogram_every_n_steps"),
        ({"norm_type": 0}, ValueError, "norm_type"),
        ({"summary": "yes"}, TypeError, "summary"),
        ({"strikt": True}, TypeError, "strikt"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, error, match):
    model = HealthyNet()
    args = {"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=0.1)}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        watch(args.pop("model"), args.pop("optimizer"), **args)


def test_optimizer_without_trainable_parameters_is_an_error():
    model = HealthyNet().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        watch(model, torch.optim.SGD(model.parameters(), lr=0.1))


# ---------------------------------------------------------------------------------------------- the example
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_plain_pytorch_example_tells_the_truth(tmp_path):
    """examples/plain_pytorch.py, run as a user runs it: the article's examples are healthy, the real bugs named."""
    import subprocess
    import sys

    example = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "plain_pytorch.py")
    env = dict(os.environ, PYTHONWARNINGS="ignore::DeprecationWarning", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, example], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    sections = result.stdout.split("\n=== ")
    assert "all 6 trainable parameters received a gradient at each of 5 optimizer steps" in sections[1]
    assert "all 7 trainable parameters received a gradient at each of 5 optimizer steps" in sections[2]
    assert "all 4 trainable parameters received a gradient at each of 10 optimizer steps" in sections[3]
    bugs = sections[4]
    assert "6 optimizer steps, 24 backward passes; 6 of 12 parameters missed a gradient" in bugs
    assert "attention.weight: no gradient at 6/6 steps, 24/24 micro-batches; cause=unused" in bugs
    assert "encoder.weight_ih_l0: no gradient at 6/6 steps, 24/24 micro-batches; cause=detached" in bugs
    assert "`states = states.detach()`" in bugs  # the line that cuts the encoder off
    assert not any(name in bugs.split("Details:")[0] for name in ("decoder.", "head."))
    run = tmp_path / "runs" / "plain_pytorch"
    assert (run / "gradguard.json").is_file()
    assert any("tfevents" in f for f in os.listdir(run))


def test_watching_the_same_loop_again_replaces_the_earlier_guard():
    """A notebook cell run twice: hooks must not pile up, and each step is counted once."""
    model = HealthyNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    first = watch(model, optimizer, summary=False)
    with pytest.warns(UserWarning, match="earlier guard is closed"):
        second = watch(model, optimizer, summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no GradGuard warning: the model is healthy
        train(model, optimizer, n_steps=2)
    second.close()
    assert first.report().steps == 0 and second.report().steps == 2
    assert len(optimizer._optimizer_step_pre_hooks) == 0
