"""What the check for weights that never move costs per step: its two calls, timed alone, at 16 to 10,000 tensors.

The check runs at every optimizer step: the step check hands it the step (:meth:`UpdateWatch.before_step`) and a
step post-hook counts the step once ``optimizer.step()`` returned (:meth:`UpdateWatch.stepped`). On most steps that
is a few dictionary operations and one read of each param group's learning rate; on the first two steps of each
optimizer and on every 50th it also reads every parameter's version counter before and after the step.

This script drives the engine's own ``UpdateWatch`` around steps of a real optimizer holding ``--sizes`` parameter
tensors in two param groups (one at ``lr=0``, so that the learning-rate count is taken too), and times the two
calls by themselves with this process's CPU time (or wall time, ``--clock wall``): the median of the ordinary steps,
the median of the observed ones, and the cost amortized over 50 steps. Ordinary steps are timed twice: with warm
caches (nothing between the two calls), and right after every parameter was written between them, as a real step
does; the second figure holds the cache misses that any code pays first after a step over many tensors, which the
script shows alone (one ``dict.pop`` timed at the same point). Observed steps always write the parameters between
the calls (outside the timed region), so that their comparison does its full work.

Usage::

    python benchmarks/never_moved.py                         # 16, 1,000, 10,000 tensors: about 20 s
    python benchmarks/never_moved.py --sizes 16 --steps 100  # smoke run

"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Optional

import torch
from torch import nn


def measure(size: int, steps: int, clock) -> dict[str, float]:
    from lightning_gradguard.config import GuardConfig
    from lightning_gradguard.core.engine import GradGuardEngine
    from lightning_gradguard.core.observer import StepCheck
    from lightning_gradguard.core.updates import FIRST_OBSERVED, OBSERVE_GAP

    params = [nn.Parameter(torch.zeros(4)) for _ in range(size)]
    for p in params:
        p.grad = torch.ones(4)
    half = max(1, size // 2)
    optimizer = torch.optim.SGD([{"params": params[:half]}, {"params": params[half:], "lr": 0.0}], lr=0.1)
    engine = GradGuardEngine(GuardConfig(summary=False))
    engine.bind((f"p{i}", p) for i, p in enumerate(params))
    engine.start_run()
    indices, tensors = engine.registry.optimizer_params(optimizer)
    watch = engine.updates
    times: dict[str, list[float]] = {"warm": [], "after_step": [], "observed": [], "dict_pop_after_step": []}
    for step in range(2 * steps):
        check = StepCheck(step, 1, 1, None, indices, [], [])
        engine.state.add_uniform(indices, steps=1)  # what the step check counts first
        start = clock()
        watch.before_step(optimizer, check, indices, tensors)
        middle = clock()
        # the first pass writes nothing between the calls (warm caches), except at the observed steps, which need
        # version counters that moved; the second pass writes every parameter, as a step does
        observed = step < FIRST_OBSERVED or step % OBSERVE_GAP == 0
        if observed or step >= steps:
            with torch.no_grad():
                torch._foreach_add_(tensors, 0.0)
            mark = clock()
            {}.pop(step, None)  # what any code pays first after such a step (caches refilled)
            times["dict_pop_after_step"].append(clock() - mark)
        again = clock()
        watch.stepped(optimizer)
        end = clock()
        cost = (middle - start) + (end - again)
        times["observed" if observed else "after_step" if step >= steps else "warm"].append(cost)
    watch.close()
    us = {name: statistics.median(values) * 1e6 for name, values in times.items()}
    return {"tensors": size, "ordinary_warm_us": us["warm"], "ordinary_after_step_us": us["after_step"],
            "observed_us": us["observed"], "dict_pop_after_step_us": us["dict_pop_after_step"],
            "amortized_us": ((OBSERVE_GAP - 1) * us["after_step"] + us["observed"]) / OBSERVE_GAP, "steps": steps}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 1000, 10000])
    parser.add_argument("--steps", type=int, default=1000, help="steps per size and pass (every 50th is observed)")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    rows = [measure(size, args.steps, clock) for size in args.sizes]
    print("tensors   ordinary step (warm / right after a step)   observed step   amortized over 50   "
          "(a dict pop right after a step)")
    for row in rows:
        print(f"{row['tensors']:>7}   {row['ordinary_warm_us']:12.1f} us / {row['ordinary_after_step_us']:8.1f} us"
              f"   {row['observed_us']:10.1f} us   {row['amortized_us']:14.1f} us   "
              f"({row['dict_pop_after_step_us']:.1f} us)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"clock": args.clock, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
