"""The Fabric adapter: ``watch_fabric(fabric, model, optimizer)`` after ``fabric.setup``, in real Fabric loops.

Fabric calls no hook around ``fabric.backward`` or before ``optimizer.step()``; these tests run real ``Fabric``
objects on the CPU, including the real GradScaler path (``MixedPrecision("16-mixed", "cpu")``).
"""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch
import torch.nn.functional as F
from lightning.fabric import Fabric
from lightning.fabric.loggers import TensorBoardLogger
from lightning.fabric.plugins.precision import MixedPrecision
from plain_models import PLANTED, USED, BranchNet, HealthyNet, PlantedNet, batches
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_gradguard import GradGuardError
from lightning_gradguard.adapters.fabric import FabricGuard, watch_fabric

DIAGNOSIS = importlib.util.find_spec("lightning_gradguard.core.diagnosis") is not None


@pytest.fixture(autouse=True)
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def make_fabric(**kwargs) -> Fabric:
    return Fabric(accelerator="cpu", devices=1, **kwargs)


def amp_plugin(init_scale: float) -> MixedPrecision:
    """The real GradScaler path on the CPU (``precision="16-mixed"`` alone becomes bf16 there)."""
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=init_scale))


def fabric_train(fabric: Fabric, model, optimizer, n_steps: int, accumulate: int = 1) -> None:
    for i, (x, y) in enumerate(batches(n_steps * accumulate)):
        stepping = (i + 1) % accumulate == 0
        with fabric.no_backward_sync(model, enabled=not stepping):
            loss = F.mse_loss(model(x), y) / accumulate
            fabric.backward(loss)
        if stepping:
            optimizer.step()
            optimizer.zero_grad()


def test_unused_layer_and_detached_path_with_accumulation():
    torch.manual_seed(0)
    fabric = make_fabric()
    net = PlantedNet()
    model, optimizer = fabric.setup(net, torch.optim.SGD(net.parameters(), lr=0.1))
    guard = watch_fabric(fabric, model, optimizer, summary=False)
    fabric_train(fabric, model, optimizer, n_steps=3, accumulate=2)
    report = guard.close()

    assert (report.steps, report.micro_batches) == (3, 6)
    assert set(report.missing) == PLANTED
    params = report.to_dict()["params"]
    for name in PLANTED:
        assert (params[name]["none_steps"], params[name]["none_micro_batches"]) == (3, 6)
    for name in USED:  # user names, without Fabric's "_forward_module." prefix
        assert (params[name]["none_steps"], params[name]["micro_batches"]) == (0, 6)
    if DIAGNOSIS:
        assert params["unused.bias"]["cause"] == "unused"
        assert params["side.bias"]["cause"] == "detached"


def test_intermittent_branch_under_fabric():
    fabric = make_fabric()
    net = BranchNet()
    model, optimizer = fabric.setup(net, torch.optim.SGD(net.parameters(), lr=0.05))
    guard = watch_fabric(fabric, model, optimizer, summary=False)
    for i, (x, y) in enumerate(batches(8)):
        fabric.backward(F.mse_loss(model(x, use_branch=i % 4 == 0), y))  # the branch runs on 1 of 4
        if (i + 1) % 4 == 0:
            optimizer.step()
            optimizer.zero_grad()
    report = guard.close()
    assert report.intermittent == ["branch.weight", "branch.bias"]
    branch = report.to_dict()["params"]["branch.weight"]
    assert (branch["steps"], branch["none_steps"], branch["micro_batches"], branch["none_micro_batches"]) == (
        2,
        0,
        8,
        6,
    )


def test_strict_raises_before_fabric_steps():
    fabric = make_fabric()
    net = PlantedNet()
    model, optimizer = fabric.setup(net, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9))
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    guard = watch_fabric(fabric, model, optimizer, strict=True, summary=False)
    x, y = batches(1)[0]
    fabric.backward(F.mse_loss(model(x), y))
    with pytest.raises(GradGuardError) as info:
        optimizer.step()
    guard.close()
    assert set(info.value.params) == PLANTED
    assert all(torch.equal(p, before[n]) for n, p in net.named_parameters())


