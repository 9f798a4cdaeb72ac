"""Mixed and reduced precision: unscaled norms (fused optimizers too), skipped AMP steps, overflows that are not
missing gradients, and every other precision setting Lightning offers.

``16-mixed`` runs the real ``GradScaler`` path on the CPU through ``plugins=[MixedPrecision("16-mixed", "cpu",
scaler=torch.amp.GradScaler("cpu", ...))]``: Lightning's own plugin, autocasting and scaling on the CPU. A small
initial scale keeps fp16 from overflowing by accident, so that the only overflows are the planted ones.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.plugins.precision import MixedPrecision
from models import HIDDEN, IN_DIM, RecordingLogger, UnusedLayerMLP, regression_loader
from torch import nn

from lightning_gradguard import GradGuard

INIT_SCALE = 1024.0


class UnscaledNormRecorder(Callback):
    """The reference: each parameter's gradient norm at the step, unscaled with the scaler's public API.

    Lightning unscales before ``on_before_optimizer_step`` unless the optimizer unscales inside its own kernel
    (``fused=True``); then the gradients are still multiplied by ``scaler.get_scale()``.
    """

    def __init__(self) -> None:
        self.norms: list[dict[str, float]] = []
        self.raw: list[dict[str, float]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        divide = 1.0
        if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            divide = scaler.get_scale()
        names = {id(p): n for n, p in pl_module.named_parameters()}
        raw, norms = {}, {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    value = torch.linalg.vector_norm(p.grad.double()).item()
                    raw[names[id(p)]] = value
                    norms[names[id(p)]] = value / divide
        self.raw.append(raw)
        self.norms.append(norms)


def amp_plugin() -> MixedPrecision:
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=INIT_SCALE))


class OverflowMLP(LightningModule):
    """Two linear layers; on ``overflow_batches`` the loss is multiplied by 1e38, so the scaled loss is Inf."""

    def __init__(self, overflow_batches=(), fused: bool = False, unused: bool = False) -> None:
        super().__init__()
        self.overflow_batches = frozenset(overflow_batches)
        self.fused = fused
        self.l1 = nn.Linear(IN_DIM, HIDDEN)
        self.l2 = nn.Linear(HIDDEN, 1)
        if unused:
            self.unused = nn.Linear(HIDDEN, HIDDEN)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self.l2(torch.tanh(self.l1(x))), y)
        if batch_idx in self.overflow_batches:
            loss = loss * 1e38  # finite in fp32; times the loss scale it overflows to Inf
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3, fused=self.fused)


def _fit_amp(make_trainer, model, guard, n_batches=6, **kwargs):
    logger, recorder = RecordingLogger(), UnscaledNormRecorder()
    trainer = make_trainer(callbacks=[guard, recorder], logger=logger, plugins=[amp_plugin()], **kwargs)
    trainer.fit(model, regression_loader(n_batches))
    return trainer, logger, recorder


def _logged_norms(logger: RecordingLogger) -> list[dict[str, float]]:
    prefix = "gradguard/norm/"
    return [{k[len(prefix):]: v for k, v in m.items() if k.startswith(prefix)} for _, m in logger.rows]


def _assert_same_norms(logged: list[dict[str, float]], reference: list[dict[str, float]], rel: float = 1e-5) -> None:
    assert len(logged) == len(reference)
    for got, want in zip(logged, reference):
        assert set(got) == set(want)
        for name, value in want.items():
            if math.isfinite(value):
                assert got[name] == pytest.approx(value, rel=rel), name
            else:
                assert not math.isfinite(got[name]), name


def test_16_mixed_norms_are_unscaled_and_overflow_is_a_skipped_step_not_a_missing_gradient(make_trainer):
    runs = {}
    for fused in (False, True):
        torch.manual_seed(0)
        guard = GradGuard(strict=True, log_every_n_steps=1, summary=False)  # strict: an overflow must not raise
        trainer, logger, recorder = _fit_amp(make_trainer, OverflowMLP(overflow_batches={2}, fused=fused), guard)
        runs[fused] = (guard, logger, recorder)

        logged = _logged_norms(logger)
        _assert_same_norms(logged, recorder.norms)
        if fused:  # the gradients GradGuard read were still scaled: the logged norms are not the raw ones
            assert recorder.raw[0]["l1.weight"] == pytest.approx(INIT_SCALE * logged[0]["l1.weight"], rel=1e-5)

        report = guard.report()
        assert report.missing == []  # the overflow made the gradients Inf/NaN, never None
        assert report.amp_skipped_steps == 1
        assert report.to_dict()["amp_skipped_steps"] == 1
        assert {name: p.nonfinite_steps for name, p in report.params.items()} == dict.fromkeys(
            ["l1.weight", "l1.bias", "l2.weight", "l2.bias"], 1
        )
        assert report.ok  # the scaler skipped the overflowing step: that is loss scaling working
        assert "skipped 1 of 6 optimizer steps" in report.summary()
        skipped = logger.series("gradguard/amp_skipped_steps")
        assert [v for _, v in skipped] == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0]
        assert [v for _, v in logger.series("gradguard/nonfinite_params")] == [0, 0, 4, 0, 0, 0]
        assert trainer.precision_plugin.scaler.get_scale() == INIT_SCALE / 2  # the scaler did back off once

    # the same model and data with a fused and a non-fused Adam: the same (unscaled) norms at every step
    _assert_same_norms(_logged_norms(runs[True][1]), _logged_norms(runs[False][1]), rel=1e-4)


def test_16_mixed_still_finds_a_missing_gradient_and_reports_zero_skips(make_trainer):
    guard = GradGuard(summary=False)
    _fit_amp(make_trainer, OverflowMLP(unused=True), guard, n_batches=4)
    report = guard.report()
    assert report.missing == ["unused.weight", "unused.bias"]
    assert report.params["unused.weight"].none_steps == 4
    assert report.to_dict()["amp_skipped_steps"] == 0
    assert report.nonfinite == []


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true", "64-true", "bf16-true"])
def test_other_precisions_count_exactly_and_log_true_norms(make_trainer, precision):
    guard, logger, recorder = GradGuard(log_every_n_steps=1, summary=False), RecordingLogger(), UnscaledNormRecorder()
    trainer = make_trainer(callbacks=[guard, recorder], logger=logger, precision=precision)
    trainer.fit(UnusedLayerMLP(), regression_loader(3))
    report = guard.report()
    assert report.missing == ["unused.weight", "unused.bias"]
    assert [report.params[n].none_steps for n in report.missing] == [3, 3]
    assert "amp_skipped_steps" not in report.to_dict()  # no GradScaler: nothing was skipped, nothing to say
    assert "distributed" not in report.to_dict()
    # half-precision gradients are reduced with float32 accumulation: the norms are float32-accurate
    _assert_same_norms(_logged_norms(logger), recorder.norms, rel=1e-5)
    dtype = {"64-true": torch.float64, "bf16-true": torch.bfloat16}.get(precision, torch.float32)
    assert trainer.lightning_module.l1.weight.dtype == dtype


class ManualAmpGAN(LightningModule):
    """Manual optimization under 16-mixed: two optimizers, ``toggle_optimizer``, clipping, LR schedulers.

    ``overflow_d``: batches on which the discriminator's loss overflows (its step is skipped by the scaler).
    ``clear_head``: batches on which ``generator.head.weight.grad`` is set to None between backward and step.
    """

    def __init__(self, overflow_d=(), clear_head=()) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.overflow_d, self.clear_head = frozenset(overflow_d), frozenset(clear_head)
        self.generator = nn.ModuleDict({"body": nn.Sequential(nn.Linear(2, HIDDEN), nn.Tanh()),
                                        "head": nn.Linear(HIDDEN, IN_DIM)})
        self.discriminator = nn.Sequential(nn.Linear(IN_DIM, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 1))

    def generate(self, z):
        return self.generator["head"](self.generator["body"](z))

    def training_step(self, batch, batch_idx):
        real, _ = batch
        opt_g, opt_d = self.optimizers()
        sched_g, sched_d = self.lr_schedulers()
        z = torch.randn(real.shape[0], 2)

        self.toggle_optimizer(opt_d)
        fake = self.generate(z).detach()
        d_loss = F.softplus(-self.discriminator(real)).mean() + F.softplus(self.discriminator(fake)).mean()
        if batch_idx in self.overflow_d:
            d_loss = d_loss * 1e38
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        self.clip_gradients(opt_d, gradient_clip_val=1e6, gradient_clip_algorithm="norm")
        opt_d.step()
        sched_d.step()
        self.untoggle_optimizer(opt_d)

        self.toggle_optimizer(opt_g)
        g_loss = F.softplus(-self.discriminator(self.generate(z))).mean()
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        if batch_idx in self.clear_head:
            self.generator["head"].weight.grad = None  # the bug: cleared between backward and step
        opt_g.step()
        sched_g.step()
        self.untoggle_optimizer(opt_g)

    def configure_optimizers(self):
        opt_g = torch.optim.Adam(self.generator.parameters(), lr=1e-3)
        opt_d = torch.optim.SGD(self.discriminator.parameters(), lr=1e-2)
        return [opt_g, opt_d], [torch.optim.lr_scheduler.StepLR(opt_g, 1), torch.optim.lr_scheduler.StepLR(opt_d, 1)]


def test_manual_optimization_under_16_mixed(make_trainer):
    guard = GradGuard(log_every_n_steps=1, summary=False)
    _, logger, recorder = _fit_amp(make_trainer, ManualAmpGAN(overflow_d={1}, clear_head={2}), guard, n_batches=4)
    report = guard.report()
    # one step per optimizer per batch; the discriminator's overflow is one skipped step, counted once
    assert report.steps == 8
    assert report.amp_skipped_steps == 1
    nonfinite = {name: p.nonfinite_steps for name, p in report.params.items() if p.nonfinite_steps}
    assert nonfinite == dict.fromkeys(["discriminator.0.weight", "discriminator.0.bias", "discriminator.2.weight",
                                       "discriminator.2.bias"], 1)
    # the cleared gradient is missing, with its cause; toggling never makes the other network's params missing
    assert report.missing == ["generator.head.weight"]
    head = report.params["generator.head.weight"]
    assert (head.steps, head.none_steps, head.cause) == (4, 1, "cleared")
    assert all(p.steps == 4 for p in report.params.values())
    # logged norms are unscaled; both optimizers step in each batch, so each logging step holds both their norms
    merged = [{**recorder.norms[2 * i], **recorder.norms[2 * i + 1]} for i in range(4)]
    _assert_same_norms(_logged_norms(logger), merged)


def test_amp_skipped_steps_survive_a_checkpoint(make_trainer, tmp_path):
    guard = GradGuard(summary=False)
    trainer, _, _ = _fit_amp(make_trainer, OverflowMLP(overflow_batches={1}), guard, n_batches=3)
    assert guard.report().amp_skipped_steps == 1
    path = str(tmp_path / "amp.ckpt")
    trainer.save_checkpoint(path)

    resumed = GradGuard(summary=False)
    logger = RecordingLogger()
    trainer = make_trainer(callbacks=[resumed], logger=logger, plugins=[amp_plugin()], max_epochs=2)
    trainer.fit(OverflowMLP(overflow_batches={1}), regression_loader(3), ckpt_path=path)
    report = resumed.report()
    assert (report.steps, report.amp_skipped_steps) == (6, 2)
    assert report.params["l1.weight"].nonfinite_steps == 2


def test_gpu_feature_script_passes_its_checks_on_the_cpu(tmp_path):
    # benchmarks/gpu_features.py runs on a GPU machine; on the CPU it runs every check but FSDP, which is how the
    # script itself is kept correct between GPU runs
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_features.py"
    spec = importlib.util.spec_from_file_location("gpu_features", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "features.json"
    assert module.main(["--device", "cpu", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["16-mixed, planted overflow"]["amp_skipped_steps"] == 1
    assert results["16-mixed, fused Adam"]["max_relative_norm_error"] < 1e-5
    assert results["FSDPStrategy, planted unused layer"]["passed"] is None  # skipped without a GPU
    assert results["torch.compile"]["with_guard"]["graphs"] == results["torch.compile"]["without_guard"]["graphs"]


@pytest.mark.parametrize("fused", [False, True])
def test_plain_loop_overflow_under_a_grad_scaler_is_a_skipped_step_with_fused_optimizers_too(fused):
    """``scaler.step`` skips a non-fused optimizer's ``step()``, but calls a fused one's with ``found_inf`` set (the
    kernel then changes nothing): an overflow there is a skipped step too, not a failed run."""
    from lightning_gradguard import watch

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    guard = watch(model, optimizer, summary=False)
    for i in range(6):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.mse_loss(model(torch.randn(8, 4)).float(), torch.randn(8, 1))
        scaler.scale(loss).backward()
        if i in (2, 4):
            model[0].weight.grad[0, 0] = math.inf  # planted overflows
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
    report = guard.close()
    assert report.ok and report.missing == []
    if fused:  # the skipped steps are optimizer.step() calls, checked and counted as skipped
        assert (report.steps, report.amp_skipped_steps) == (6, 2)
        assert report.params["0.weight"].nonfinite_steps == 2
    else:  # the scaler never calls step(): nothing to check
        assert (report.steps, report.amp_skipped_steps) == (4, None)
