"""Findings say only what is true, and follow the run.

* A target network or an EMA copy kept with ``requires_grad=True``, out of the optimizer and used only under
  ``torch.no_grad()``, gets no gradient: the ``not_in_optimizer`` finding says exactly that, as a note that does not
  make the report fail, and ``requires_grad_(False)`` silences it.
* A parameter no optimizer holds that does receive gradients (gradients nothing applies) stays a warning, also when
  the gradients start only later in the run.
* The optimizer audit is taken again when the param groups or the parameters that receive gradients change: Lightning's
  ``BaseFinetuning`` with ``train_bn=False`` makes BatchNorm layers trainable and leaves them out of the new param
  group; they are reported.
* An ``allow_none`` pattern that matches no parameter is a warning at the start, naming the closest parameters.
"""

from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from diagnosis_helpers import HIDDEN, IN_DIM, Finetuned, Regression, UnfreezeAt, fit, regression_data
from lightning.pytorch import LightningModule
from models import gradguard_warnings
from plain_models import HealthyNet, batches
from torch import nn

from lightning_gradguard import GradGuard, GradReport, watch


def _fit_recording(model, tmp_path, **kwargs):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        report = fit(model, regression_data(n_batches=kwargs.pop("n_batches", 3)), tmp_path, **kwargs)
    return report, gradguard_warnings(record)


# ---------------------------------------------------------------------- a target network: a note, not a warning
class DQNLike(Regression):
    """An online network trained by SGD and a target network kept with requires_grad=True, out of the optimizer,
    read only under torch.no_grad() and synced by hand (the DQN pattern)."""

    def __init__(self, freeze_target: bool = False) -> None:
        super().__init__()
        self.online = nn.Sequential(nn.Linear(IN_DIM, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 1))
        self.target = copy.deepcopy(self.online)
        if freeze_target:
            self.target.requires_grad_(False)

    def training_step(self, batch, batch_idx):
        x, y = batch
        with torch.no_grad():
            bootstrap = self.target(x)
        if batch_idx % 2 == 1:
            self.target.load_state_dict(self.online.state_dict())
        return F.mse_loss(self.online(x), 0.5 * y + 0.5 * bootstrap)

    def configure_optimizers(self):
        return torch.optim.SGD(self.online.parameters(), lr=0.05)


def test_a_target_network_out_of_the_optimizer_is_a_true_note_that_keeps_the_report_ok(tmp_path):
    model = DQNLike()
    report, said = _fit_recording(model, tmp_path)
    assert all(p.grad is None for p in model.target.parameters())  # the premise: no gradient ever reached it
    assert report.ok and report.missing == []
    assert [(f.kind, f.name, f.severity) for f in report.findings] == [("not_in_optimizer", "target", "note")]
    detail = report.findings[0].detail
    assert "no gradient has reached them" in detail
    assert "`target.requires_grad_(False)` silences this note" in detail
    assert "they get gradients" not in detail and "they receive gradients" not in detail  # not true here
    assert said == []  # a note is in the report, never a Python warning
    summary = report.summary()
    assert summary.startswith("GradGuard: all 4 trainable parameters received a gradient")
    assert "[not_in_optimizer, note] target:" in summary


def test_requires_grad_false_on_the_target_silences_the_note(tmp_path):
    report, said = _fit_recording(DQNLike(freeze_target=True), tmp_path)
    assert report.ok and report.findings == [] and said == []


def test_the_note_survives_the_json_round_trip_and_the_cli_exit_status(tmp_path):
    from lightning_gradguard.cli import main

    report, _ = _fit_recording(DQNLike(), tmp_path)
    path = tmp_path / "gradguard.json"
    report.save(str(path))
    again = GradReport.load(str(path))
    assert again.findings == report.findings and again.ok
    assert main(["report", str(path), "--fail-on-missing"]) == 0


