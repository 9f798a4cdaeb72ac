"""The guard's own cost per optimizer step as the number of parameter tensors grows (CPU).

Drives :class:`~lightning_gradguard.GradGuardEngine` directly around a real training step (zero_grad, forward,
backward, optimizer step) of a model with 100 to 10,000 parameter tensors, and reports:

* ``in-call``: the time spent inside the engine's calls (``start_micro_batch``, ``before_backward``,
  ``after_backward``, ``check_step``, and on logging steps ``metrics.step_metrics`` plus one TensorBoard write);
* ``loop diff``: the median step time of the guarded loop minus the median of the same loop without the guard,
  with the variants interleaved step by step so that background load hits them alike.

Two settings are measured separately: the defaults (on the CPU ``nonfinite_check="auto"`` reads gradient values
only on logging steps) and ``nonfinite_check="every_step"`` (per-parameter norms at every step). A logging step
is timed on its own; ``amortized`` spreads it over ``--log-every`` steps (Lightning's default cadence is 50).

The second table is the cost of walking the autograd graph from the loss (what diagnosis does at most once per
window with a missing gradient) against the graph's node count.

Usage::

    python benchmarks/scaling.py                       # 100, 1000, 5000, 10000 tensors
    python benchmarks/scaling.py --sizes 100 1000 --steps 20 --json scaling.json

"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from typing import Any, Callable, Optional

import torch
from torch import nn

from lightning_gradguard import GradGuardEngine, GuardConfig
from lightning_gradguard.metrics import step_metrics

LAYERS_PER_BLOCK = 10


class ManyTensors(nn.Module):
    """A chain of tiny ``Linear`` layers in blocks of ten: ``blocks.<b>.<l>.weight`` / ``.bias``.

    Tiny layers make the training step cheap, so the per-tensor cost of the guard stands out.
    """

    def __init__(self, n_tensors: int, width: int = 4) -> None:
        super().__init__()
        layers = n_tensors // 2
        blocks = max(layers // LAYERS_PER_BLOCK, 1)
        per_block = max(layers // blocks, 1)
        self.blocks = nn.ModuleList(
            nn.Sequential(*(nn.Linear(width, width) for _ in range(per_block))) for _ in range(blocks)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, guard: Optional[Any]) -> float:
    """One step in Lightning's order (forward, zero_grad, backward, step); returns the seconds spent in the guard."""
    inside = 0.0
    if guard is not None:
        t = time.perf_counter()
        guard.start()
        inside += time.perf_counter() - t
    loss = model(x).square().mean()
    optimizer.zero_grad(set_to_none=True)  # Lightning zeroes inside the closure, after training_step
    if guard is not None:
        t = time.perf_counter()
        guard.engine.before_backward(loss)
        inside += time.perf_counter() - t
    loss.backward()
    if guard is not None:
        t = time.perf_counter()
        guard.engine.after_backward()
        guard.check(optimizer)
        inside += time.perf_counter() - t
    optimizer.step()
    return inside


class _Guard:
    """An engine plus what an adapter does at a step: decide whether to measure and log, then log."""

    def __init__(self, model: nn.Module, every_step: bool, logger: Any) -> None:
        self.engine = GradGuardEngine(GuardConfig.create(nonfinite_check="every_step" if every_step else "auto"))
        self.engine.bind(model.named_parameters(), module=model)
        self.every_step = every_step
        self.logger = logger
        self.log_now = False
        self.step = 0
        self.series = 0

    def start(self) -> None:
        self.engine.start_micro_batch()

    def check(self, optimizer: torch.optim.Optimizer) -> None:
        check = self.engine.check_step(optimizer, step=self.step, measure=self.log_now or self.every_step)
        if self.log_now:
            metrics = step_metrics(self.engine, [check])
            self.series = len(metrics)
            self.logger.log_metrics(metrics, step=self.step)
        self.step += 1


