"""The guard's own cost per optimizer step as the number of parameter tensors grows (CPU).

Drives :class:`~lightning_gradguard.GradGuardEngine` directly around a real training step (zero_grad, forward,
backward, optimizer step) of a model with 100 to 10,000 parameter tensors, and reports:

* ``in-call``: the time spent inside the engine's calls (``start_micro_batch``, ``before_backward``,
  ``after_backward``, ``check_step``, and on logging steps ``metrics.step_metrics`` plus one TensorBoard write);
* ``loop diff``: the median step time of the guarded loop minus the median of the same loop without the guard,
  with the variants interleaved step by step so that background load hits them alike.

Two settings are measured separately: the defaults (``nonfinite_check="auto"``: on the CPU, gradient values are
read at every step up to 1,000 parameter tensors and only on logging steps above) and
``nonfinite_check="every_step"`` (per-parameter norms at every step). A logging step
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
from typing import Any, Optional

import torch
from torch import nn

from lightning_gradguard.config import GuardConfig
from lightning_gradguard.core.engine import GradGuardEngine
from lightning_gradguard.output.metrics import step_metrics

LAYERS_PER_BLOCK = 10

# CPU time of this process (all its threads): the machine may be shared, and time spent descheduled while other
# processes run is not the guard's cost. ``--clock wall`` switches to time.perf_counter.
clock = time.process_time
READ_CLEARED = False  # --read-cleared: the plain-loop path, which snapshots every gradient before backward


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
    params = optimizer.param_groups[0]["params"]
    inside = 0.0
    if guard is not None:
        t = clock()
        guard.start()
        inside += clock() - t
    loss = model(x).square().mean()
    optimizer.zero_grad(set_to_none=True)  # Lightning zeroes inside the closure, after training_step
    # Two costs of the step itself, paid here in both loops so that the guard's timed calls do not absorb them:
    # the allocator's deferred work for the gradients zero_grad just freed (glibc consolidates them at the next
    # larger allocation: 1-3 ms at 10k tensors, paid by whichever allocation comes first), ...
    spill = [None] * (2 * len(params))
    if guard is not None:
        t = clock()
        # like the Lightning callback after Lightning's own zero_grad: the optimizer's gradients are known None
        guard.engine.before_backward(loss, cleared=None if READ_CLEARED else optimizer)
        inside += clock() - t
    loss.backward()
    # ... and the gradients' Python objects, created by the first read of each new .grad: the optimizer's step
    # reads every .grad and would create them (0.2-0.3 us each) if the guard had not
    grads = [p.grad for p in params]
    if guard is not None:
        t = clock()
        guard.engine.after_backward()
        guard.check(optimizer)
        inside += clock() - t
    del spill, grads
    optimizer.step()
    return inside


class _Guard:
    """An engine plus what an adapter does at a step: decide whether to measure and log, then log."""

    def __init__(self, model: nn.Module, every_step: bool, logger: Any) -> None:
        self.engine = GradGuardEngine(GuardConfig.create(nonfinite_check="every_step" if every_step else "auto"))
        self.engine.bind(model.named_parameters(), module=model)
        # as the Trainer callback decides for automatic optimization with no hook between backward and step
        self.engine.start_run(reuse_backward_read=True)
        # what an adapter decides: "auto" measures every step unless the model has over 1,000 tensors on the CPU
        self.every_step = self.engine.config.measures_every_step(list(model.parameters()))
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
    """Interleave the unguarded loop with each setting in turn, step by step; time logging steps separately."""
    from lightning.pytorch.loggers import TensorBoardLogger

    # the previous size's model and engines (a reference cycle through the diagnosis) must be gone before this
    # model is built, or its parameters land between their remains and every .grad read misses the cache more
    gc.collect()
    torch.manual_seed(0)
    model = ManyTensors(n_tensors)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(2, 4)
    logger = TensorBoardLogger(tmp, name=f"scaling{n_tensors}")

    step_time: dict[str, list[float]] = defaultdict(list)
    inside: dict[str, list[float]] = defaultdict(list)
    paired: dict[str, list[float]] = defaultdict(list)  # variant step minus the unguarded step of the same round
    guards: dict[str, _Guard] = {}
    warmup = 3
    # one setting at a time against the unguarded loop: a second engine on the same model (and the allocations
    # of its norms) would shift the allocator and cache state of the steps around it
    for name, every_step in (("defaults", False), ("every_step", True)):
        guard = guards[name] = _Guard(model, every_step, logger)
        variants: list[tuple[str, Optional[_Guard]]] = [("none", None), (name, guard)]
        gc.collect()
        gc.freeze()  # long-lived objects out of the collector's way: no full collections in the middle of a timing
        for i in range(warmup + steps + log_steps):
            logging = i >= warmup + steps
            order = variants if i % 2 else variants[::-1]  # alternate so that neither always runs first
            times = {}
            for variant, g in order:
                if g is not None:
                    g.log_now = logging
                t = clock()
                spent = _train_step(model, optimizer, x, g)
                times[variant] = clock() - t
                if i >= warmup:
                    key = f"{variant}@log" if logging and g is not None else variant
                    step_time[key].append(times[variant])
                    inside[key].append(spent)
            if i >= warmup:
                paired[f"{name}@log" if logging else name].append(times[name] - times["none"])
        gc.unfreeze()
        guard.engine.end_diagnosis()
    logger.finalize("success")  # its writer thread must be done before the temporary directory goes

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


class WithUnused(nn.Module):
    """:class:`ManyTensors` plus one layer the forward pass never calls: diagnosis has something to explain."""

    def __init__(self, n_tensors: int) -> None:
        super().__init__()
        self.body = ManyTensors(n_tensors - 2)
        self.unused = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _graph_walk(loss: torch.Tensor, model: nn.Module) -> int:
    """The graph walk diagnosis runs after a backward pass that missed parameters; returns parameters reached."""
    try:
        from lightning_gradguard.core.diagnosis.graph import reachable
    except ImportError:  # pragma: no cover - before lightning_gradguard.core.diagnosis.graph existed: a walk of our own
        reachable = None
    index = {id(p): i for i, p in enumerate(model.parameters())}
    if reachable is not None:
        return len(reachable([loss.grad_fn], set(), index))
    seen: set[int] = set()
    stack, found = [loss.grad_fn], 0
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        found += hasattr(node, "variable")
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


def measure_diagnosis(n_tensors: int, steady_steps: int = 5) -> dict[str, Any]:
    """Cost of one diagnosis window (the first steps of a run) on a model with an unused layer.

    ``window_extra_ms``: the window's steps (instruments on the forward pass, graph walks after backward, causes)
    minus as many steady-state guarded steps; ``walk_ms``: one graph walk from the loss over the whole graph.
    """
    gc.collect()  # the earlier measurements' garbage: a full collection inside the window would be timed with it
    torch.manual_seed(0)
    model = WithUnused(n_tensors)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(2, 4)
    for _ in range(2):
        _train_step(model, optimizer, x, None)  # warm caches without a guard
    guard = _Guard(model, every_step=False, logger=None)
    guard.engine._warn = lambda message: None
    diagnosis = getattr(guard.engine, "diagnosis", None)
    window_steps = getattr(diagnosis, "window_steps", 0) if diagnosis is not None else 0
    times = []
    for _ in range(window_steps + steady_steps):
        t = clock()
        _train_step(model, optimizer, x, guard)
        times.append(clock() - t)
    window, steady = times[:window_steps], statistics.median(times[window_steps:])
    cause = guard.engine.report().params.get("unused.weight")
    loss = model(x).square().mean()
    walk = []
    for _ in range(3):
        t = clock()
        reached = _graph_walk(loss, model)
        walk.append(clock() - t)
    return {
        "tensors": n_tensors,
        "window_steps": window_steps,
        "window_extra_ms": (sum(window) - steady * len(window)) * 1e3,
        "steady_step_ms": steady * 1e3,
        "walk_ms": min(walk) * 1e3,
        "reached": reached,
        "cause": cause.cause if cause is not None else None,
    }


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 5000, 10000])
    parser.add_argument("--steps", type=int, default=30, help="timed non-logging steps per variant")
    parser.add_argument("--log-steps", type=int, default=7, help="timed logging steps per guard variant")
    parser.add_argument("--log-every", type=int, default=50, help="logging cadence used for the amortized cost")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: less noise)")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="cpu: this process's CPU time (robust on a shared machine); wall: perf_counter")
    parser.add_argument("--read-cleared", action="store_true",
                        help="snapshot every gradient before backward (plain loops) instead of skipping those the "
                             "Lightning callback knows zero_grad set to None")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    global clock, READ_CLEARED
    READ_CLEARED = args.read_cleared
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, threads={args.threads}, "
          f"clock={args.clock}, snapshot before backward: "
          f"{'every gradient' if READ_CLEARED else 'skips those zero_grad set to None'}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            row = measure_size(n, args.steps, args.log_steps, args.log_every, tmp)
            rows.append(row)
            _print_row(row, args.log_every)
            sys.stdout.flush()
    print("\ndiagnosis (a model with one unused layer): one window = the first steps of a run")
    print(f"  {'tensors':>7} {'window steps':>12} {'window extra':>13} {'step (steady)':>14} {'graph walk':>11}  cause")
    walks = []
    for n in args.sizes:
        w = measure_diagnosis(n)
        walks.append(w)
        print(f"  {w['tensors']:>7} {w['window_steps']:>12} {w['window_extra_ms']:10.1f} ms "
              f"{w['steady_step_ms']:11.1f} ms {w['walk_ms']:8.2f} ms  {w['cause']}")
        sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": args.threads, "clock": args.clock, "sizes": rows,
                       "diagnosis": walks}, f, indent=2)
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
