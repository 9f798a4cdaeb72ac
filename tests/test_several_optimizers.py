"""Loops with several networks and optimizers (a GAN): both networks are logged at every cadence, and two guards on
one logger keep apart, in a plain loop and under Fabric. Every series is read back with TensorBoard's reader."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from lightning.fabric import Fabric
from lightning.fabric.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from lightning_gradguard import watch, watch_fabric

STEPS = 8  # alternating: 4 discriminator steps, 4 generator steps


@pytest.fixture(autouse=True)
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


class Generator(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class Discriminator(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def gan_steps(generator, discriminator, opt_g, opt_d, backward, n: int = STEPS) -> None:
    """D then G, one optimizer step each in turn (the optimizers' steps alternate)."""
    for _ in range(n // 2):
        fake = generator(torch.randn(5, 2))
        opt_d.zero_grad()
        d_loss = F.softplus(discriminator(fake.detach())).mean() + F.softplus(-discriminator(torch.randn(5, 3))).mean()
        backward(d_loss)
        opt_d.step()
        opt_g.zero_grad()
        backward(F.softplus(-discriminator(fake)).mean())
        opt_g.step()


def scalars(log_dir: str) -> dict[str, list[int]]:
    """Every scalar tag and the steps it was written at, read with TensorBoard's reader."""
    accumulator = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [event.step for event in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


G_TAGS = {f"gradguard/norm/generator.net.{i}.{kind}" for i in (0, 2) for kind in ("weight", "bias")}
D_TAGS = {f"gradguard/norm/discriminator.net.{i}.{kind}" for i in (0, 2) for kind in ("weight", "bias")}


@pytest.mark.parametrize("every", [1, 2, 50])
def test_plain_gan_logs_both_networks_at_every_cadence(tmp_path, every):
    torch.manual_seed(0)
    gan = nn.ModuleDict({"generator": Generator(), "discriminator": Discriminator()})
    opt_g = torch.optim.Adam(gan["generator"].parameters(), lr=1e-3)
    opt_d = torch.optim.Adam(gan["discriminator"].parameters(), lr=1e-3)
    guard = watch(gan, [opt_g, opt_d], log_dir=tmp_path, log_every_n_steps=every, summary=False)
    steps = STEPS if every < 50 else 50
    gan_steps(gan["generator"], gan["discriminator"], opt_g, opt_d, lambda loss: loss.backward(), n=steps)
    report = guard.close()
    assert report.ok and report.steps == steps
    logged = scalars(str(tmp_path))
    expected = [s for s in range(steps) if (s + 1) % every == 0]
    for tag in D_TAGS:  # each network at every logging step at which it stepped since the previous one
        assert logged[tag] == (expected if every > 1 else expected[0::2]), tag
    for tag in G_TAGS:
        assert logged[tag] == (expected if every > 1 else expected[1::2]), tag
    assert logged["gradguard/total_norm"] == expected
    if every > 1:  # both optimizers stepped since the previous logging step: one total each, and both together
        assert logged["gradguard/total_norm/optimizer_0"] == expected == logged["gradguard/total_norm/optimizer_1"]


def read_norms(log_dir: str, step: int) -> dict[str, float]:
    accumulator = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    accumulator.Reload()
    out = {}
    for tag in accumulator.Tags()["scalars"]:
        for event in accumulator.Scalars(tag):
            if event.step == step:
                out[tag] = event.value
    return out


def test_total_norm_covers_every_network_logged_at_the_step(tmp_path):
    torch.manual_seed(0)
    gan = nn.ModuleDict({"generator": Generator(), "discriminator": Discriminator()})
    opt_g = torch.optim.SGD(gan["generator"].parameters(), lr=0.0)
    opt_d = torch.optim.SGD(gan["discriminator"].parameters(), lr=0.0)
    guard = watch(gan, [opt_g, opt_d], log_dir=tmp_path, log_every_n_steps=2, summary=False)
    gan_steps(gan["generator"], gan["discriminator"], opt_g, opt_d, lambda loss: loss.backward(), n=2)
    guard.close()
    values = read_norms(str(tmp_path), 1)
    norms = [values[tag] for tag in G_TAGS | D_TAGS]
    assert values["gradguard/total_norm"] == pytest.approx(torch.tensor(norms).norm().item(), rel=1e-5)
    g_only = torch.tensor([values[tag] for tag in G_TAGS]).norm().item()
    d_only = torch.tensor([values[tag] for tag in D_TAGS]).norm().item()
    # optimizer_0 is opt_g (the first passed to watch)
    assert values["gradguard/total_norm/optimizer_0"] == pytest.approx(g_only, rel=1e-5)
    assert values["gradguard/total_norm/optimizer_1"] == pytest.approx(d_only, rel=1e-5)


def fabric_gan(tmp_path):
    fabric = Fabric(accelerator="cpu", devices=1, loggers=TensorBoardLogger(str(tmp_path), name="gan"))
    torch.manual_seed(0)
    generator, discriminator = Generator(), Discriminator()
    generator, opt_g = fabric.setup(generator, torch.optim.Adam(generator.parameters(), lr=1e-3))
    discriminator, opt_d = fabric.setup(discriminator, torch.optim.Adam(discriminator.parameters(), lr=1e-3))
    return fabric, generator, discriminator, opt_g, opt_d


@pytest.mark.parametrize("every", [1, 2, 50])
def test_fabric_gan_with_one_guard_logs_both_networks(tmp_path, every):
    fabric, generator, discriminator, opt_g, opt_d = fabric_gan(tmp_path)
    guard = watch_fabric(fabric, [generator, discriminator], [opt_g, opt_d], log_every_n_steps=every, summary=False)
    steps = STEPS if every < 50 else 50
    gan_steps(generator, discriminator, opt_g, opt_d, fabric.backward, n=steps)
    report = guard.close()
    assert report.ok and report.steps == steps and report.micro_batches == steps
    assert set(report.params) == {tag.removeprefix("gradguard/norm/") for tag in G_TAGS | D_TAGS}
    logged = scalars(fabric.logger.log_dir)
    expected = [s for s in range(steps) if (s + 1) % every == 0]
    for tag in D_TAGS:
        assert logged[tag] == (expected if every > 1 else expected[0::2]), tag
    for tag in G_TAGS:
        assert logged[tag] == (expected if every > 1 else expected[1::2]), tag


def test_two_named_guards_on_one_fabric_logger_keep_apart(tmp_path):
    fabric, generator, discriminator, opt_g, opt_d = fabric_gan(tmp_path)
    guard_g = watch_fabric(fabric, generator, opt_g, name="generator", log_every_n_steps=2, summary=False)
    guard_d = watch_fabric(fabric, discriminator, opt_d, name="discriminator", log_every_n_steps=2, summary=False)
    gan_steps(generator, discriminator, opt_g, opt_d, fabric.backward)
    report_g, report_d = guard_g.close(), guard_d.close()
    assert set(report_g.params) == {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"} == set(report_d.params)
    # each guard counts its own optimizer's steps; both see every backward pass (the discriminator's gradient
    # flows through the generator's output too)
    assert report_g.steps == report_d.steps == STEPS // 2
    log_dir = fabric.logger.log_dir
    with open(os.path.join(log_dir, "gradguard-generator.json")) as f:
        assert json.load(f) == report_g.to_dict()
    with open(os.path.join(log_dir, "gradguard-discriminator.json")) as f:
        assert json.load(f) == report_d.to_dict()
    logged = scalars(log_dir)
    assert {t for t in logged if t.startswith("gradguard/generator/norm/")} == {
        f"gradguard/generator/norm/net.{i}.{k}" for i in (0, 2) for k in ("weight", "bias")
    }
    assert {t for t in logged if t.startswith("gradguard/discriminator/norm/")} == {
        f"gradguard/discriminator/norm/net.{i}.{k}" for i in (0, 2) for k in ("weight", "bias")
    }
    assert not any(t.startswith("gradguard/norm/") for t in logged)  # nothing unnamed, nothing mixed


def test_a_second_unnamed_guard_on_the_same_logger_is_refused(tmp_path):
    fabric, generator, discriminator, opt_g, opt_d = fabric_gan(tmp_path)
    first = watch_fabric(fabric, generator, opt_g, summary=False)
    modes = torch._C._len_torch_function_stack()  # the first guard's diagnosis watches its first steps
    with pytest.raises(ValueError, match="Give each guard its own name"):
        watch_fabric(fabric, discriminator, opt_d, summary=False)
    # the refused guard left nothing behind: no diagnosis instrument, no wrapper
    assert torch._C._len_torch_function_stack() == modes
    assert not any(m._forward_hooks for m in discriminator.modules())
    first.close()
    watch_fabric(fabric, discriminator, opt_d, summary=False).close()  # the destination is free again


def test_two_unnamed_plain_guards_on_one_directory_are_refused(tmp_path):
    torch.manual_seed(0)
    generator, discriminator = Generator(), Discriminator()
    first = watch(generator, torch.optim.SGD(generator.parameters(), lr=0.1), log_dir=tmp_path, summary=False)
    with pytest.raises(ValueError, match="without a name already writes to the directory"):
        watch(discriminator, torch.optim.SGD(discriminator.parameters(), lr=0.1), log_dir=tmp_path, summary=False)
    first.close()


class SharedEmbedding(nn.Module):
    """Two networks over one embedding, each with its own optimizer that also updates the embedding (as in
    ELECTRA-style training); ``aux`` runs only when asked."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.first = nn.Linear(4, 1)
        self.second = nn.Linear(4, 1)
        self.aux = nn.Linear(4, 1)

    def forward(self, tokens: torch.Tensor, with_aux: bool) -> torch.Tensor:
        h = self.embed(tokens).mean(1)
        out = self.first(h) + self.second(h)
        return out + self.aux(h) if with_aux else out


def test_a_parameter_two_optimizers_share_has_a_window_for_each():
    """Each optimizer's step reads the embedding's arrivals over its own window: the first step does not use them
    up for the second (which then reported the embedding as missing some micro-batches). An intermittent branch is
    still told from a shared parameter."""
    torch.manual_seed(0)
    model = SharedEmbedding()
    opt_first = torch.optim.SGD([*model.embed.parameters(), *model.first.parameters(), *model.aux.parameters()],
                                lr=0.1)
    opt_second = torch.optim.SGD([*model.embed.parameters(), *model.second.parameters()], lr=0.1)
    tokens = torch.randint(0, 10, (8, 3, 5), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        guard = watch(model, [opt_first, opt_second], summary=False)
        for step in range(4):
            for micro in range(2):  # accumulate 2 micro-batches; aux runs in the first micro-batch of each window
                model(tokens[2 * step + micro], with_aux=micro == 0).pow(2).mean().backward()
            opt_first.step()
            opt_second.step()
            opt_first.zero_grad()
            opt_second.zero_grad()
        guard.close()
    report = guard.report()
    embed = report.params["embed.weight"]
    assert (embed.steps, embed.micro_batches, embed.none_steps, embed.none_micro_batches) == (8, 16, 0, 0)
    assert report.params["second.weight"].none_micro_batches == 0
    aux = report.params["aux.weight"]
    assert (aux.steps, aux.micro_batches, aux.none_steps, aux.none_micro_batches) == (4, 8, 0, 4)
    assert report.missing == [] and report.intermittent == ["aux.weight", "aux.bias"]


def gan_loop(order: str, generator, discriminator, opt_g, opt_d, backward, detach_g: bool = False) -> None:
    """D then G, the gradients cleared the ways public GAN code clears them."""
    for _ in range(4):
        fake = generator(torch.randn(5, 2))
        real = torch.randn(5, 3)
        if order == "model.zero_grad (PyTorch DCGAN example)":
            discriminator.zero_grad()
            backward(F.softplus(-discriminator(real)).mean())
            backward(F.softplus(discriminator(fake.detach())).mean())
            opt_d.step()
            generator.zero_grad()
        else:
            if order == "both zeroed at the top":
                opt_d.zero_grad()
                opt_g.zero_grad()
            backward(F.softplus(discriminator(fake.detach())).mean() + F.softplus(-discriminator(real)).mean())
            opt_d.step()
            opt_d.zero_grad()
        backward(F.softplus(-discriminator(fake.detach() if detach_g else fake)).mean())
        opt_g.step()
        if order == "zero_grad after each step":
            opt_g.zero_grad()
            opt_d.zero_grad()  # the generator's loss wrote the discriminator's gradients too


ORDERS = ["zero_grad after each step", "both zeroed at the top", "model.zero_grad (PyTorch DCGAN example)"]


def _gan_under(adapter: str, order: str, detach_g: bool = False):
    torch.manual_seed(0)
    generator, discriminator = Generator(), Discriminator()
    opt_g = torch.optim.Adam(generator.parameters(), lr=1e-3)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=1e-3)
    if adapter == "fabric":
        fabric = Fabric(accelerator="cpu", devices=1)
        generator, opt_g = fabric.setup(generator, opt_g)
        discriminator, opt_d = fabric.setup(discriminator, opt_d)
        guard = watch_fabric(fabric, {"g": generator, "d": discriminator}, [opt_g, opt_d], summary=False)
        backward = fabric.backward
    else:
        guard = watch(nn.ModuleDict({"g": generator, "d": discriminator}), [opt_g, opt_d], summary=False)
        backward = torch.Tensor.backward
    gan_loop(order, generator, discriminator, opt_g, opt_d, backward, detach_g)
    return guard.close()


@pytest.mark.parametrize("adapter", ["watch", "fabric"])
@pytest.mark.parametrize("order", ORDERS)
def test_the_discriminators_pass_is_not_a_micro_batch_the_generator_missed(adapter, order):
    # the discriminator sees the generator's output through .detach(): its backward pass and step are its own,
    # however the loop clears gradients (the model's zero_grad is not seen at all)
    report = _gan_under(adapter, order)
    assert report.ok and report.missing == [] and report.intermittent == [], report.format_table()
    generator = {name: p for name, p in report.params.items() if name.startswith("g.")}
    assert {(p.steps, p.micro_batches, p.none_micro_batches) for p in generator.values()} == {(4, 4, 0)}


@pytest.mark.parametrize("adapter", ["watch", "fabric"])
@pytest.mark.parametrize("order", ORDERS)
def test_a_generator_whose_loss_is_detached_is_still_missing_at_every_step(adapter, order):
    report = _gan_under(adapter, order, detach_g=True)
    generator = sorted(name for name in report.params if name.startswith("g."))
    assert sorted(report.missing) == generator and report.intermittent == []
    assert {report.params[name].none_steps for name in generator} == {4}
    assert {report.params[name].cause for name in generator} == {"detached"}


def test_two_named_guards_say_whose_summary_each_is(tmp_path, capsys):
    fabric, generator, discriminator, opt_g, opt_d = fabric_gan(tmp_path)
    guard_g = watch_fabric(fabric, generator, opt_g, name="generator", log_every_n_steps=2)
    guard_d = watch_fabric(fabric, discriminator, opt_d, name="discriminator", log_every_n_steps=2)
    gan_steps(generator, discriminator, opt_g, opt_d, fabric.backward)
    guard_g.close()
    guard_d.close()
    said = capsys.readouterr().out
    assert "GradGuard [generator]:" in said and "GradGuard [discriminator]:" in said