def test_amp_norms_are_unscaled_and_skipped_steps_counted(tmp_path):
    """16-mixed with a GradScaler: gradients stay scaled until scaler.step; an overflow skips the step."""
    torch.manual_seed(0)
    fabric = make_fabric(plugins=[amp_plugin(init_scale=256.0)], loggers=TensorBoardLogger(str(tmp_path)))
    net = HealthyNet()
    model, optimizer = fabric.setup(net, torch.optim.SGD(net.parameters(), lr=0.01))
    guard = watch_fabric(fabric, model, optimizer, log_every_n_steps=1, summary=False)
    scaler = fabric.strategy.precision.scaler
    expected = {}
    data = batches(5)
    for step, (x, y) in enumerate(data):
        if step == 2:
            x = x * 1e6  # planted overflow: fp16 activations become inf, the scaler skips this step
        fabric.backward(F.mse_loss(model(x), y))
        expected[step] = (net.head.weight.grad.float() / scaler.get_scale()).norm().item()
        optimizer.step()
        optimizer.zero_grad()
    report = guard.close()

    assert report.amp_skipped_steps == 1
    assert report.missing == []  # an overflow is a non-finite gradient, never a missing one
    assert report.params["head.weight"].nonfinite_steps == 1
    acc = EventAccumulator(fabric.logger.experiment.get_logdir())
    acc.Reload()
    logged = {e.step: e.value for e in acc.Scalars("gradguard/norm/head.weight")}
    for step in (0, 1, 3, 4):
        assert logged[step] == pytest.approx(expected[step], rel=1e-4), step
    assert [e.value for e in acc.Scalars("gradguard/amp_skipped_steps")] == [0.0, 0.0, 1.0, 1.0, 1.0]


def test_clip_gradients_unscaled_first_is_not_divided_twice(tmp_path):
    torch.manual_seed(0)
    fabric = make_fabric(plugins=[amp_plugin(init_scale=64.0)])
    net = HealthyNet()
    model, optimizer = fabric.setup(net, torch.optim.SGD(net.parameters(), lr=0.01))
    guard = watch_fabric(fabric, model, optimizer, log_dir=tmp_path, log_every_n_steps=1, summary=False)
    expected = {}
    for step, (x, y) in enumerate(batches(2)):
        fabric.backward(F.mse_loss(model(x), y))
        fabric.clip_gradients(model, optimizer, max_norm=1e6)  # unscales, clips nothing
        expected[step] = net.head.weight.grad.float().norm().item()
        optimizer.step()
        optimizer.zero_grad()
    guard.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    logged = {e.step: e.value for e in acc.Scalars("gradguard/norm/head.weight")}
    assert logged == pytest.approx(expected, rel=1e-5)


def test_fabric_tensorboard_logger_gets_the_dashboard(tmp_path):
    fabric = make_fabric(loggers=TensorBoardLogger(str(tmp_path)))
    net = PlantedNet()
    model, optimizer = fabric.setup(net, torch.optim.Adam(net.parameters(), lr=1e-3))
    with watch_fabric(fabric, model, optimizer, log_every_n_steps=1, summary=False) as guard:
        fabric_train(fabric, model, optimizer, n_steps=3)
    acc = EventAccumulator(fabric.logger.experiment.get_logdir(), size_guidance={"tensors": 0})
    acc.Reload()
    assert "gradguard/none_steps/unused.weight" in acc.Tags()["scalars"]
    assert "custom_scalars__config__" in acc.Tags()["tensors"]
    assert [t.step for t in acc.Tensors("gradguard/report/text_summary")] == [0, 3]
    assert guard.report_path is not None and guard.report_path.endswith("gradguard.json")


def test_close_restores_the_fabric_optimizer():
    fabric = make_fabric()
    net = HealthyNet()
    model, optimizer = fabric.setup(net, torch.optim.SGD(net.parameters(), lr=0.1))
    guard = watch_fabric(fabric, model, optimizer, summary=False)
    assert "step" in vars(optimizer)
    fabric_train(fabric, model, optimizer, n_steps=2)
    guard.close()
    assert "step" not in vars(optimizer)
    assert not net._forward_pre_hooks and not model._forward_pre_hooks
    fabric_train(fabric, model, optimizer, n_steps=2)
    assert guard.report().steps == 2


def test_bad_arguments():
    net = HealthyNet()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="`fabric` must be a lightning.fabric.Fabric"):
        FabricGuard(object(), net, [optimizer])
    with pytest.raises(ValueError, match="at least one optimizer"):
        watch_fabric(make_fabric(), net)


