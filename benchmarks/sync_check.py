"""Proof that GradGuard never synchronizes the GPU on a step that does not log, and logs the right values.

Trains the GPT preset under Lightning in two phases, with ``torch.cuda.set_sync_debug_mode("error")`` switched on
for every non-logging step (from that step's ``on_train_batch_start`` to the next one), so that any host
synchronization raises:

1. ``baseline``: no GradGuard. Shows that Lightning's own loop and the model are free of synchronizations, which
   is what makes phase 2 meaningful.
2. ``gradguard``: ``GradGuard(log_every_n_steps=--log-every)``, norms measured at every step (its default on an
   accelerator), a TensorBoardLogger. Non-logging steps run under ``"error"``, the diagnosis window of the first
   steps included; logging steps may copy to the host (GradGuard's copy is non-blocking anyway).
3. ``watch``: the same model in a hand-written loop (bf16 autocast on CUDA) with ``watch(model, optimizer,
   log_dir=...)``: its gradient hooks, end-of-backward callback, step pre-hook and staged logging copies, with the
   non-logging steps (forward, backward, ``optimizer.step()``) under ``"error"``.

A synchronization inside GradGuard would be caught by its own failure isolation and switch a feature off, so the
check also requires that no GradGuard feature was disabled and no internal-error warning was issued. Finally the
norms GradGuard wrote to TensorBoard are compared with norms computed independently at those steps.

With ``--device cpu`` the same script runs as a smoke test (there is no sync debug mode on the CPU).

Usage::

    python benchmarks/sync_check.py --preset gpu
    python benchmarks/sync_check.py --preset tiny --device cpu

"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import warnings
from typing import Any, Optional

import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loggers import TensorBoardLogger

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpt import GPT, PRESETS, token_batches  # noqa: E402

from lightning_gradguard import GradGuard  # noqa: E402


class SyncTrap(Callback):
    """Turns CUDA's sync debug mode to ``"error"`` for the steps at which nothing logs; first in the callback list."""

    def __init__(self, log_every: Optional[int], cuda: bool) -> None:
        self.log_every = log_every
        self.cuda = cuda
        self.trapped_steps: list[int] = []
        self.logging_steps: list[int] = []

    def _set(self, mode: str) -> None:
        if self.cuda:
            torch.cuda.set_sync_debug_mode(mode)

    def on_train_batch_start(self, trainer: Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        stepped = trainer.fit_loop.epoch_loop._batches_that_stepped
        logs = self.log_every is not None and (stepped + 1) % self.log_every == 0
        (self.logging_steps if logs else self.trapped_steps).append(stepped)
        self._set("default" if logs else "error")

    def on_train_end(self, trainer: Trainer, pl_module: Any) -> None:
        self._set("default")

    def on_exception(self, trainer: Trainer, pl_module: Any, exception: BaseException) -> None:
        self._set("default")


class NormRecorder(Callback):
    """After GradGuard, at logging steps only: every gradient's norm, computed independently."""

    def __init__(self, log_every: int) -> None:
        self.log_every = log_every
        self.norms: dict[int, dict[str, float]] = {}

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: Any, optimizer: Any) -> None:
        stepped = trainer.fit_loop.epoch_loop._batches_that_stepped
        if (stepped + 1) % self.log_every == 0:
            self.norms[stepped] = {n: torch.linalg.vector_norm(p.grad.float()).item()
                                   for n, p in pl_module.named_parameters() if p.grad is not None}


