"""Training-step overhead of GradGuard against no callback and against Lightning's documented recipe.

One GPT model (``benchmarks/gpt.py``) is trained under Lightning with four variants:

* ``none``: no callback;
* ``defaults``: ``GradGuard()``, logging at the Trainer's cadence (``--log-every``);
* ``every_step``: ``GradGuard(log_every_n_steps=1)``: norms of every parameter tensor written at every step;
* ``recipe``: Lightning's recipe, ``self.log_dict(grad_norm(self, norm_type=2))`` in ``on_before_optimizer_step``.

Every variant has the same ``TensorBoardLogger`` (a temporary directory) and ``Trainer(log_every_n_steps=...)``.
Two ways to alternate them (``--mode``):

* ``interleave`` (default on the CPU): one fit in which the variants take turns batch by batch (a dispatcher
  callback hands each batch's hooks to that batch's GradGuard only and sets the recipe flag for the recipe's
  batches), so that the background load of a shared machine hits every variant alike. A GradGuard then sees
  every fourth batch; with ``--log-every 10`` ``defaults`` writes on every fifth of its own steps, twice
  Lightning's default density.
* ``fits`` (default on CUDA): short fits, one variant each, round-robin, ``--rounds`` times: no interplay between
  variants (on a GPU a synchronization in one batch would also delay the start of the next).

The step time is the interval between consecutive ``on_train_batch_start`` calls, so it includes everything
Lightning does after ``on_train_batch_end`` (the recipe's metric writes happen there). On CUDA the intervals come
from CUDA events recorded in the stream, without synchronizing, so the CPU can run ahead of the GPU as it does in
real training and a host synchronization shows up as the gap it causes. On the CPU they are this process's CPU
time by default (``--clock cpu``: all its threads, TensorBoard's writer included), so that other processes on a
shared machine weigh less; ``--clock wall`` uses ``time.perf_counter``. The first ``--warmup`` steps of each
variant (each fit) are reported apart: they hold GradGuard's diagnosis window.

Usage::

    python benchmarks/overhead.py --preset cpu          # 2-core CPU: about 1.5 minutes
    python benchmarks/overhead.py --preset gpu          # one GPU, GPT-2 small (163M), bf16-mixed
    python benchmarks/overhead.py --preset tiny --device cpu --rounds 1 --steps 3   # smoke test

"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any, Optional

import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loggers import TensorBoardLogger

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpt import GPT, PRESETS, token_batches  # noqa: E402

from lightning_gradguard import GradGuard  # noqa: E402

VARIANTS = ("none", "defaults", "every_step", "recipe")

# (rounds, timed steps per variant and round, warm-up steps per variant (and fit), Trainer log_every_n_steps)
PRESET_RUNS = {"gpu": (4, 30, 5, 10), "cpu": (8, 25, 3, 10), "tiny": (1, 3, 1, 2)}


class StepTimer(Callback):
    """Start-to-start intervals of training batches: CUDA events on the GPU; on the CPU this process's CPU time
    (``clock="cpu"``: immune to the time a shared machine's other processes take) or ``perf_counter``."""

    def __init__(self, cuda: bool, clock: str = "cpu") -> None:
        self.cuda = cuda
        self.clock = time.process_time if clock == "cpu" else time.perf_counter
        self.marks: list[Any] = []

    def on_train_batch_start(self, trainer: Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(self.clock())

    def intervals_ms(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])]


def variant_callbacks(variant: str) -> list[Callback]:
    # two guards share the run's logger: each takes a name, so that their tags do not mix
    if variant == "defaults":
        return [GradGuard(summary=False, name="defaults")]
    if variant == "every_step":
        return [GradGuard(log_every_n_steps=1, summary=False, name="every_step")]
    return []


_PER_BATCH_HOOKS = ("on_train_batch_start", "on_before_backward", "on_after_backward", "on_before_zero_grad",
                    "on_before_optimizer_step", "on_train_batch_end")
_LIFECYCLE_HOOKS = ("setup", "on_fit_start", "on_train_start", "on_train_epoch_start", "on_train_epoch_end",
                    "on_train_end", "on_fit_end", "teardown", "on_exception")


