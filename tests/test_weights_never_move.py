"""Weights that never move: a parameter that receives gradients but that the optimizer's steps leave where it was.

Planted in real runs (the Trainer, plain loops, Fabric, the Hugging Face Trainer) on an MLP, a small conv net and a
GRU language model: a param group whose learning rate is 0 for the whole run, and optimizers that skip a group or
a parameter. The legitimate ways a step leaves a weight still stay silent: a warmup from 0, a decay that ends at 0,
steps the AMP GradScaler skips, frozen parameters, weight decay on zero gradients, optimizers whose kernels write
around the version counter (``fused=True``, ``p.data``).
"""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from lightning.fabric import Fabric
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.precision import MixedPrecision
from models import IN_DIM, HealthyMLP, gradguard_warnings, regression_loader, token_loader
from torch import Tensor, nn

from lightning_gradguard import GradGuard, GradGuardError, GradGuardWarning, GradReport, watch
from lightning_gradguard.adapters.fabric import watch_fabric
from lightning_gradguard.report import NOTE, WARNING

NEVER_MOVED = ("zero_lr", "skipped_by_optimizer")
HEAD = ["head.weight", "head.bias"]


def never_moved(report: GradReport) -> dict[str, tuple[str, str, str]]:
    """name -> (kind, severity, detail) of the findings about weights that never moved."""
    return {f.name: (f.kind, f.severity, f.detail) for f in report.findings if f.kind in NEVER_MOVED}


def moved_warnings(record) -> list[str]:
    return [text for text in gradguard_warnings(record) if "never moved" in text]


# ---------------------------------------------------------------------------------------------- optimizers
class SkipLastGroupSGD(torch.optim.SGD):
    """The planted bug: a hand-written step that forgets the last param group."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups[:-1]:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"])
        return loss


class SkippingWrapper(torch.optim.Optimizer):
    """The planted bug: a wrapper that steps an inner SGD built over every parameter but one."""

    def __init__(self, params, forgotten: Tensor, lr: float = 0.05) -> None:
        super().__init__(params, {"lr": lr})
        kept = [p for group in self.param_groups for p in group["params"] if p is not forgotten]
        self.inner = torch.optim.SGD(kept, lr=lr)

    def step(self, closure=None):
        return self.inner.step(closure)


class SkipZeroGradSGD(torch.optim.SGD):
    """Legitimate: a step that leaves a parameter whose gradient is zero everywhere alone (nothing to apply)."""

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            with torch.enable_grad():
                closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and bool(p.grad.any()):
                    p.add_(p.grad, alpha=-group["lr"])


class DataSGD(torch.optim.SGD):
    """Legitimate, old-style: writes through ``p.data``, which autograd's version counter does not see."""

    def step(self, closure=None):
        if closure is not None:
            closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.data.add_(p.grad.data, alpha=-group["lr"])