def fit(phase: str, args: argparse.Namespace, tmp: str) -> dict[str, Any]:
    config = PRESETS[args.preset]
    cuda = args.device == "cuda"
    torch.manual_seed(0)
    model = GPT(config)
    guard = GradGuard(log_every_n_steps=args.log_every, summary=False) if phase == "gradguard" else None
    trap = SyncTrap(args.log_every if guard else None, cuda)
    recorder = NormRecorder(args.log_every)
    callbacks = [trap] + ([guard, recorder] if guard else [])
    logger = TensorBoardLogger(tmp, name=phase)
    trainer = Trainer(
        accelerator="gpu" if cuda else "cpu",
        devices=1,
        precision=config.precision if cuda else "32-true",
        max_steps=args.steps,
        logger=logger,
        log_every_n_steps=args.log_every,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    result: dict[str, Any] = {"phase": phase, "error": None}
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        try:
            trainer.fit(model, token_batches(config, args.steps))
        except RuntimeError as err:  # a synchronization under "error" mode outside GradGuard's isolation
            result["error"] = f"{type(err).__name__}: {err}"
        finally:
            trap._set("default")
    internal = [str(w.message) for w in record if "GradGuard: internal error" in str(w.message)]
    result.update(
        steps=trainer.global_step,
        trapped_steps=len(trap.trapped_steps),
        logging_steps=trap.logging_steps,
        internal_errors=internal,
        disabled=sorted(guard._disabled) if guard else [],
    )
    if guard is not None and result["error"] is None:
        result["norm_check"] = compare_logged_norms(logger.log_dir, recorder.norms)
    return result


def plain_loop(args: argparse.Namespace, tmp: str) -> dict[str, Any]:
    """Phase 3: ``watch()`` in a hand-written loop, non-logging steps under the sync trap."""
    from contextlib import nullcontext

    from lightning_gradguard import watch

    config = PRESETS[args.preset]
    cuda = args.device == "cuda"
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    model = GPT(config).to(device)
    optimizer = model.configure_optimizers()
    log_dir = os.path.join(tmp, "watch")
    result: dict[str, Any] = {"phase": "watch", "error": None}
    trapped, logging_steps, steps = 0, [], 0
    norms: dict[int, dict[str, float]] = {}
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        guard = watch(model, optimizer, log_dir=log_dir, log_every_n_steps=args.log_every, summary=False)
        try:
            for step, batch in enumerate(token_batches(config, args.steps)):
                idx, targets = (t.to(device) for t in batch)  # the input copy, before the trap
                logs = (step + 1) % args.log_every == 0
                if logs:
                    logging_steps.append(step)
                else:
                    trapped += 1
                if cuda:
                    torch.cuda.set_sync_debug_mode("default" if logs else "error")
                with torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext():
                    loss = model.training_step((idx, targets), step)
                loss.backward()
                if logs:  # the reference, read before the step changes nothing of the gradients
                    norms[step] = {n: torch.linalg.vector_norm(p.grad.float()).item()
                                   for n, p in model.named_parameters() if p.grad is not None}
                optimizer.step()
                if cuda:
                    torch.cuda.set_sync_debug_mode("default")
                optimizer.zero_grad()
                steps += 1
        except RuntimeError as err:  # a synchronization under "error" mode outside GradGuard's isolation
            result["error"] = f"{type(err).__name__}: {err}"
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
            guard.close()
    internal = [str(w.message) for w in record if "GradGuard: internal error" in str(w.message)]
    result.update(steps=steps, trapped_steps=trapped, logging_steps=logging_steps, internal_errors=internal,
                  disabled=sorted(guard._disabled))
    if result["error"] is None:
        result["norm_check"] = compare_logged_norms(log_dir, norms)
    return result


def compare_logged_norms(log_dir: str, expected: dict[int, dict[str, float]]) -> dict[str, Any]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    accumulator.Reload()
    prefix = "gradguard/norm/"
    compared, worst = 0, 0.0
    missing = []
    for step, norms in expected.items():
        for name, value in norms.items():
            tag = prefix + name
            if tag not in accumulator.Tags()["scalars"]:
                missing.append(tag)
                continue
            logged = {e.step: e.value for e in accumulator.Scalars(tag)}
            if step not in logged:
                missing.append(f"{tag}@{step}")
                continue
            compared += 1
            worst = max(worst, abs(logged[step] - value) / max(abs(value), 1e-30))
    return {"compared": compared, "max_relative_error": worst, "missing": missing[:10], "missing_count": len(missing)}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="gpu")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--log-every", type=int, default=8)
    parser.add_argument("--json", help="write the results here (default: $OUT/sync-check.json when $OUT is set)")
    args = parser.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    for noisy in (".*does not have many workers.*", ".*smaller than the logging interval.*", ".*TensorFloat32.*"):
        warnings.filterwarnings("ignore", message=noisy)

    with tempfile.TemporaryDirectory() as tmp:
        phases = [fit("baseline", args, tmp), fit("gradguard", args, tmp), plain_loop(args, tmp)]
    baseline, guarded, plain = phases

    def passed(phase: dict[str, Any]) -> bool:
        check = phase.get("norm_check") or {}
        return (
            phase["error"] is None
            and not phase["internal_errors"]
            and not phase["disabled"]
            and phase["steps"] == args.steps
            and check.get("compared", 0) > 0
            and check.get("missing_count", 1) == 0
            and check.get("max_relative_error", 1.0) < 1e-3
        )

    ok = baseline["error"] is None and passed(guarded) and passed(plain)
    mode = 'sync debug mode "error"' if args.device == "cuda" else "CPU smoke run, no sync debug mode"
    print(f"sync check on {args.device} ({mode}), preset {args.preset!r}, {args.steps} steps, "
          f"logging every {args.log_every}")
    for phase in phases:
        print(f"  {phase['phase']:<10} steps={phase['steps']} trapped(non-logging)={phase['trapped_steps']} "
              f"error={phase['error']} internal_errors={len(phase['internal_errors'])} disabled={phase['disabled']}")
    print(f"  logged norms vs independent (Trainer): {guarded.get('norm_check')}")
    print(f"  logged norms vs independent (watch):   {plain.get('norm_check')}")
    print("PASS" if ok else "FAIL")
    path = args.json
    if path is None and os.environ.get("OUT"):
        path = os.path.join(os.environ["OUT"], "sync-check.json")
    if path:
        with open(path, "w") as f:
            json.dump({"device": args.device, "passed": ok, "phases": phases}, f, indent=2)
        print(f"wrote {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