class Dispatcher(Callback):
    """Runs the variants in turn, one training batch each, inside a single fit.

    Each batch belongs to one variant: the GradGuard of that variant gets the batch's hooks (the others do not see
    the batch at all), and the recipe flag of the model is set for the recipe's batches. Background load then hits
    every variant alike, which short fits in turn cannot promise on a shared machine.
    """

    def __init__(self, variants: list[str], callbacks: dict[str, list[Callback]]) -> None:
        self.variants = variants
        self.callbacks = callbacks
        self.active: Optional[str] = None

    def variant_at(self, batch: int) -> str:
        return self.variants[batch % len(self.variants)]

    def _all(self) -> list[Callback]:
        return [cb for cbs in self.callbacks.values() for cb in cbs]

    def on_train_batch_start(self, trainer: Trainer, pl_module: Any, *args: Any) -> None:
        self.active = self.variant_at(trainer.fit_loop.epoch_loop._batches_that_stepped)
        pl_module.grad_norm_recipe = self.active == "recipe"
        for cb in self.callbacks.get(self.active, []):
            cb.on_train_batch_start(trainer, pl_module, *args)


def _forward_per_batch(name: str) -> Any:
    def hook(self: Dispatcher, trainer: Trainer, pl_module: Any, *args: Any) -> None:
        for cb in self.callbacks.get(self.active or "", []):
            getattr(cb, name)(trainer, pl_module, *args)

    return hook


def _forward_lifecycle(name: str) -> Any:
    def hook(self: Dispatcher, *args: Any, **kwargs: Any) -> None:
        for cb in self._all():
            getattr(cb, name)(*args, **kwargs)

    return hook


for _name in _PER_BATCH_HOOKS[1:]:
    setattr(Dispatcher, _name, _forward_per_batch(_name))
for _name in _LIFECYCLE_HOOKS:
    setattr(Dispatcher, _name, _forward_lifecycle(_name))


def _trainer(args: argparse.Namespace, precision: str, max_steps: int, logger: Any, callbacks: list) -> Trainer:
    return Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu",
        devices=1,
        precision=precision,
        max_steps=max_steps,
        logger=logger,
        log_every_n_steps=args.log_every,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )


def _run_fits(args: argparse.Namespace, model: GPT, precision: str, tmp: str) -> dict[str, dict[str, list[float]]]:
    """Short fits, one variant each, round-robin: no interplay between variants (best on a dedicated GPU)."""
    variants, cuda = args.variants, args.device == "cuda"
    out: dict[str, dict[str, list[float]]] = {v: {"steps": [], "warmup": [], "fit_s": []} for v in variants}
    for r in range(args.rounds):
        for variant in variants[r % len(variants):] + variants[: r % len(variants)]:
            timer = StepTimer(cuda, args.clock)
            model.grad_norm_recipe = variant == "recipe"
            trainer = _trainer(args, precision, args.warmup + args.steps + 1,  # +1: the last interval's end
                               TensorBoardLogger(tmp, name=variant), [timer, *variant_callbacks(variant)])
            t = time.perf_counter()
            trainer.fit(model, token_batches(model.config, args.warmup + args.steps + 1, seed=r))
            out[variant]["fit_s"].append(time.perf_counter() - t)
            intervals = timer.intervals_ms()
            out[variant]["steps"].extend(intervals[args.warmup:])
            out[variant]["warmup"].append(sum(intervals[: args.warmup]))
            if args.verbose:
                print(f"  round {r} {variant:<10} median {statistics.median(intervals[args.warmup:]):8.2f} ms",
                      flush=True)
    return out


def _run_interleaved(args: argparse.Namespace, model: GPT, precision: str, tmp: str) -> dict[str, dict[str, list]]:
    """One fit; the variants take turns batch by batch (best on a shared CPU)."""
    variants, cuda = args.variants, args.device == "cuda"
    n = len(variants)
    total = n * (args.warmup + args.rounds * args.steps)
    timer = StepTimer(cuda, args.clock)
    dispatcher = Dispatcher(variants, {v: variant_callbacks(v) for v in variants})
    trainer = _trainer(args, precision, total + 1, TensorBoardLogger(tmp, name="interleaved"), [timer, dispatcher])
    trainer.fit(model, token_batches(model.config, total + 1))
    out: dict[str, dict[str, list]] = {v: {"steps": [], "warmup": [0.0], "fit_s": []} for v in variants}
    for i, interval in enumerate(timer.intervals_ms()):
        variant = dispatcher.variant_at(i)
        if i < n * args.warmup:
            out[variant]["warmup"][0] += interval
        else:
            out[variant]["steps"].append(interval)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    config = PRESETS[args.preset]
    rounds, steps, warmup, log_every = PRESET_RUNS[args.preset]
    args.rounds = args.rounds or rounds
    args.steps = args.steps or steps
    args.warmup = args.warmup if args.warmup is not None else warmup
    args.log_every = args.log_every or log_every
    args.mode = args.mode or ("fits" if args.device == "cuda" else "interleave")
    cuda = args.device == "cuda"
    precision = config.precision if cuda else "32-true"

    torch.manual_seed(0)
    model = GPT(config)
    n_tensors = len(list(model.parameters()))
    n_params = sum(p.numel() for p in model.parameters())
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        runner = _run_fits if args.mode == "fits" else _run_interleaved
        measured = runner(args, model, precision, tmp)

    base = statistics.median(measured["none"]["steps"])
    rows = {}
    for variant, m in measured.items():
        values = m["steps"]
        median = statistics.median(values)
        rows[variant] = {
            "median_ms": median,
            "p10_ms": _quantile(values, 0.1),
            "p90_ms": _quantile(values, 0.9),
            "steps": len(values),
            "ratio": median / base,
            "warmup_steps_ms": statistics.median(m["warmup"]),
            "fit_s": statistics.median(m["fit_s"]) if m["fit_s"] else None,
        }
    return {
        "preset": args.preset,
        "device": _device_name(cuda),
        "torch": torch.__version__,
        "precision": precision,
        "tensors": n_tensors,
        "params": n_params,
        "mode": args.mode,
        "rounds": args.rounds,
        "steps_per_fit": args.steps,
        "warmup_per_fit": args.warmup,
        "log_every_n_steps": args.log_every,
        "clock": "cuda events" if cuda else args.clock,
        "wall_s": time.perf_counter() - started,
        "variants": rows,
    }


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


