"""What the adapters add to a step of a model with 10,000 parameter tensors: the Trainer callback and ``watch()``.

``scaling.py`` drives the engine directly; this script measures what a user pays through the adapters, on the same
model (a chain of 5,000 ``Linear(4, 4)`` layers: 10,000 parameter tensors, a cheap step so that the per-tensor cost
stands out), with default settings. The target: at most 3 ms per step that does not log, for each adapter.

* ``trainer``: one fit of a ``LightningModule`` under the ``Trainer`` with ``GradGuard()`` among its callbacks and
  a ``TensorBoardLogger``, ``log_every_n_steps`` larger than the fit, so no timed step logs. Guarded and unguarded
  steps alternate batch by batch inside the fit: the guard's per-batch hooks are gated on the instance, so on the
  unguarded batches they return at once (a few microseconds of Lightning calling a callback that does nothing).
  The guard stays where a user puts it in ``trainer.callbacks``, so it takes the same decisions as in a real fit
  (the step check reuses the read after backward when no hook runs in between).
* ``watch``: a hand-written loop (forward, ``zero_grad``, backward, step) with ``watch(model, optimizer,
  log_dir=...)``, ``log_every_n_steps`` larger than a block. The guard's hooks cannot be switched on and off
  between single steps, so guarded and unguarded blocks of steps alternate on the same model; each guarded block
  opens a new guard, whose first steps (the diagnosis window, and the first window's per-parameter hooks) are left
  out, as are the same number of steps at the start of each unguarded block.

A step is the interval between consecutive step starts in this process's CPU time (``time.process_time``; other
processes on a shared machine weigh less; ``--clock wall`` uses ``time.perf_counter``). Reported per loop: the
median step of each variant, the median over pairs of (guarded step - unguarded step) with the pairs taken side by
side (adjacent batches in the fit; the k-th timed step of adjacent blocks in the loop), and its 25th and 75th
percentiles. A step of this model takes about 200 ms, and on a machine where other processes run its time varies by
several milliseconds from step to step, more than the guard costs; so the script also reports the time spent inside
the guard's own hooks (the callback's hooks; the plain-loop adapter's forward, backward, ``zero_grad`` and optimizer
hooks, timed at their entry), the median per guarded step. That figure is an upper bound, not the cost: the
guard's first read of each new ``.grad`` after backward creates the gradient's Python object, which the optimizer's
step would otherwise create a moment later (at 10,000 tensors that moves several milliseconds from the optimizer
into the guard's hook), and it is blind to what the guard costs the rest of the step (cache lines its reads evict).
The loop difference is the figure the target is judged by.

Usage::

    python benchmarks/adapter_scaling.py                 # 10,000 tensors, both loops: about 4 minutes on 2 cores
    python benchmarks/adapter_scaling.py --loops watch --pairs 60
    python benchmarks/adapter_scaling.py --smoke         # 40 tensors, a few steps: seconds

"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any, Callable, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scaling import ManyTensors  # noqa: E402

LOOPS = ("trainer", "watch")
TARGET_MS = 3.0
NEVER = 10**9  # a logging cadence no run reaches

# the Trainer hooks a GradGuard acts on in every batch
_PER_BATCH_HOOKS = ("on_train_batch_start", "on_before_zero_grad", "on_before_backward", "on_after_backward",
                    "on_before_optimizer_step", "on_train_batch_end")


# ---------------------------------------------------------------------------------------------- the Trainer loop
def trainer_loop(n_tensors: int, pairs: int, warmup: int, clock: Callable[[], float], tmp: str) -> dict[str, Any]:
    import lightning.pytorch as pl
    from lightning.pytorch import Callback, Trainer
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_gradguard import GradGuard

    class Chain(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.chain = ManyTensors(n_tensors)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.chain(batch[0]).square().mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    total = 2 * (warmup + pairs)
    # batch i is guarded when _guarded(i): pairs alternate which variant runs first (G N, N G, G N, ...)
    guarded_batches = [(i % 2 == 0) == ((i // 2) % 2 == 0) for i in range(total + 1)]

    class Switch(Callback):
        """First callback: marks each batch's start and decides whether the guard sees the batch."""

        def __init__(self) -> None:
            self.marks: list[float] = []
            self.guarded = False

        def on_train_batch_start(self, trainer: Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
            self.marks.append(clock())
            self.guarded = guarded_batches[len(self.marks) - 1]

    switch = Switch()
    guard = GradGuard(summary=False)
    inside = [0.0] * (total + 1)  # per batch: CPU time inside the guard's hooks
    for name in _PER_BATCH_HOOKS:  # gated on the instance: the guard itself stays in trainer.callbacks
        original = getattr(guard, name)

        def gated(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
            if not switch.guarded:
                return None
            t = clock()
            try:
                return _original(*args, **kwargs)
            finally:
                inside[len(switch.marks) - 1] += clock() - t

        setattr(guard, name, gated)

    gc.collect()
    torch.manual_seed(0)
    model = Chain()
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(total + 1, 2, 4)), batch_size=None)
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=total + 1, logger=TensorBoardLogger(tmp, name="trainer"),
                      log_every_n_steps=NEVER, callbacks=[switch, guard], enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    gc.freeze()  # long-lived objects out of the collector's way: no full collection inside a timed step
    try:
        trainer.fit(model, data)
    finally:
        gc.unfreeze()
    steps = [b - a for a, b in zip(switch.marks, switch.marks[1:])]
    with_guard, without, diffs, in_hooks = [], [], [], []
    for k in range(warmup, warmup + pairs):
        first, second = steps[2 * k], steps[2 * k + 1]
        g, n = (first, second) if guarded_batches[2 * k] else (second, first)
        with_guard.append(g)
        without.append(n)
        diffs.append(g - n)
        in_hooks.append(inside[2 * k] if guarded_batches[2 * k] else inside[2 * k + 1])
    report = guard.report()
    return {
        "with": with_guard, "without": without, "diffs": diffs, "in_hooks": in_hooks,
        "reused_backward_read": guard.engine.reuse_backward_read,
        "guarded_steps": report.steps,
        "tensors": sum(1 for _ in model.parameters()),
    }