# ---------------------------------------------------------------------------------------------- models
class GroupedMLP(LightningModule):
    """A body and a head in two param groups; ``head_lr`` is the head group's learning rate."""

    def __init__(self, head_lr: float = 0.0, optimizer: str = "adamw", schedule=None, interval: str = "step",
                 manual: bool = False, zero_head: bool = False, weight_decay: float = 0.0) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(IN_DIM, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
        self.head = nn.Linear(8, 1)
        self.head_lr, self.kind, self.schedule, self.interval = head_lr, optimizer, schedule, interval
        self.zero_head, self.weight_decay = zero_head, weight_decay
        self.automatic_optimization = not manual

    def forward(self, x: Tensor) -> Tensor:
        h = self.body(x)
        return h.sum(-1, keepdim=True) + self.head(h) * (0.0 if self.zero_head else 1.0)

    def training_step(self, batch, batch_idx: int):
        x, y = batch
        loss = F.mse_loss(self(x), y)
        if self.automatic_optimization:
            return loss
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        return None

    def configure_optimizers(self):
        groups = [{"params": self.body.parameters()},
                  {"params": self.head.parameters(), "lr": self.head_lr, "weight_decay": self.weight_decay}]
        if self.kind == "adamw":
            opt = torch.optim.AdamW(groups, lr=0.01, weight_decay=0.0)
        elif self.kind == "skip_last_group":
            opt = SkipLastGroupSGD(groups, lr=0.1)
        else:
            opt = {"skip_zero_grad": SkipZeroGradSGD, "data": DataSGD}[self.kind](groups, lr=0.1)
        if self.schedule is None:
            return opt
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, self.schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": self.interval}}


class GRULM(LightningModule):
    """Embedding, GRU and head; ``frozen_lr`` puts the GRU's four tensors in a param group at that learning rate."""

    def __init__(self, frozen_lr: float = 0.0) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.gru = nn.GRU(8, 8, batch_first=True)
        self.head = nn.Linear(8, 11)
        self.frozen_lr = frozen_lr

    def training_step(self, batch, batch_idx: int) -> Tensor:
        tokens, _ = batch
        hidden, _ = self.gru(self.embed(tokens[:, :-1]))
        return F.cross_entropy(self.head(hidden).reshape(-1, 11), tokens[:, 1:].reshape(-1))

    def configure_optimizers(self):
        others = [p for n, p in self.named_parameters() if not n.startswith("gru.")]
        return torch.optim.AdamW([{"params": others}, {"params": self.gru.parameters(), "lr": self.frozen_lr}], lr=0.01)


GRU = ["gru.weight_ih_l0", "gru.weight_hh_l0", "gru.bias_ih_l0", "gru.bias_hh_l0"]


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


CONV = ["conv.weight", "conv.bias"]


def image_batches(n: int, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 1, 4, 4, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(n)]


def conv_groups(model: ConvNet, conv_lr: float) -> list[dict]:
    return [{"params": [*model.bn.parameters(), *model.fc.parameters()]},
            {"params": model.conv.parameters(), "lr": conv_lr}]


def train_loop(model: nn.Module, optimizer, n: int, scaler=None, overflow=()) -> None:
    for i, (x, y) in enumerate(image_batches(n)):
        loss = F.cross_entropy(model(x), y)
        if i in overflow:
            loss = loss * float("inf")  # the scaler finds Inf gradients and skips this step
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        optimizer.zero_grad()


def fit(make_trainer, module, guard, n_batches: int = 8, **trainer_options):
    trainer = make_trainer(callbacks=[guard], **trainer_options)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(module, train_dataloaders=regression_loader(n_batches))
    return trainer, guard.report(), record


# ---------------------------------------------------------------------------------------------- planted: lr=0
def test_a_param_group_at_lr_zero_is_named_with_its_group_and_lr(make_trainer, tmp_path):
    guard = GradGuard()
    trainer, report, record = fit(make_trainer, GroupedMLP(head_lr=0.0), guard, logger=CSVLogger(tmp_path))

    found = never_moved(report)
    assert sorted(found) == sorted(HEAD)
    for kind, severity, detail in found.values():
        assert (kind, severity) == ("zero_lr", WARNING)
        assert detail.startswith("param group 1 of AdamW has lr=0: its learning rate was 0 at each of its 8 ")
        assert "fix: give the group a learning rate > 0" in detail
    assert not report.ok
    for name in HEAD:
        p = report.params[name]
        assert (p.steps, p.none_steps, p.update_steps, p.zero_lr_steps) == (8, 0, 8, 8)
    body = report.params["body.0.weight"]
    assert (body.update_steps, body.zero_lr_steps, body.untouched_steps) == (8, 0, 0)
    assert body.version_steps >= 2

    summary = report.summary()
    assert "[zero_lr] head.weight: param group 1 of AdamW has lr=0" in summary
    assert "[zero_lr] head.bias: param group 1 of AdamW has lr=0" in summary
    [warning] = moved_warnings(record)  # once, at the end of fit
    assert warning.startswith("GradGuard: 2 trainable parameters never moved in this run:\n  head.weight, head.bias  "
                              "[zero_lr] param group 1 of AdamW has lr=0")
    saved = json.load(open(guard.report_path))
    assert saved["params"]["head.weight"]["zero_lr_steps"] == 8
    assert GradReport.load(guard.report_path).to_dict() == report.to_dict()


def test_strict_mode_names_the_frozen_group_at_the_end_of_fit_not_before(make_trainer):
    guard = GradGuard(strict=True)
    trainer = make_trainer(callbacks=[guard])
    with pytest.raises(GradGuardError) as info:
        trainer.fit(GRULM(frozen_lr=0.0), train_dataloaders=token_loader(6))
    assert trainer.global_step == 6  # the whole run ran: a warmup from 0 would have had its chance to end
    error = info.value
    assert sorted(error.params) == sorted(GRU)
    assert str(error).startswith(f"GradGuard: 4 trainable parameters never moved in this run:\n  {', '.join(GRU)}  "
                                 "[zero_lr] param group 1 of AdamW has lr=0: its learning rate was 0 at each of its 6 ")
    assert error.step == 5
    assert sorted(never_moved(error.report)) == sorted(GRU)
    assert error.report.missing == []  # the only problem


def test_a_plain_loop_names_the_conv_layer_frozen_by_its_learning_rate():
    torch.manual_seed(0)
    model = ConvNet()
    optimizer = torch.optim.SGD(conv_groups(model, 0.0), lr=0.1, momentum=0.9)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        guard = watch(model, optimizer, summary=False)
        train_loop(model, optimizer, 10)
        report = guard.close()
    found = never_moved(report)
    assert sorted(found) == sorted(CONV)
    assert all(d.startswith("param group 1 of SGD has lr=0: its learning rate was 0 at each of its 10 optimizer steps")
               for _, _, d in found.values())
    assert [report.params[n].zero_lr_steps for n in CONV] == [10, 10]
    [warning] = moved_warnings(record)
    assert warning.splitlines()[1].startswith("  conv.weight, conv.bias  [zero_lr] param group 1 of SGD has lr=0")
    assert "[zero_lr] conv.weight: param group 1 of SGD" in report.summary()


def test_strict_mode_under_a_plain_loop_raises_at_close():
    model = ConvNet()
    optimizer = torch.optim.Adam(conv_groups(model, 0.0), lr=0.01)
    guard = watch(model, optimizer, strict=True, summary=False)
    train_loop(model, optimizer, 4)
    with pytest.raises(GradGuardError) as info:
        guard.close()
    assert sorted(info.value.params) == sorted(CONV)
    assert "param group 1 of Adam has lr=0" in str(info.value)
    assert guard.close().findings  # closed: the report stays, nothing is raised twice


def test_fabric_names_the_frozen_group():
    model = ConvNet()
    fabric = Fabric(accelerator="cpu", devices=1)
    wrapped, optimizer = fabric.setup(model, torch.optim.AdamW(conv_groups(model, 0.0), lr=0.01))
    guard = watch_fabric(fabric, wrapped, optimizer, summary=False)
    for x, y in image_batches(5):
        fabric.backward(F.cross_entropy(wrapped(x), y))
        optimizer.step()
        optimizer.zero_grad()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        report = guard.close()
    assert sorted(never_moved(report)) == sorted(CONV)
    assert len(moved_warnings(record)) == 1


def test_manual_optimization_and_accumulation_count_the_steps_that_ran(make_trainer):
    _, report, _ = fit(make_trainer, GroupedMLP(head_lr=0.0, manual=True), GradGuard(summary=False), n_batches=6)
    assert sorted(never_moved(report)) == sorted(HEAD)
    assert report.params["head.weight"].update_steps == 6

    _, report, _ = fit(make_trainer, GroupedMLP(head_lr=0.0), GradGuard(summary=False), n_batches=8,
                       accumulate_grad_batches=4)
    assert sorted(never_moved(report)) == sorted(HEAD)
    p = report.params["head.bias"]
    assert (p.steps, p.micro_batches, p.update_steps, p.zero_lr_steps) == (2, 8, 2, 2)


def test_a_scheduler_that_holds_a_group_at_zero_is_named_as_such(make_trainer):
    # an epoch-interval warmup that starts at 0, in a run of one epoch: nothing trained in this run
    module = GroupedMLP(head_lr=0.01, schedule=lambda epoch: min(1.0, epoch / 2), interval="epoch")
    _, report, _ = fit(make_trainer, module, GradGuard(summary=False), n_batches=4)
    found = never_moved(report)
    assert sorted(found) == sorted(["body.0.weight", "body.0.bias", "body.2.weight", "body.2.bias", *HEAD])
    detail = found["head.weight"][2]
    assert detail.startswith("param group 1 of AdamW had lr=0 at each of its 4 optimizer steps: its learning-rate "
                             "scheduler held it there (initial_lr=0.01)")
    assert "a warmup from 0 that did not end within this run" in detail


# ---------------------------------------------------------------------------------------------- planted: skipped
def test_an_optimizer_that_skips_a_group_is_named(make_trainer):
    guard = GradGuard(strict=True, log_every_n_steps=2)
    trainer = make_trainer(callbacks=[guard])
    with pytest.raises(GradGuardError) as info:
        trainer.fit(GroupedMLP(head_lr=0.1, optimizer="skip_last_group"), train_dataloaders=regression_loader(8))
    assert sorted(info.value.params) == sorted(HEAD)
    message = str(info.value)
    assert "head.weight, head.bias  [skipped_by_optimizer] SkipLastGroupSGD.step() left it untouched" in message
    assert "it is in param group 1 (lr=0.1)" in message
    p = info.value.report.params["head.weight"]
    assert p.version_steps == p.untouched_steps >= 2 and p.zero_lr_steps == 0


def test_a_wrapper_that_forgets_one_parameter_is_named():
    torch.manual_seed(0)
    model = ConvNet()
    optimizer = SkippingWrapper(model.parameters(), forgotten=model.fc.bias)
    guard = watch(model, optimizer, summary=False, log_every_n_steps=1)
    train_loop(model, optimizer, 6)
    with pytest.warns(GradGuardWarning, match=r"1 trainable parameter never moved in this run:\n  fc.bias  "):
        report = guard.close()
    found = never_moved(report)
    assert list(found) == ["fc.bias"]
    kind, severity, detail = found["fc.bias"]
    assert (kind, severity) == ("skipped_by_optimizer", WARNING)
    assert detail.startswith("SkippingWrapper.step() left it untouched at each of the 2 steps GradGuard observed (its "
                             "version counter did not change, while other parameters' did), although it had a gradient")
    assert "param group 0 (lr=0.05)" in detail


# ---------------------------------------------------------------------------------------------- silent
SCHEDULES = {
    "warmup from 0 at the first step": lambda step: min(1.0, step / 3),
    "a decay that ends at 0 for the last steps": lambda step: max(0.0, 1.0 - step / 5),
}


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_schedules_that_touch_zero_stay_silent(make_trainer, schedule):
    guard = GradGuard(strict=True)
    _, report, record = fit(make_trainer, GroupedMLP(head_lr=0.01, schedule=SCHEDULES[schedule]), guard)
    assert never_moved(report) == {} and moved_warnings(record) == []
    assert report.ok
    assert report.params["head.weight"].zero_lr_steps in (1, 3)  # counted, and no more than that


def test_an_epoch_warmup_from_zero_that_ends_stays_silent(make_trainer):
    module = GroupedMLP(head_lr=0.01, schedule=lambda epoch: min(1.0, epoch / 1), interval="epoch")
    _, report, record = fit(make_trainer, module, GradGuard(strict=True), n_batches=3, max_epochs=2)
    assert never_moved(report) == {} and moved_warnings(record) == []
    assert report.params["head.weight"].zero_lr_steps == 3 and report.params["head.weight"].update_steps == 6


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_torch_schedules_that_end_at_zero_stay_silent(schedule):
    model = ConvNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    if schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=4, eta_min=0.0)
    else:
        scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=0.0, total_iters=4)
    guard = watch(model, optimizer, strict=True, summary=False)
    for x, y in image_batches(5):
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    report = guard.close()
    assert never_moved(report) == {} and report.params["fc.weight"].zero_lr_steps == 1