def measure_size(n_tensors: int, steps: int, log_steps: int, log_every: int, tmp: str) -> dict[str, Any]:
    """Interleave (none, defaults, every_step) step by step; time logging steps of each guard separately."""
    from lightning.pytorch.loggers import TensorBoardLogger

    torch.manual_seed(0)
    model = ManyTensors(n_tensors)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(2, 4)
    logger = TensorBoardLogger(tmp, name=f"scaling{n_tensors}")
    guards = {"defaults": _Guard(model, False, logger), "every_step": _Guard(model, True, logger)}
    variants: list[tuple[str, Optional[_Guard]]] = [("none", None), *guards.items()]

    step_time: dict[str, list[float]] = defaultdict(list)
    inside: dict[str, list[float]] = defaultdict(list)
    paired: dict[str, list[float]] = defaultdict(list)  # variant step minus the unguarded step of the same round
    warmup = 3
    gc.collect()
    gc.freeze()  # long-lived objects out of the collector's way: no full collections in the middle of a timing
    for i in range(warmup + steps + log_steps):
        logging = i >= warmup + steps
        order = variants[i % 3:] + variants[: i % 3]  # rotate so that no variant always runs first
        times = {}
        for name, guard in order:
            if guard is not None:
                guard.log_now = logging
            t = time.perf_counter()
            spent = _train_step(model, optimizer, x, guard)
            times[name] = time.perf_counter() - t
            if i >= warmup:
                key = f"{name}@log" if logging and guard is not None else name
                step_time[key].append(times[name])
                inside[key].append(spent)
        if i >= warmup:
            for name in guards:
                paired[f"{name}@log" if logging else name].append(times[name] - times["none"])
    gc.unfreeze()

    ms = 1e3
    params = list(model.parameters())
    result: dict[str, Any] = {"tensors": len(params), "elements": sum(p.numel() for p in params)}
    result["step_ms"] = statistics.median(step_time["none"]) * ms
    for name, guard in guards.items():
        plain = statistics.median(inside[name])
        at_log = statistics.median(inside[f"{name}@log"])
        diff = statistics.median(paired[name])
        diff_log = statistics.median(paired[f"{name}@log"])
        result[name] = {
            "in_call_ms": plain * ms,
            "in_call_log_step_ms": at_log * ms,
            "in_call_amortized_ms": (plain + (at_log - plain) / log_every) * ms,
            "loop_diff_ms": diff * ms,
            "loop_diff_log_step_ms": diff_log * ms,
            "loop_diff_amortized_ms": (diff + (diff_log - diff) / log_every) * ms,
            "logged_series": guard.series,
        }
    return result


def _graph_walk(loss: torch.Tensor) -> tuple[int, int]:
    """Walk the autograd graph from ``loss``: (nodes visited, parameters reached through AccumulateGrad)."""
    seen: set[int] = set()
    stack = [loss.grad_fn]
    reached = 0
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if hasattr(node, "variable"):
            reached += 1
        stack.extend(next_node for next_node, _ in node.next_functions)
    return len(seen), reached


def measure_diagnosis(n_tensors: int, repeats: int) -> dict[str, Any]:
    """Cost of one diagnosis pass: the project's own diagnosis when present, else a plain graph walk."""
    torch.manual_seed(0)
    model = ManyTensors(n_tensors)
    x = torch.randn(2, 4)
    walk = _diagnosis_walk(model)
    times = []
    nodes = reached = 0
    for _ in range(repeats):
        loss = model(x).square().mean()
        t = time.perf_counter()
        nodes, reached = walk(loss)
        times.append(time.perf_counter() - t)
        loss.backward()
    return {"tensors": n_tensors, "nodes": nodes, "reached": reached, "walk_ms": statistics.median(times) * 1e3}


def _diagnosis_walk(model: nn.Module) -> Callable[[torch.Tensor], tuple[int, int]]:
    # TODO(diagnosis): when lightning_gradguard.diagnosis exposes a graph-walk entry point, time that instead of
    # this stand-in, so the table measures what the guard really runs when it explains a missing gradient.
    return _graph_walk


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 5000, 10000])
    parser.add_argument("--steps", type=int, default=30, help="timed non-logging steps per variant")
    parser.add_argument("--log-steps", type=int, default=7, help="timed logging steps per guard variant")
    parser.add_argument("--log-every", type=int, default=50, help="logging cadence used for the amortized cost")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: less noise)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, threads={args.threads}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            row = measure_size(n, args.steps, args.log_steps, args.log_every, tmp)
            rows.append(row)
            _print_row(row, args.log_every)
            sys.stdout.flush()
    print("\ndiagnosis: graph walk from the loss (nodes = autograd nodes, reached = parameters found)")
    walks = [measure_diagnosis(n, repeats=5) for n in args.sizes]
    for w in walks:
        print(f"  {w['tensors']:>6} tensors  {w['nodes']:>6} nodes  {w['reached']:>6} reached  {w['walk_ms']:8.2f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": args.threads, "sizes": rows, "diagnosis": walks}, f,
                      indent=2)
    return 0


def _print_row(row: dict[str, Any], log_every: int) -> None:
    print(f"\n{row['tensors']} tensors ({row['elements']:,} elements), step without guard {row['step_ms']:.2f} ms")
    print(f"  {'':<11} {'-- inside the guard calls --':^30} {'-- loop difference --':^30}")
    print(f"  {'setting':<11} {'step':>9} {'log step':>9} {'amortized':>10} {'step':>9} {'log step':>9} "
          f"{'amortized':>10} {'series':>7}")
    for name in ("defaults", "every_step"):
        r = row[name]
        print(
            f"  {name:<11} {r['in_call_ms']:9.3f} {r['in_call_log_step_ms']:9.2f} {r['in_call_amortized_ms']:10.3f} "
            f"{r['loop_diff_ms']:9.3f} {r['loop_diff_log_step_ms']:9.2f} {r['loop_diff_amortized_ms']:10.3f} "
            f"{r['logged_series']:>7}"
        )
    print(f"  (ms per step, medians; amortized = logging every {log_every} steps; series = metrics per log step)")


if __name__ == "__main__":
    sys.exit(main())
