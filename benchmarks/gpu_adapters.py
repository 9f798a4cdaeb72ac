"""GPU checks of GradGuard's entry points: ``watch()`` in a plain loop, ``watch_fabric`` on a GAN, the Hugging Face
``Trainer``'s ``GradGuardCallback``, strict mode, and the Lightning ``Trainer`` callback under 16-mixed with gradient
accumulation, each on CUDA.

1. ``watch()``: fp16 autocast, ``torch.amp.GradScaler``, ``Adam(fused=True)``, a planted unused layer, a planted
   overflow at one step, a TensorBoard ``log_dir``: the unused layer named (nothing else), one skipped step, the
   logged norms (read back with TensorBoard's ``EventAccumulator``) equal to the unscaled gradients' norms.
2. ``watch_fabric``: ``Fabric(precision="bf16-mixed")`` with a ``TensorBoardLogger``, a generator and a
   discriminator stepped in turn (the discriminator sees ``fake.detach()``), ``log_every_n_steps=2``: no false
   alarm, both networks' norms logged and equal to the gradients' norms. Run twice: each optimizer's
   ``zero_grad()`` right before its own backward pass, and the usual ``backward(); step(); zero_grad()`` order.
3. ``GradGuardCallback`` in ``transformers.Trainer`` (a tiny model, nothing downloaded) with a planted unused
   parameter: named, at every step; the norms in ``log_history`` equal to the gradients' norms. Again with
   ``fp16=True`` and ``max_grad_norm=0`` (CUDA only: accelerate has no GradScaler on the CPU): skipped steps
   counted, norms unscaled.
4. ``watch(..., strict=True)`` with a layer left out at step 3: ``GradGuardError`` from ``optimizer.step()`` at that
   step, naming it, before the weights change.
5. The Lightning ``Trainer`` with ``precision="16-mixed"`` and ``accumulate_grad_batches=4``, a branch used on the
   first micro-batch of each window only: reported as intermittent with the exact counts, nothing else.

Every check also requires that GradGuard reported no internal error, and counts GradGuard's warnings (one for a
planted bug, none for a healthy run). ``--device cpu`` runs the same checks on the
CPU (fp16 autocast and the GradScaler run there too; 16-mixed through ``MixedPrecision("16-mixed", "cpu")``), which
is how the script itself is tested. Prints a Markdown table and, with ``--json PATH``, writes every figure as JSON.
Exit status 1 when a check fails.

Usage::

    PYTHONPATH=$PWD python benchmarks/gpu_adapters.py --json $OUT/gpu_adapters.json
    python benchmarks/gpu_adapters.py --device cpu

"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import tempfile
import time
import traceback
import warnings
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from lightning_gradguard import GradGuardError, GradGuardWarning, watch

IN_DIM, HIDDEN = 16, 32
INIT_SCALE = 1024.0
INTERNAL_ERROR = "GradGuard: internal error"


# ---------------------------------------------------------------------- instruments
class Recorded:
    """Every warning raised inside the block, kept (not printed): GradGuard's own, and its internal errors."""

    def __enter__(self) -> Recorded:
        self._catch = warnings.catch_warnings(record=True)
        self.records = self._catch.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc: Any) -> None:
        self._catch.__exit__(*exc)

    def gradguard_messages(self) -> list[str]:
        return [str(w.message) for w in self.records if issubclass(w.category, GradGuardWarning)]

    def figures(self) -> dict[str, Any]:
        ours = [w for w in self.records if issubclass(w.category, GradGuardWarning)]
        return {
            "gradguard_warnings": len(ours),
            "other_warnings": len(self.records) - len(ours),
            "internal_errors": [str(w.message) for w in self.records if INTERNAL_ERROR in str(w.message)],
        }


def warned_once_about(recorded: Recorded, names: list[str]) -> bool:
    """One GradGuard warning (once per parameter, one message for those new at the same step), naming ``names``."""
    messages = recorded.gradguard_messages()
    return len(messages) == 1 and all(name in messages[0] for name in names)


def grad_norms(named_parameters, scale: float = 1.0) -> dict[str, float]:
    """Every gradient's 2-norm, in float64, divided by ``scale``: the reference the logged norms must equal."""
    return {n: float(p.grad.double().norm()) / scale for n, p in named_parameters if p.grad is not None}