# ---------------------------------------------------------------------------------------------- the plain loop
# the plain-loop adapter's entry points: every hook it installs calls one of these (the forward hooks, the pre-hook
# on the outputs' grad_fn, autograd's end-of-backward callback, the zero_grad wrappers, the first window's gradient
# hooks, the optimizer's step pre- and post-hooks)
_WATCH_ENTRIES = {
    "lightning_gradguard.adapters.backward.BackwardBracket": ("_forward_start", "_forward_end", "_output_reached",
                                                               "_end"),
    "lightning_gradguard.adapters.loop.LoopGuard": ("_after_zero_grad", "_on_param_grad", "_on_step_pre_hook",
                                                     "_on_step_post_hook"),
}


class HookTimer:
    """Adds up the CPU time spent inside the adapter's entry points (outermost calls only) while installed."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.total = 0.0
        self._depth = 0
        self._originals: list[tuple[type, str, Any]] = []

    def install(self) -> None:
        import importlib

        for path, names in _WATCH_ENTRIES.items():
            module, _, cls_name = path.rpartition(".")
            cls = getattr(importlib.import_module(module), cls_name)
            for name in names:
                original = cls.__dict__[name]  # a KeyError here: the adapter changed, update _WATCH_ENTRIES
                self._originals.append((cls, name, original))
                setattr(cls, name, self._timed(original))

    def remove(self) -> None:
        for cls, name, original in reversed(self._originals):
            setattr(cls, name, original)
        self._originals.clear()

    def _timed(self, original: Any) -> Any:
        timer = self

        def timed(*args: Any, **kwargs: Any) -> Any:
            if timer._depth:
                return original(*args, **kwargs)
            timer._depth += 1
            t = timer.clock()
            try:
                return original(*args, **kwargs)
            finally:
                timer.total += timer.clock() - t
                timer._depth -= 1

        return timed


def watch_loop(n_tensors: int, blocks: int, steps: int, skip: int, clock: Callable[[], float],
               tmp: str) -> dict[str, Any]:
    from lightning_gradguard import watch

    gc.collect()
    torch.manual_seed(0)
    model = ManyTensors(n_tensors)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(2, 4)
    timer = HookTimer(clock)
    in_hooks: list[float] = []

    def block(guarded: bool, index: int) -> list[float]:
        guard = None
        if guarded:
            guard = watch(model, optimizer, log_dir=os.path.join(tmp, f"watch{index}"), log_every_n_steps=NEVER,
                          summary=False)
        gc.collect()
        gc.freeze()
        marks = []
        for i in range(skip + steps):
            marks.append(clock())
            timer.total = 0.0
            loss = model(x).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if guarded and i >= skip:
                in_hooks.append(timer.total)
        marks.append(clock())
        gc.unfreeze()
        if guard is not None:
            guard.close()
        return [b - a for a, b in zip(marks, marks[1:])][skip:]

    block(False, -1)  # warm-up: the first steps of a fresh model allocate its gradients
    with_guard, without, diffs = [], [], []
    timer.install()
    try:
        for b in range(blocks):
            order = (True, False) if b % 2 == 0 else (False, True)
            times = {guarded: block(guarded, b) for guarded in order}
            with_guard += times[True]
            without += times[False]
            diffs += [g - n for g, n in zip(times[True], times[False])]
    finally:
        timer.remove()
    return {"with": with_guard, "without": without, "diffs": diffs, "in_hooks": in_hooks,
            "tensors": sum(1 for _ in model.parameters())}


# ---------------------------------------------------------------------------------------------- report
def summarize(run: dict[str, Any]) -> dict[str, Any]:
    ms = 1e3
    diffs = sorted(run["diffs"])
    quartiles = statistics.quantiles(diffs, n=4) if len(diffs) > 1 else [diffs[0]] * 3
    summary = {
        "tensors": run["tensors"],
        "without_ms": statistics.median(run["without"]) * ms,
        "with_ms": statistics.median(run["with"]) * ms,
        "extra_ms": statistics.median(diffs) * ms,
        "extra_p25_ms": quartiles[0] * ms,
        "extra_p75_ms": quartiles[2] * ms,
        "pairs": len(diffs),
        "in_hooks_ms": statistics.median(run["in_hooks"]) * ms,
    }
    summary["extra_of_medians_ms"] = summary["with_ms"] - summary["without_ms"]
    for key in ("reused_backward_read", "guarded_steps"):
        if key in run:
            summary[key] = run[key]
    return summary


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loops", nargs="+", choices=LOOPS, default=list(LOOPS))
    parser.add_argument("--tensors", type=int, default=10_000, help="parameter tensors (two per Linear(4, 4))")
    parser.add_argument("--pairs", type=int, default=200, help="trainer: timed (guarded, unguarded) batch pairs")
    parser.add_argument("--warmup", type=int, default=6, help="trainer: pairs left out at the start of the fit")
    parser.add_argument("--blocks", type=int, default=16, help="watch: guarded and unguarded blocks, each")
    parser.add_argument("--steps", type=int, default=10, help="watch: timed steps per block")
    parser.add_argument("--skip", type=int, default=4, help="watch: steps left out at the start of each block")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="40 tensors and a few steps: checks that it runs")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.smoke:
        args.tensors, args.pairs, args.warmup, args.blocks, args.steps, args.skip = 40, 3, 2, 2, 3, 3
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, threads={args.threads}, "
          f"{args.clock} clock, {args.tensors} parameter tensors; target: at most {TARGET_MS:g} ms per step that "
          "does not log")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for loop in args.loops:
            if loop == "trainer":
                run = trainer_loop(args.tensors, args.pairs, args.warmup, clock, tmp)
            else:
                run = watch_loop(args.tensors, args.blocks, args.steps, args.skip, clock, tmp)
            results[loop] = s = summarize(run)
            print(f"{loop:8s} without {s['without_ms']:8.2f} ms   with GradGuard {s['with_ms']:8.2f} ms   "
                  f"extra {s['extra_ms']:+6.2f} ms per step (median of {s['pairs']} pairs; quartiles "
                  f"{s['extra_p25_ms']:+.2f} / {s['extra_p75_ms']:+.2f}; difference of medians "
                  f"{s['extra_of_medians_ms']:+.2f}); inside the guard's hooks {s['in_hooks_ms']:.2f} ms",
                  flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"torch": torch.__version__, "clock": args.clock, "threads": args.threads,
                       "target_ms": TARGET_MS, "loops": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