def test_one_step_at_lr_zero_is_a_note_not_an_error(make_trainer):
    guard = GradGuard(strict=True, summary=False)
    module = GroupedMLP(head_lr=0.01, schedule=lambda step: step / 10)  # a warmup from 0, and a one-step run
    _, report, record = fit(make_trainer, module, guard, fast_dev_run=True)
    found = never_moved(report)
    assert len(found) == 6 and {severity for _, severity, _ in found.values()} == {NOTE}
    assert "at the only optimizer step of this run" in found["head.weight"][2]
    assert "a warmup that starts at 0 looks the same" in found["head.weight"][2]
    assert report.ok and moved_warnings(record) == []


def test_steps_the_amp_scaler_skips_are_not_counted():
    model = ConvNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    guard = watch(model, optimizer, strict=True, summary=False, log_every_n_steps=1)
    train_loop(model, optimizer, 6, scaler=scaler, overflow={0, 1, 3})
    report = guard.close()
    assert never_moved(report) == {}
    p = report.params["conv.weight"]
    assert (p.steps, p.update_steps, p.version_steps, p.untouched_steps) == (3, 3, 2, 0)  # skipped: not checked


def test_lightning_16_mixed_with_skipped_steps_stays_silent(make_trainer):
    class Overflowing(GroupedMLP):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * float("inf") if batch_idx < 2 else loss

    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    guard = GradGuard(strict=True, summary=False)
    _, report, record = fit(make_trainer, Overflowing(head_lr=0.01), guard,
                            plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    assert never_moved(report) == {} and moved_warnings(record) == []
    p = report.params["head.weight"]
    assert (p.steps, p.update_steps, p.version_steps, p.untouched_steps) == (8, 6, 0, 0)


def test_frozen_parameters_in_a_zero_lr_group_stay_silent(make_trainer):
    module = GroupedMLP(head_lr=0.0)
    module.head.requires_grad_(False)  # the usual way to freeze, with the group's lr at 0 as well
    _, report, record = fit(make_trainer, module, GradGuard(strict=True))
    assert never_moved(report) == {} and moved_warnings(record) == []
    assert "head.weight" not in report.params and report.ok


@pytest.mark.parametrize("optimizer", ["adamw", "skip_zero_grad"])
def test_weight_decay_on_zero_gradients_stays_silent(make_trainer, optimizer):
    module = GroupedMLP(head_lr=0.01, optimizer=optimizer, zero_head=True, weight_decay=0.1)
    _, report, record = fit(make_trainer, module, GradGuard(strict=True, nonfinite_check="every_step"))
    assert never_moved(report) == {} and moved_warnings(record) == []
    p = report.params["head.weight"]
    # the zero gradients are what the skipping optimizer leaves alone: every observed step left the head untouched
    assert p.untouched_steps == (p.version_steps if optimizer == "skip_zero_grad" else 0) and p.version_steps >= 2


def test_optimizers_that_write_around_the_version_counter_stay_silent(make_trainer):
    for module in (GroupedMLP(head_lr=0.01, optimizer="data"),):
        _, report, record = fit(make_trainer, module, GradGuard(strict=True))
        assert never_moved(report) == {} and moved_warnings(record) == []
        assert report.params["head.weight"].version_steps == 0  # every step looked alike: nothing to tell
    model = ConvNet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, fused=True)
    guard = watch(model, optimizer, strict=True, summary=False)
    train_loop(model, optimizer, 4)
    report = guard.close()
    assert never_moved(report) == {} and report.params["conv.weight"].version_steps == 0