def read_scalars(log_dir: str, prefix: str = "gradguard/") -> dict[str, dict[int, float]]:
    """TensorBoard's own reader: every scalar under ``prefix``, as tag -> {step: value}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    accumulator.Reload()
    return {
        tag: {e.step: e.value for e in accumulator.Scalars(tag)}
        for tag in accumulator.Tags()["scalars"]
        if tag.startswith(prefix)
    }


def _verdict(report: Any) -> dict[str, Any]:
    """What a user reads first in a report: the missing, intermittent, non-finite and zero lists, the findings."""
    return {
        "missing": report.missing,
        "intermittent": report.intermittent,
        "nonfinite": report.nonfinite,
        "zero": report.zero,
        "findings": [f"{f.kind}: {f.name}" for f in report.findings],
        "steps": report.steps,
    }


def compare_norms(scalars: dict[str, dict[int, float]], expected: dict[int, dict[str, float]]) -> dict[str, Any]:
    """The logged ``gradguard/norm/<name>`` series against ``expected`` ({step: {name: norm}}): the same series, the
    same steps, and values within a relative error (a non-finite expected norm must be logged non-finite)."""
    prefix = "gradguard/norm/"
    logged = {tag[len(prefix) :]: values for tag, values in scalars.items() if tag.startswith(prefix)}
    want: dict[str, dict[int, float]] = {}
    for step, norms in expected.items():
        for name, value in norms.items():
            want.setdefault(name, {})[step] = value
    worst, compared, mismatched = 0.0, 0, []
    for name, values in want.items():
        got = logged.get(name, {})
        if set(got) != set(values):
            mismatched.append(f"{name}: logged at {sorted(got)}, expected at {sorted(values)}")
            continue
        for step, value in values.items():
            compared += 1
            if math.isfinite(value):
                worst = max(worst, abs(got[step] - value) / max(abs(value), 1e-30))
            elif math.isfinite(got[step]):
                mismatched.append(f"{name}@{step}: logged {got[step]}, expected non-finite")
    return {
        "series_logged": sorted(logged),
        "series_expected": sorted(want),
        "compared": compared,
        "max_relative_error": worst,
        "mismatched": mismatched[:10],
    }


def norms_match(check: dict[str, Any], tolerance: float = 1e-4) -> bool:
    return (
        check["series_logged"] == check["series_expected"]
        and check["compared"] > 0
        and not check["mismatched"]
        and check["max_relative_error"] < tolerance
    )


def batches(n: int, device: torch.device, batch_size: int = 16, seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch_size, IN_DIM, generator=g).to(device), torch.randn(batch_size, 1, generator=g).to(device))
        for _ in range(n)
    ]


# ---------------------------------------------------------------------- 1. watch(): fp16 autocast, GradScaler
class PlantedNet(nn.Module):
    """Two layers; ``unused`` is registered and optimized but never called."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(IN_DIM, HIDDEN)
        self.l2 = nn.Linear(HIDDEN, 1)
        self.unused = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)))