def test_an_optimizer_set_up_after_watch_fabric_is_checked_too():
    torch.manual_seed(0)
    fabric = make_fabric()
    model = PlantedNet()
    model, first = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    guard = watch_fabric(fabric, model, first, summary=False)
    for x, y in batches(2):
        fabric.backward(F.mse_loss(model(x), y))
        first.step()
        first.zero_grad()
    second = fabric.setup_optimizers(torch.optim.Adam(model.parameters(), lr=1e-3))  # a second training stage
    for x, y in batches(3):
        fabric.backward(F.mse_loss(model(x), y))
        second.step()
        second.zero_grad()
    report = guard.close()
    assert report.steps == 5
    assert set(report.missing) == PLANTED and all(report.params[name].none_steps == 5 for name in PLANTED)
    assert all(report.params[name].none_steps == 0 for name in USED)


def test_zero_grad_between_fabric_backward_and_step_is_cleared():
    """The classic misplaced ``zero_grad``: the step applies nothing, and the guard must say so (it reused its read
    from right after ``fabric.backward``, and reported every gradient there)."""
    torch.manual_seed(0)
    fabric = make_fabric()
    net = HealthyNet()
    model, optimizer = fabric.setup(net, torch.optim.SGD(net.parameters(), lr=0.1))
    guard = watch_fabric(fabric, model, optimizer, summary=False)
    for x, y in batches(3):
        fabric.backward(F.mse_loss(model(x), y))
        optimizer.zero_grad()
        optimizer.step()
    report = guard.close()
    assert sorted(report.missing) == sorted(name for name, _ in net.named_parameters())
    assert {p.cause for p in report.params.values()} == {"cleared"}
    assert all(p.none_steps == 3 and p.none_micro_batches == 0 for p in report.params.values())


@pytest.mark.parametrize("how", ["model.zero_grad", "grad = None"])
def test_gradients_dropped_another_way_between_backward_and_step_are_cleared(how):
    torch.manual_seed(0)
    fabric = make_fabric()
    net = HealthyNet()
    model, optimizer = fabric.setup(net, torch.optim.SGD(net.parameters(), lr=0.1))
    guard = watch_fabric(fabric, model, optimizer, summary=False)
    for x, y in batches(2):
        fabric.backward(F.mse_loss(model(x), y))
        if how == "model.zero_grad":
            model.zero_grad()
        else:
            net.head.weight.grad = None
        optimizer.step()
        optimizer.zero_grad()
    report = guard.close()
    expected = ["head.weight"] if how == "grad = None" else sorted(name for name, _ in net.named_parameters())
    assert sorted(report.missing) == expected
    assert report.params["head.weight"].cause == "cleared"


def test_one_guard_over_a_gan_whose_generator_output_feeds_both_losses():
    """D then G from one generator forward: ``opt_g.zero_grad()`` before the generator's backward pass starts its
    window there, so the discriminator's pass (through ``fake.detach()``) is not a micro-batch the generator missed."""
    torch.manual_seed(0)
    fabric = make_fabric()
    generator = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4))
    critic = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LeakyReLU(0.2), torch.nn.Linear(8, 1))
    generator, opt_g = fabric.setup(generator, torch.optim.Adam(generator.parameters(), lr=1e-3))
    critic, opt_d = fabric.setup(critic, torch.optim.Adam(critic.parameters(), lr=1e-3))
    guard = watch_fabric(fabric, {"g": generator, "d": critic}, [opt_g, opt_d], summary=False)
    ones, zeros = torch.ones(16, 1), torch.zeros(16, 1)
    for _ in range(4):
        real, fake = torch.randn(16, 4), generator(torch.randn(16, 2))
        opt_d.zero_grad()
        loss_d = F.binary_cross_entropy_with_logits(critic(real), ones) + F.binary_cross_entropy_with_logits(
            critic(fake.detach()), zeros
        )
        fabric.backward(loss_d)
        opt_d.step()
        opt_g.zero_grad()
        fabric.backward(F.binary_cross_entropy_with_logits(critic(fake), ones))
        opt_g.step()
    report = guard.close()
    assert report.ok and report.missing == [] and report.intermittent == []
    assert {name: p.steps for name, p in report.params.items() if name.startswith("g.")} == dict.fromkeys(
        ["g.0.weight", "g.0.bias", "g.2.weight", "g.2.bias"], 4
    )
    assert all(p.micro_batches == 4 for name, p in report.params.items() if name.startswith("g."))