# ---------------------------------------------------------------------------------------------- state
def test_the_counts_survive_a_checkpoint(make_trainer, tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = GradGuard(summary=False)
    trainer = make_trainer(callbacks=[first, checkpoint], enable_checkpointing=True, max_epochs=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradGuardWarning)
        trainer.fit(GroupedMLP(head_lr=0.0), train_dataloaders=regression_loader(4))
    resumed = GradGuard(summary=False)
    trainer = make_trainer(callbacks=[resumed], max_epochs=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradGuardWarning)
        trainer.fit(GroupedMLP(head_lr=0.0), train_dataloaders=regression_loader(4),
                    ckpt_path=os.path.join(tmp_path, "ckpt", "last.ckpt"))
    report = resumed.report()
    p = report.params["head.weight"]
    assert (p.steps, p.update_steps, p.zero_lr_steps) == (8, 8, 8)
    assert "at each of its 8 optimizer steps" in never_moved(report)["head.weight"][2]


def test_the_step_hooks_come_off(make_trainer):
    model = ConvNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    hooks = len(optimizer._optimizer_step_post_hooks)
    guard = watch(model, optimizer, summary=False)
    train_loop(model, optimizer, 2)
    guard.close()
    assert len(optimizer._optimizer_step_post_hooks) == hooks

    module = GroupedMLP(head_lr=0.01)
    trainer, _, _ = fit(make_trainer, module, GradGuard(summary=False), n_batches=2)
    assert len(trainer.optimizers[0]._optimizer_step_post_hooks) == 0


def test_the_report_file_holds_the_new_counts_and_rejects_bad_ones():
    report = GradReport(steps=3, micro_batches=3)
    data = report.to_dict()
    data["params"] = {"w": {"steps": 3, "update_steps": 3, "zero_lr_steps": 3, "version_steps": 2,
                            "untouched_steps": 0}}
    assert GradReport.from_dict(data).params["w"].zero_lr_steps == 3
    data["params"]["w"]["untouched_steps"] = -1
    with pytest.raises(ValueError, match=r'params\["w"\].untouched_steps must be a non-negative integer'):
        GradReport.from_dict(data)


# ------------------------------------------------------------------------------------------- the Hugging Face Trainer
def hf_train(tmp_path, guard, optimizers=(None, None), **options):
    transformers = pytest.importorskip("transformers", reason="the hf extra: pip install 'lightning-gradguard[hf]'")
    pytest.importorskip("accelerate", reason="the hf extra: pip install 'lightning-gradguard[hf]'")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    model = transformers.GPT2LMHeadModel(config)
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (16, 12), generator=g)]
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4, learning_rate=1e-2,
                    report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, logging_steps=1, seed=0)
    settings.update(options)
    if optimizers == "ln_f at lr=0":
        ln_f = set(model.transformer.ln_f.parameters())
        groups = [{"params": [p for p in model.parameters() if p not in ln_f]}, {"params": list(ln_f), "lr": 0.0}]
        optimizers = (torch.optim.AdamW(groups, lr=1e-2), None)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer = transformers.Trainer(model=model, args=transformers.TrainingArguments(**settings),
                                       train_dataset=data, callbacks=[guard], optimizers=optimizers)
        trainer.train()
    return guard.report(), record