def check_plain_amp(device: str) -> dict[str, Any]:
    """fp16 autocast, GradScaler, fused Adam, an unused layer, an overflow at step 2, ``log_dir``, logging at every
    step."""
    steps, overflow_step = 6, 2
    dev = torch.device(device)
    torch.manual_seed(0)
    model = PlantedNet().to(dev)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    scaler = torch.amp.GradScaler(dev.type, init_scale=INIT_SCALE)
    expected: dict[int, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as log_dir, Recorded() as recorded:
        guard = watch(model, optimizer, log_dir=log_dir, log_every_n_steps=1, summary=False)
        for step, (x, y) in enumerate(batches(steps, dev)):
            with torch.amp.autocast(dev.type, dtype=torch.float16):
                out = model(x)
            loss = F.mse_loss(out.float(), y)
            if step == overflow_step:
                loss = loss * 1e38  # the scaled loss is Inf: the scaler skips this step
            scaler.scale(loss).backward()
            expected[step] = grad_norms(model.named_parameters(), scaler.get_scale())  # fused: still scaled
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
        report = guard.close()
        scalars = read_scalars(log_dir)
    used = ["l1.weight", "l1.bias", "l2.weight", "l2.bias"]
    norms = compare_norms(scalars, expected)
    result = {
        "missing": report.missing,
        "intermittent": report.intermittent,
        "none_steps": {n: report.params[n].none_steps for n in report.missing},
        "causes": {n: report.params[n].cause for n in report.missing},
        "steps": report.steps,
        "amp_skipped_steps": report.amp_skipped_steps,
        "logged_amp_skipped_steps": sorted(scalars.get("gradguard/amp_skipped_steps", {}).items())[-1:],
        "nonfinite_steps": {n: p.nonfinite_steps for n, p in report.params.items() if p.nonfinite_steps},
        "scale_after": scaler.get_scale(),
        "disabled": sorted(guard.disabled),
        **recorded.figures(),
        "norm_check": norms,
    }
    result["passed"] = (
        report.missing == ["unused.weight", "unused.bias"]
        and report.intermittent == []
        and report.steps == steps
        and result["none_steps"] == {"unused.weight": steps, "unused.bias": steps}
        and result["causes"] == {"unused.weight": "unused", "unused.bias": "unused"}
        and report.amp_skipped_steps == 1
        and result["logged_amp_skipped_steps"] == [(steps - 1, 1.0)]
        and result["nonfinite_steps"] == dict.fromkeys(used, 1)  # the overflow step, every used parameter
        and result["scale_after"] == INIT_SCALE / 2
        and not result["disabled"]
        and not result["internal_errors"]
        and warned_once_about(recorded, ["unused.weight", "unused.bias"])
        and norms["series_expected"] == sorted(used)
        and norms_match(norms)
    )
    return result


# ---------------------------------------------------------------------- 2. watch_fabric(): a bf16-mixed GAN
LATENT, DATA_DIM = 8, 4


class Generator(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(LATENT, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, DATA_DIM))

    def forward(self, z):
        return self.net(z)


class Discriminator(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(DATA_DIM, HIDDEN), nn.LeakyReLU(0.2), nn.Linear(HIDDEN, 1))

    def forward(self, x):
        return self.net(x)


def prefixed(prefix: str, norms: dict[str, float]) -> dict[str, float]:
    """``watch_fabric(fabric, [generator, discriminator], ...)`` names parameters after the models' classes."""
    return {f"{prefix}.{name}": value for name, value in norms.items()}


def check_fabric_gan(device: str, zero_grad_after_step: bool = False) -> dict[str, Any]:
    """Discriminator then generator from one generator forward, ``fake.detach()`` for the discriminator's loss.

    Each optimizer's ``zero_grad()`` right before its own backward pass, or (``zero_grad_after_step``) the usual
    ``backward(); step(); zero_grad()`` order: the discriminator's backward pass never concerns the generator, in
    either order (docs/plain-pytorch.md: "a GAN loop's two optimizers do not count each other's backward passes").
    """
    from lightning.fabric import Fabric
    from lightning.fabric.loggers import TensorBoardLogger

    from lightning_gradguard import watch_fabric

    iterations, batch = 6, 16
    with tempfile.TemporaryDirectory() as root, Recorded() as recorded:
        logger = TensorBoardLogger(root, name="fabric")
        fabric = Fabric(accelerator=device, devices=1, precision="bf16-mixed", loggers=logger)
        fabric.seed_everything(0, verbose=False)
        generator, discriminator = Generator(), Discriminator()
        generator, opt_g = fabric.setup(generator, torch.optim.Adam(generator.parameters(), lr=2e-4))
        discriminator, opt_d = fabric.setup(discriminator, torch.optim.Adam(discriminator.parameters(), lr=2e-4))
        guard = watch_fabric(fabric, [generator, discriminator], [opt_g, opt_d], log_every_n_steps=2, summary=False)
        ones = torch.ones(batch, 1, device=fabric.device)
        zeros = torch.zeros(batch, 1, device=fabric.device)
        per_step: dict[int, dict[str, float]] = {}  # global step (both optimizers counted) -> that network's norms
        for i in range(iterations):
            real = torch.randn(batch, DATA_DIM, device=fabric.device) * 0.5 + 1.0
            fake = generator(torch.randn(batch, LATENT, device=fabric.device))
            if not zero_grad_after_step:
                opt_d.zero_grad()
            loss_d = F.binary_cross_entropy_with_logits(discriminator(real), ones) + F.binary_cross_entropy_with_logits(
                discriminator(fake.detach()), zeros
            )
            fabric.backward(loss_d)
            per_step[2 * i] = prefixed("discriminator", grad_norms(discriminator.module.named_parameters()))
            opt_d.step()
            if zero_grad_after_step:
                opt_d.zero_grad()
            else:
                opt_g.zero_grad()
            fabric.backward(F.binary_cross_entropy_with_logits(discriminator(fake), ones))
            per_step[2 * i + 1] = prefixed("generator", grad_norms(generator.module.named_parameters()))
            opt_g.step()
            if zero_grad_after_step:
                opt_g.zero_grad()
                opt_d.zero_grad()  # the generator's loss wrote the discriminator's gradients too
        report = guard.close()
        logger.finalize("success")
        scalars = read_scalars(logger.log_dir)
    # logged when (step + 1) % 2 == 0, the generator's step: with the discriminator's step just before it
    expected = {s: {**per_step[s - 1], **per_step[s]} for s in per_step if (s + 1) % 2 == 0}
    norms = compare_norms(scalars, expected)
    counts = {n: (p.steps, p.none_steps, p.micro_batches, p.none_micro_batches) for n, p in report.params.items()}
    result = {
        "ok": report.ok,
        **_verdict(report),
        "params": sorted(report.params),
        "counts (steps, none_steps, micro_batches, none_micro_batches)": sorted(set(counts.values())),
        "disabled": sorted(guard.disabled),
        **recorded.figures(),
        "norm_check": norms,
    }
    networks = {n.split(".")[0] for n in norms["series_logged"]}
    result["passed"] = (
        report.ok
        and report.missing == []
        and report.intermittent == []
        and not report.findings
        and len(report.params) == 8
        and set(counts.values()) == {(iterations, 0, iterations, 0)}
        and networks == {"generator", "discriminator"}
        and norms["series_expected"] == sorted(report.params)
        and not result["disabled"]
        and not result["internal_errors"]
        and result["gradguard_warnings"] == 0
        and norms_match(norms)
    )
    return result


# ---------------------------------------------------------------------- 3. the Hugging Face Trainer
class TinyRegressor(nn.Module):
    """A Hugging Face style model (keyword inputs, a dict with ``loss``); ``temperature`` is never used."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(IN_DIM, HIDDEN)
        self.head = nn.Linear(HIDDEN, 1)
        self.temperature = nn.Parameter(torch.ones(()))  # a planted bug: never used

    def forward(self, x, labels=None):
        logits = self.head(torch.tanh(self.encoder(x)))
        loss = F.mse_loss(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


def train_hf(device: str, steps: int, logging_steps: int, **options: Any) -> dict[str, Any]:
    """``transformers.Trainer`` with ``GradGuardCallback`` on :class:`TinyRegressor`; the reference norms are read
    at each ``on_pre_optimizer_step`` (after the guard's check, before the step), divided by the loss scale the
    gradients still carry."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from lightning_gradguard.hf import GradGuardCallback

    class ReferenceNorms(TrainerCallback):
        def __init__(self) -> None:
            self.norms: dict[int, dict[str, float]] = {}  # state.global_step before the step -> norms
            self.scaled_steps = 0  # steps at which the gradients still carried the loss scale
            self.trainer: Any = None

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            from torch.amp.grad_scaler import OptState

            scaler, optimizer = self.trainer.accelerator.scaler, self.trainer.optimizer
            raw = getattr(optimizer, "optimizer", optimizer)
            # still scaled unless scaler.unscale_ ran (clipping does, and transformers 5 measures grad_norm with
            # clip_grad_norm_(inf) even when max_grad_norm=0): what scaler.step() itself goes by
            scaled = scaler is not None and scaler._per_optimizer_states[id(raw)]["stage"] is not OptState.UNSCALED
            scale = scaler.get_scale() if scaled else 1.0
            self.scaled_steps += scaled
            self.norms[state.global_step] = grad_norms(self.trainer.model.named_parameters(), scale)

    g = torch.Generator().manual_seed(0)
    data = [{"x": torch.randn(IN_DIM, generator=g), "labels": torch.randn(1, generator=g)} for _ in range(4 * steps)]
    torch.manual_seed(0)
    model = TinyRegressor()
    with tempfile.TemporaryDirectory() as out, Recorded() as recorded:
        settings = dict(
            output_dir=out,
            max_steps=steps,
            per_device_train_batch_size=4,
            learning_rate=1e-3,
            report_to=[],
            use_cpu=device == "cpu",
            save_strategy="no",
            disable_tqdm=True,
            logging_steps=logging_steps,
            seed=0,
            dataloader_num_workers=0,
        )
        settings.update(options)
        guard, reference = GradGuardCallback(summary=False), ReferenceNorms()
        trainer = Trainer(
            model=model, args=TrainingArguments(**settings), train_dataset=data, callbacks=[guard, reference]
        )
        reference.trainer = trainer
        trainer.train()
        wrote_report = os.path.exists(os.path.join(out, "gradguard.json"))
    logged: dict[str, dict[int, float]] = {}
    for entry in trainer.state.log_history:
        for key, value in entry.items():
            if key.startswith("gradguard/"):
                logged.setdefault(key, {})[entry["step"]] = value
    # a step logs at the `step` the Trainer logs its loss at: state.global_step after the step
    expected = {s + 1: norms for s, norms in reference.norms.items() if (s + 1) % logging_steps == 0}
    return {
        "trainer": trainer,
        "report": guard.report(),
        "model_device": next(model.parameters()).device.type,
        "norm_check": compare_norms(logged, expected),
        "gradguard_json": wrote_report,
        "warned_once_about_temperature": warned_once_about(recorded, ["temperature"]),
        "steps_checked_with_scaled_gradients": reference.scaled_steps,
        **recorded.figures(),
    }


def hf_figures(run: dict[str, Any]) -> dict[str, Any]:
    report = run["report"]
    temperature = report.params.get("temperature")
    return {
        "model_device": run["model_device"],
        "missing": report.missing,
        "intermittent": report.intermittent,
        "steps": report.steps,
        "temperature (steps, none_steps, cause)": (
            (temperature.steps, temperature.none_steps, temperature.cause) if temperature else None
        ),
        "used (steps, none_steps)": sorted(
            {(p.steps, p.none_steps) for n, p in report.params.items() if n != "temperature"}
        ),
        "amp_skipped_steps": report.amp_skipped_steps,
        "gradguard_json": run["gradguard_json"],
        "warned_once_about_temperature": run["warned_once_about_temperature"],
        "steps_checked_with_scaled_gradients": run["steps_checked_with_scaled_gradients"],
        "gradguard_warnings": run["gradguard_warnings"],
        "other_warnings": run["other_warnings"],
        "internal_errors": run["internal_errors"],
        "norm_check": run["norm_check"],
    }


def hf_passed(run: dict[str, Any], figures: dict[str, Any], device: str, steps: int) -> bool:
    report = run["report"]
    return (
        figures["model_device"] == device
        and report.missing == ["temperature"]
        and report.intermittent == []
        and report.steps == steps
        and figures["temperature (steps, none_steps, cause)"] == (steps, steps, "unused")
        and sorted(report.params)
        == sorted(["encoder.weight", "encoder.bias", "head.weight", "head.bias", "temperature"])
        and figures["used (steps, none_steps)"] == [(steps, 0)]
        and figures["gradguard_json"]
        and figures["warned_once_about_temperature"]
        and not figures["internal_errors"]
        and run["norm_check"]["series_expected"] == ["encoder.bias", "encoder.weight", "head.bias", "head.weight"]
        and norms_match(run["norm_check"])
    )


def hf_unavailable() -> str | None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: the model is built here
    try:
        import transformers  # noqa: F401

        import lightning_gradguard.hf  # noqa: F401
    except ImportError as err:
        return f"transformers is not importable: {err}"
    return None


def check_hf_trainer(device: str) -> dict[str, Any]:
    """``transformers.Trainer`` with ``GradGuardCallback``, 10 steps, a planted unused parameter; the logged norms
    (after the Trainer's clipping, ``max_grad_norm=1.0``) in ``log_history``."""
    if hf_unavailable():
        return {"skipped": hf_unavailable(), "passed": None}
    steps = 10
    run = train_hf(device, steps, logging_steps=5)
    result = hf_figures(run)
    result["passed"] = hf_passed(run, result, device, steps) and run["report"].amp_skipped_steps in (None, 0)
    return result


def check_hf_fp16(device: str) -> dict[str, Any]:
    """The same with ``fp16=True`` (a GradScaler, CUDA only) and no clipping (``max_grad_norm=0``): the gradients
    still carry the loss scale at the check, the logged norms must be unscaled, skipped steps counted."""
    if device != "cuda":
        return {"skipped": "the Trainer's fp16 GradScaler needs CUDA (accelerate uses none on the CPU)", "passed": None}
    if hf_unavailable():
        return {"skipped": hf_unavailable(), "passed": None}
    steps = 10
    run = train_hf(device, steps, logging_steps=5, fp16=True, max_grad_norm=0.0)
    result = hf_figures(run)
    scaler = run["trainer"].accelerator.scaler
    init_scale, scale_after = (scaler._init_scale, scaler.get_scale()) if scaler is not None else (None, None)
    # growth_interval (2000) is not reached in 10 steps: each halving of the scale is one skipped step
    expected_skips = round(math.log2(init_scale / scale_after)) if scaler is not None else None
    result.update(scale=[init_scale, scale_after], expected_amp_skipped_steps=expected_skips)
    result["passed"] = (
        hf_passed(run, result, device, steps)
        and scaler is not None
        and run["report"].amp_skipped_steps == expected_skips
    )
    return result


# ---------------------------------------------------------------------- 4. strict mode
class SometimesNet(nn.Module):
    """``extra`` joins the output unless told otherwise."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(IN_DIM, HIDDEN)
        self.extra = nn.Linear(HIDDEN, HIDDEN)
        self.head = nn.Linear(HIDDEN, 1)

    def forward(self, x, use_extra: bool = True):
        h = torch.tanh(self.encoder(x))
        if use_extra:
            h = h + self.extra(h)
        return self.head(h)


def check_strict(device: str) -> dict[str, Any]:
    """``watch(strict=True)``; ``extra`` left out at step 3: ``GradGuardError`` from that ``optimizer.step()``."""
    bad_step = 3
    dev = torch.device(device)
    torch.manual_seed(0)
    model = SometimesNet().to(dev)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    raised: dict[str, Any] = {}
    before: dict[str, torch.Tensor] = {}
    with Recorded() as recorded:
        guard = watch(model, optimizer, strict=True, summary=False)
        try:
            for step, (x, y) in enumerate(batches(6, dev)):
                F.mse_loss(model(x, use_extra=step != bad_step), y).backward()
                before = {n: p.detach().clone() for n, p in model.named_parameters()}
                try:
                    optimizer.step()
                except GradGuardError as err:
                    raised = {"at_step": step, "err": err}
                    break
                optimizer.zero_grad()
        finally:
            guard.close()
    err = raised.get("err")
    unchanged = bool(before) and all(torch.equal(before[n], p.detach()) for n, p in model.named_parameters())
    result = {
        "raised_at_loop_step": raised.get("at_step"),
        "error_step": getattr(err, "step", None),
        "error_params": getattr(err, "params", None),
        "message_names_both": err is not None and all(n in str(err) for n in ("extra.weight", "extra.bias")),
        "is_runtime_error": isinstance(err, RuntimeError),
        "weights_unchanged_by_the_step": unchanged,
        "message_first_line": str(err).splitlines()[0] if err is not None else None,
        **recorded.figures(),
    }
    result["passed"] = (
        raised.get("at_step") == bad_step
        and result["error_step"] == bad_step
        and sorted(result["error_params"] or []) == ["extra.bias", "extra.weight"]
        and result["message_names_both"]
        and result["is_runtime_error"]
        and unchanged
        and result["gradguard_warnings"] == 0  # strict mode raises instead of warning
        and not result["internal_errors"]
    )
    return result


# ---------------------------------------------------------------------- 5. the Lightning Trainer, 16-mixed
def check_lightning_accumulation(device: str) -> dict[str, Any]:
    """``precision="16-mixed"``, ``accumulate_grad_batches=4``, ``aux`` used on batches 0, 4, 8 and 12 only."""
    from lightning.pytorch import LightningModule, Trainer
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_gradguard import GradGuard

    accumulate, n_batches = 4, 16

    class Branchy(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.Linear(IN_DIM, HIDDEN)
            self.head = nn.Linear(HIDDEN, 1)
            self.aux = nn.Linear(HIDDEN, 1)

        def training_step(self, batch, batch_idx):
            x, y = batch
            h = torch.tanh(self.encoder(x))
            out = self.head(h)
            if batch_idx % accumulate == 0:  # the first micro-batch of each window
                out = out + 0.1 * self.aux(h)
            return F.mse_loss(out.float(), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-2)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_batches * 8, IN_DIM, generator=g) * 0.5
    y = torch.randn(n_batches * 8, 1, generator=g) * 0.1  # small gradients: no overflow at the default scale
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    if device == "cuda":
        precision: dict[str, Any] = {"precision": "16-mixed"}
    else:  # Trainer(accelerator="cpu", precision="16-mixed") would silently become bf16-mixed
        from lightning.pytorch.plugins.precision import MixedPrecision

        precision = {"plugins": [MixedPrecision("16-mixed", "cpu")]}
    torch.manual_seed(0)
    guard = GradGuard(summary=False)
    with Recorded() as recorded:
        trainer = Trainer(
            accelerator=device,
            devices=1,
            max_epochs=1,
            accumulate_grad_batches=accumulate,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            callbacks=[guard],
            **precision,
        )
        trainer.fit(Branchy(), loader)
    report = guard.report()
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    init_scale, scale_after = (scaler._init_scale, scaler.get_scale()) if scaler is not None else (None, None)
    counts = {n: (p.steps, p.none_steps, p.micro_batches, p.none_micro_batches) for n, p in report.params.items()}
    steps = n_batches // accumulate
    result = {
        "precision": trainer.precision,
        **_verdict(report),
        "micro_batches": report.micro_batches,
        "counts (steps, none_steps, micro_batches, none_micro_batches)": counts,
        "amp_skipped_steps": report.amp_skipped_steps,
        "scale": [init_scale, scale_after],
        "disabled": sorted(guard._disabled),
        **recorded.figures(),
    }
    expected = {
        **dict.fromkeys(["encoder.weight", "encoder.bias", "head.weight", "head.bias"], (steps, 0, n_batches, 0)),
        **dict.fromkeys(["aux.weight", "aux.bias"], (steps, 0, n_batches, n_batches - n_batches // accumulate)),
    }
    result["passed"] = (
        trainer.precision == "16-mixed"
        and scaler is not None
        and report.intermittent == ["aux.weight", "aux.bias"]
        and report.missing == []
        and report.nonfinite == []
        and report.zero == []
        and not report.findings
        and (report.steps, report.micro_batches) == (steps, n_batches)
        and counts == expected
        and report.amp_skipped_steps == 0
        and scale_after == init_scale
        and not result["disabled"]
        and not result["internal_errors"]
        and result["gradguard_warnings"] == 0  # intermittent is not missing: no warning
    )
    return result


CHECKS: dict[str, Callable[[str], dict[str, Any]]] = {
    "watch(): fp16 autocast, GradScaler, fused Adam, overflow, TensorBoard": check_plain_amp,
    "watch_fabric(): bf16-mixed GAN, detach, two optimizers": check_fabric_gan,
    "watch_fabric(): the same GAN, step(); zero_grad() order": functools.partial(
        check_fabric_gan, zero_grad_after_step=True
    ),
    "Hugging Face Trainer: GradGuardCallback, unused parameter": check_hf_trainer,
    "Hugging Face Trainer: fp16=True, no clipping (CUDA only)": check_hf_fp16,
    "watch(strict=True): GradGuardError at step 3": check_strict,
    "Lightning Trainer: 16-mixed, accumulate_grad_batches=4, intermittent branch": check_lightning_accumulation,
}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--json", default=None, help="write every figure to this JSON file")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available (use --device cpu for a smoke run)")
    if args.device == "cpu":
        torch.set_num_threads(1)
    torch.set_float32_matmul_precision("high")
    environment = {
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    results: dict[str, Any] = {"environment": environment}
    failed = False
    started_all = time.perf_counter()
    rows = []
    print(f"GradGuard entry-point checks on {environment['device']} (torch {environment['torch']})\n", flush=True)
    for name, check in CHECKS.items():
        started = time.perf_counter()
        try:
            result = check(args.device)
        except Exception:  # noqa: BLE001 - a check that crashes is a failed check, the others still run
            result = {"passed": False, "error": traceback.format_exc(limit=12)}
        result["seconds"] = round(time.perf_counter() - started, 1)
        results[name] = result
        verdict = {True: "pass", False: "FAIL", None: "skipped"}[result.get("passed")]
        failed |= result.get("passed") is False
        figures = {k: v for k, v in result.items() if k not in ("passed", "params", "error")}
        rows.append(f"| {name} | {verdict} | {json.dumps(figures, default=str)} |")
        print(f"{name}: {verdict} ({result['seconds']} s)", flush=True)
        if "error" in result:
            print(result["error"], file=sys.stderr)
    results["total_seconds"] = round(time.perf_counter() - started_all, 1)
    print("\n| check | result | figures |")
    print("|---|---|---|")
    print("\n".join(rows))
    print(f"\ntotal: {results['total_seconds']} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)
    status = 1 if failed else 0
    print(f"gpu_adapters exit status: {status}")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