def test_an_ema_teacher_in_a_plain_loop_is_a_note():
    torch.manual_seed(0)
    student = HealthyNet()
    teacher = copy.deepcopy(student)  # requires_grad=True, as deepcopy leaves it

    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.student, self.teacher = student, teacher

        def forward(self, x):
            with torch.no_grad():
                soft = self.teacher(x)
            return self.student(x), soft

    model = Pair()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with watch(model, optimizer, summary=False) as guard:
            for x, y in batches(4):
                out, soft = model(x)
                F.mse_loss(out, 0.5 * (y + soft)).backward()
                optimizer.step()
                optimizer.zero_grad()
                with torch.no_grad():
                    for t, s in zip(teacher.parameters(), student.parameters()):
                        t.mul_(0.9).add_(s, alpha=0.1)
    report = guard.report()
    assert report.ok
    assert [(f.name, f.severity) for f in report.findings] == [("teacher", "note")]
    assert gradguard_warnings(record) == []
    assert not any(p._post_accumulate_grad_hooks for p in teacher.parameters())  # the audit's hooks are gone


# ---------------------------------------------------------------------- gradients nothing applies: a warning
class HeadOutOfOptimizer(Regression):
    """``aux`` is in no optimizer; from batch ``aux_from`` on it takes part in the loss (gradients nothing applies)."""

    def __init__(self, aux_from: int = 0) -> None:
        super().__init__()
        self.aux_from = aux_from
        self.body = nn.Linear(IN_DIM, 1)
        self.aux = nn.Linear(IN_DIM, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self.body(x)
        if batch_idx >= self.aux_from:
            out = out + self.aux(x)
        return F.mse_loss(out, y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.body.parameters(), lr=0.05)


def test_gradients_nothing_applies_stay_a_warning(tmp_path):
    report, said = _fit_recording(HeadOutOfOptimizer(), tmp_path)
    assert not report.ok
    assert [(f.kind, f.name, f.severity) for f in report.findings] == [("not_in_optimizer", "aux", "warning")]
    assert "they receive gradients, but nothing applies them" in report.findings[0].detail
    audit = [w for w in said if "in the training set-up" in w]
    assert len(audit) == 1 and "[not_in_optimizer] aux" in audit[0]


def test_a_note_becomes_a_warning_when_the_first_gradient_reaches_it(tmp_path):
    report, said = _fit_recording(HeadOutOfOptimizer(aux_from=2), tmp_path, n_batches=4)
    assert [(f.name, f.severity) for f in report.findings] == [("aux", "warning")]
    assert not report.ok
    audit = [w for w in said if "in the training set-up" in w]
    assert len(audit) == 1 and "[not_in_optimizer] aux" in audit[0]  # warned once, when it became true


def test_a_note_becomes_a_warning_in_a_plain_loop_even_when_model_zero_grad_clears_it():
    torch.manual_seed(0)
    model = HealthyNet()
    extra = nn.Linear(4, 1)
    model.extra = extra  # registered, in no optimizer
    optimizer = torch.optim.SGD([*model.encoder.parameters(), *model.head.parameters()], lr=0.1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with watch(model, optimizer, summary=False) as guard:
            for step, (x, y) in enumerate(batches(4)):
                out = model(x) + (extra(x) if step == 2 else 0)
                F.mse_loss(out, y).backward()
                optimizer.step()
                model.zero_grad()  # clears extra's gradient too: only the audit's hook saw it arrive
            assert [(f.name, f.severity) for f in guard.report().findings] == [("extra", "warning")]
    assert any("[not_in_optimizer] extra" in w for w in gradguard_warnings(record))


# ---------------------------------------------------------------------- the audit follows the run
def test_base_finetuning_train_bn_false_leaves_batchnorm_with_gradients_nothing_applies(tmp_path):
    model = Finetuned()
    report, said = _fit_recording(model, tmp_path, extra_callbacks=[UnfreezeAt(1, train_bn=False)], max_epochs=2)
    bn = model.backbone[1]
    assert bn.weight.requires_grad and bn.weight.grad is not None  # the premise: trainable, with gradients
    held = {id(p) for group in model.trainer.optimizers[0].param_groups for p in group["params"]}
    assert id(bn.weight) not in held
    assert [(f.kind, f.name, f.severity) for f in report.findings] == [("not_in_optimizer", "backbone.1", "warning")]
    assert "`backbone.1.weight`, `backbone.1.bias`" in report.findings[0].detail
    assert not report.ok
    audit = [w for w in said if "in the training set-up" in w]
    assert len(audit) == 1 and "backbone.1" in audit[0]
    # the unfrozen linear layer joined the optimizer: checked from then on, not a finding
    assert report.params["backbone.0.weight"].steps == 3 and report.params["head.weight"].steps == 6


def test_an_audit_with_train_bn_true_stays_clean(tmp_path):
    report, said = _fit_recording(Finetuned(), tmp_path, extra_callbacks=[UnfreezeAt(1, train_bn=True)], max_epochs=2)
    assert report.ok and report.findings == [] and said == []


def test_the_optimizer_audit_is_taken_again_only_when_something_changed():
    """Framework-free: the engine takes the audit again only when the layout or the arrivals change."""
    from lightning_gradguard import GradGuardEngine, GuardConfig

    model = HealthyNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = GradGuardEngine(GuardConfig(), warn=lambda message: None)
    engine.bind(model.named_parameters(), module=model)
    engine.audit([optimizer])
    engine.start_run()
    taken = []
    original = engine.optimizer_audit.follow
    engine.optimizer_audit.follow = lambda *a: taken.append(1) or original(*a)
    for step, (x, y) in enumerate(batches(6)):
        engine.start_micro_batch()
        loss = F.mse_loss(model(x), y)
        engine.before_backward(loss)
        loss.backward()
        engine.after_backward()
        if step == 4:
            model.extra = nn.Linear(4, 1)  # not in the registry: nothing changes for the audit
            optimizer.add_param_group({"params": [torch.ones(1, requires_grad=True)]})
        engine.check_step(optimizer, step=step)
        optimizer.step()
        optimizer.zero_grad()
    engine.end_diagnosis()
    # step 0 (the run's first arrivals) and step 4 (a param group was added): nowhere else
    assert len(taken) == 2


# ---------------------------------------------------------------------- allow_none patterns that match nothing
def test_an_allow_none_pattern_that_matches_nothing_is_named_with_the_closest_parameters(tmp_path):
    from lightning.pytorch import Trainer
    from models import UnusedLayerMLP, quiet_trainer_options, regression_loader

    guard = GradGuard(allow_none=["unsued.*", "l1.*"], summary=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        Trainer(callbacks=[guard], **{**quiet_trainer_options(tmp_path), "max_epochs": 2}).fit(
            UnusedLayerMLP(), regression_loader(3)
        )
    said = [w for w in gradguard_warnings(record) if "allow_none pattern" in w]
    assert len(said) == 1  # once, at the start, for the one pattern that matches nothing
    assert "'unsued.*' matches no parameter" in said[0]
    assert "unused.weight" in said[0] and "unused.bias" in said[0]
    assert "'l1.*'" not in said[0]
    assert guard.report().missing == ["unused.weight", "unused.bias"]  # the typo silenced nothing


def test_an_allow_none_typo_in_a_plain_loop_is_warned_at_watch():
    model = HealthyNet()
    with pytest.warns(UserWarning, match=r"'encodr\.\*' matches no parameter.*encoder\.weight"):
        guard = watch(model, torch.optim.SGD(model.parameters(), lr=0.1), allow_none=["encodr.*"], summary=False)
    guard.close()


class _TiedHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, 4)
        self.aux = nn.Linear(4, 4)  # an optional head, not used in this run
        self.decoder = nn.Linear(4, 4)
        self.decoder.weight = self.aux.weight  # tied: named "aux.weight" first

    def forward(self, x):
        return self.encoder(x)


def test_allow_none_may_name_a_tied_weight_by_its_second_name():
    # "decoder.weight" is a parameter of the model (the tied one): it silences it, and is no typo
    model = _TiedHeads()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        guard = watch(model, optimizer, allow_none=["decoder.*", "aux.bias"], summary=False)
        for _ in range(2):
            model(torch.randn(2, 4)).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        report = guard.close()
    assert not any("matches no parameter" in str(w.message) for w in record)
    assert report.missing == [] and report.ok


# ---------------------------------------------------------------------------------------------- never stepped
class ForgottenDiscriminatorStep(LightningModule):
    """Manual optimization of a GAN whose discriminator update computes its loss and gradients but never calls
    ``opt_d.step()``."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.generator = nn.Linear(2, IN_DIM)
        self.discriminator = nn.Linear(IN_DIM, 1)

    def training_step(self, batch, batch_idx):
        real, _ = batch
        opt_g, opt_d = self.optimizers()
        fake = self.generator(torch.randn(real.shape[0], 2))
        opt_d.zero_grad()
        self.manual_backward(F.softplus(self.discriminator(fake.detach())).mean() - self.discriminator(real).mean())
        # planted: opt_d.step() forgotten
        opt_g.zero_grad()
        self.manual_backward(F.softplus(-self.discriminator(fake)).mean())
        opt_g.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.generator.parameters(), lr=0.1), torch.optim.SGD(
            self.discriminator.parameters(), lr=0.1
        )


def test_an_optimizer_that_never_steps_is_a_note_naming_what_it_leaves_unchanged(tmp_path):
    report = fit(ForgottenDiscriminatorStep(), regression_data(n_batches=3), tmp_path)
    assert report.ok and report.steps == 3
    (note,) = [f for f in report.findings if f.kind == "never_stepped"]
    assert note.severity == "note"
    assert "2 trainable parameters (discriminator.weight, discriminator.bias)" in note.detail
    assert "SGD (optimizer 1), which never stepped in this run while 3 optimizer steps" in note.detail
    assert "2 of them hold a gradient never applied" in note.detail
    assert "discriminator.weight" not in report.params  # never checked: no step of its optimizer came


def test_a_plain_loop_optimizer_that_never_steps_is_a_note_and_one_that_steps_later_is_not():
    torch.manual_seed(0)
    model = nn.ModuleDict({"g": nn.Linear(4, 4), "d": nn.Linear(4, 1)})
    opt_g = torch.optim.SGD(model["g"].parameters(), lr=0.1)
    opt_d = torch.optim.SGD(model["d"].parameters(), lr=0.1)
    guard = watch(model, [opt_g, opt_d], summary=False)
    for _ in range(3):
        opt_g.zero_grad()
        model["d"](model["g"](torch.randn(8, 4))).mean().backward()
        opt_g.step()
    (note,) = [f for f in guard.report().findings if f.kind == "never_stepped"]
    assert "(d.weight, d.bias) are updated only by SGD (optimizer 1)" in note.detail
    opt_d.step()  # a later stage of training begins: the note is made anew with each report
    guard.close()
    assert not [f for f in guard.report().findings if f.kind == "never_stepped"]


def test_check_gradients_with_optimizers_makes_no_never_stepped_note():
    from lightning_gradguard import check_gradients

    model = HealthyNet()
    optimizers = [torch.optim.SGD(model.encoder.parameters(), lr=0.1), torch.optim.SGD(model.head.parameters(), lr=0.1)]
    x, y = batches(1)[0]
    report = check_gradients(model, x, optimizer=optimizers)
    assert report.ok and report.findings == []


# ---------------------------------------------------------------------------------------------- EMA copies
class _WithEma(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.ema = copy.deepcopy(self.net).requires_grad_(False)

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("under_no_grad", [True, False])
def test_an_ema_copy_is_a_note_and_one_updated_under_autograd_is_named(under_no_grad):
    # without torch.no_grad() the in-place EMA update makes the copy part of every step's graph (the graphs chain);
    # the old note ("that is right: requires_grad_(False) silences it") was untrue, and its fix raises
    torch.manual_seed(0)
    model = _WithEma()
    optimizer = torch.optim.SGD(model.net.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        guard = watch(model, optimizer, summary=False)
        for _ in range(3):
            model(torch.randn(4, 4)).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            with torch.no_grad() if under_no_grad else contextlib.nullcontext():
                for e, p in zip(model.ema.parameters(), model.net.parameters()):
                    e.mul_(0.9).add_(p, alpha=0.1)
        report = guard.close()
    assert report.missing == []
    if under_no_grad:  # a frozen EMA copy: nothing to say
        assert report.findings == [] and report.ok
    else:
        (finding,) = report.findings
        assert finding.kind == "not_in_optimizer" and finding.name == "ema" and finding.severity == "warning"
        assert "carry autograd history" in finding.detail and "torch.no_grad()" in finding.detail
        assert not report.ok