def test_the_hugging_face_trainer_names_a_group_at_lr_zero(tmp_path):
    from lightning_gradguard.hf import GradGuardCallback

    report, record = hf_train(tmp_path, GradGuardCallback(summary=False), optimizers="ln_f at lr=0")
    found = never_moved(report)
    assert sorted(found) == ["transformer.ln_f.bias", "transformer.ln_f.weight"]
    assert all(d.startswith("param group 1 of AdamW has lr=0: its learning rate was 0 at each of its 4 optimizer")
               for _, _, d in found.values())
    assert len(moved_warnings(record)) == 1
    saved = json.loads((tmp_path / "gradguard.json").read_text())
    assert {f["name"] for f in saved["findings"] if f["kind"] == "zero_lr"} == set(found)


def test_the_hugging_face_warmup_from_zero_stays_silent(tmp_path):
    from lightning_gradguard.hf import GradGuardCallback

    report, record = hf_train(tmp_path, GradGuardCallback(strict=True, summary=False), warmup_steps=2)
    assert never_moved(report) == {} and moved_warnings(record) == []
    assert report.params["transformer.h.0.attn.c_attn.weight"].zero_lr_steps == 1


def test_strict_mode_under_the_hugging_face_trainer_raises_once_the_report_is_written(tmp_path):
    from lightning_gradguard.hf import GradGuardCallback

    guard = GradGuardCallback(strict=True, summary=False)
    with pytest.raises(GradGuardError) as info:
        hf_train(tmp_path, guard, optimizers="ln_f at lr=0")
    assert sorted(info.value.params) == ["transformer.ln_f.bias", "transformer.ln_f.weight"]
    assert "param group 1 of AdamW has lr=0" in str(info.value)
    saved = json.loads((tmp_path / "gradguard.json").read_text())
    assert {f["name"] for f in saved["findings"] if f["kind"] == "zero_lr"} == set(info.value.params)
    assert guard.report_path == str(tmp_path / "gradguard.json")