def _device_name(cuda: bool) -> str:
    if cuda:
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    return f"{cpu} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def print_table(result: dict[str, Any]) -> None:
    print(
        f"\nGPT preset {result['preset']!r}: {result['tensors']} parameter tensors, {result['params']:,} parameters, "
        f"{result['precision']}, on {result['device']} (torch {result['torch']})"
    )
    how = ("variants taking turns batch by batch in one fit" if result["mode"] == "interleave"
           else "short fits, round-robin over the variants")
    print(
        f"{how}: {result['rounds']} x {result['steps_per_fit']} timed steps per variant (after "
        f"{result['warmup_per_fit']} warm-up steps each), Trainer(log_every_n_steps={result['log_every_n_steps']}),"
        f" {result['wall_s']:.0f} s, clock: {result['clock']}"
    )
    print(f"  {'variant':<11} {'median ms':>10} {'p10':>8} {'p90':>8} {'steps':>6} {'vs none':>8} "
          f"{'warm-up ms':>11} {'fit s':>7}")
    for variant, row in result["variants"].items():
        ratio = f"{row['ratio']:.3f}x" if row["ratio"] else "-"
        print(
            f"  {variant:<11} {row['median_ms']:10.2f} {row['p10_ms']:8.2f} {row['p90_ms']:8.2f} {row['steps']:>6} "
            f"{ratio:>8} {row['warmup_steps_ms']:11.1f} {row['fit_s'] or float('nan'):7.2f}"
        )
    print("  (warm-up ms: a variant's first steps, GradGuard's diagnosis window included; fit s: a whole fit)")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda for the gpu preset")
    parser.add_argument("--mode", choices=("interleave", "fits"),
                        help="interleave: one fit, variants take turns per batch (default on the CPU); "
                             "fits: short fits round-robin (default on CUDA)")
    parser.add_argument("--rounds", type=int, help="round-robin passes over the variants")
    parser.add_argument("--steps", type=int, help="timed steps per fit")
    parser.add_argument("--warmup", type=int, help="discarded steps at the start of each fit")
    parser.add_argument("--log-every", type=int, help="Trainer(log_every_n_steps=...) for every variant")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default on the CPU: 1)")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="CPU device only: this process's CPU time (default; robust on a shared machine) or wall")
    parser.add_argument("--json", help="write the results here (default: $OUT/overhead-<preset>.json when $OUT is set)")
    parser.add_argument("--verbose", action="store_true", help="print each fit's median")
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if args.preset == "gpu" else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    if args.threads is None and args.device == "cpu":
        args.threads = 1  # on a shared machine a second intra-op thread mostly waits for a busy core
    if args.threads:
        torch.set_num_threads(args.threads)
    if "none" not in args.variants:
        args.variants = ["none", *args.variants]
    args.variants = [v for v in VARIANTS if v in args.variants]
    for noisy in (".*does not have many workers.*", ".*smaller than the logging interval.*", ".*GradGuard.*",
                  ".*treespec.*", ".*TensorFloat32.*", ".*LeafSpec.*"):
        warnings.filterwarnings("ignore", message=noisy)
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    result = run(args)
    print_table(result)
    path = args.json
    if path is None and os.environ.get("OUT"):
        path = os.path.join(os.environ["OUT"], f"overhead-{args.preset}.json")
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