def test_close_after_strict_mode_stopped_the_run_raises_nothing_more():
    model = ConvNet()
    optimizer = torch.optim.SGD(conv_groups(model, 0.0), lr=0.1)
    guard = watch(model, optimizer, strict=True, summary=False)
    train_loop(model, optimizer, 3)
    x, y = image_batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    optimizer.zero_grad()  # planted between backward and step: strict mode stops the run at this step
    with pytest.raises(GradGuardError, match="fc.weight"):
        optimizer.step()
    report = guard.close()  # the verdict is in the report; the run already raised
    assert sorted(never_moved(report)) == sorted(CONV)


class HeadHeldForTwoSteps(HealthyMLP):
    """A warm-up that holds the last layer still for the first two steps (its gradients dropped in the module's own
    ``on_before_optimizer_step``, which runs after the callbacks'), the very steps GradGuard observes first."""

    def on_before_optimizer_step(self, optimizer):
        if self.trainer.global_step < 2:
            for p in self.l3.parameters():
                p.grad = None


def test_a_weight_held_still_at_the_observed_steps_only_is_not_reported(make_trainer):
    # versions are compared at a sample of steps (the first two, then every 50th): a weight whose version counter
    # moved during the run did move, whatever the sample saw
    torch.manual_seed(0)
    guard = GradGuard(summary=False)
    trainer = make_trainer(callbacks=[guard], max_steps=12)
    model = HeadHeldForTwoSteps()
    before = model.l3.weight.detach().clone()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(model, regression_loader(12))
    assert not torch.equal(model.l3.weight, before)
    report = guard.report()
    assert never_moved(report) == {} and moved_warnings(record) == [] and report.ok
    assert report.params["l3.weight"].untouched_steps == 2  # what the sample saw stays counted


def test_weight_clipping_outside_the_step_does_not_hide_a_group_the_optimizer_skips():
    # WGAN clamps every weight after each step: that write is not the optimizer's, and the skipped group stays named
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    optimizer = SkipLastGroupSGD([{"params": model[0].parameters()}, {"params": model[2].parameters()}], lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        guard = watch(model, optimizer, summary=False)
        for _ in range(4):
            optimizer.zero_grad()
            model(torch.randn(8, 4)).pow(2).mean().backward()
            optimizer.step()
            with torch.no_grad():
                for p in model.parameters():
                    p.clamp_(-0.5, 0.5)
        report = guard.close()
    assert set(never_moved(report)) == {"2.weight", "2.bias"}
