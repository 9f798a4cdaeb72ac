"""What ``watch()`` costs a loop that steps its optimizers from inside the backward pass.

PyTorch's "optimizer step in backward" recipe keeps one optimizer per parameter and steps (and zeroes) it from a
``register_post_accumulate_grad_hook``, so that each gradient is freed as soon as it is applied. Every one of those
steps is checked, so the guard's per-check cost is paid once per parameter tensor and step: this script measures it.

The model is a stack of ``Linear(64, 64)`` layers (two tensors each) with one Adam per tensor; blocks of steps with
``watch()`` and blocks without alternate in one process (wall clock). Prints the median step of each, the
difference, the difference per check, and the ratio.

Usage::

    python benchmarks/optimizer_in_backward.py                  # 20 and 100 layers: about 30 s
    python benchmarks/optimizer_in_backward.py --layers 4 --blocks 2 --steps 3 --json inbackward.json

"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from typing import Any, Optional

import torch
from torch import nn

from lightning_gradguard import watch


def _model(layers: int) -> tuple[nn.Module, list[torch.optim.Optimizer]]:
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(64, 64) for _ in range(layers)))
    optimizers = {param: torch.optim.Adam([param], lr=1e-4) for param in model.parameters()}

    def step_now(param: torch.Tensor) -> None:
        optimizers[param].step()
        optimizers[param].zero_grad()

    for param in model.parameters():
        param.register_post_accumulate_grad_hook(step_now)
    return model, list(optimizers.values())


def _block(model: nn.Module, x: torch.Tensor, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        model(x).square().mean().backward()  # every optimizer steps inside this call
        times.append(time.perf_counter() - t)
    return times


def measure(layers: int, blocks: int, steps: int) -> dict[str, Any]:
    model, optimizers = _model(layers)
    x = torch.randn(32, 64)
    _block(model, x, 3)
    plain: list[float] = []
    guarded: list[float] = []
    gc.collect()
    gc.freeze()
    for b in range(blocks):
        for variant in ("plain", "watch") if b % 2 == 0 else ("watch", "plain"):
            if variant == "plain":
                plain.extend(_block(model, x, steps))
                continue
            guard = watch(model, optimizers, summary=False)
            _block(model, x, 3)  # its diagnosis window (the first two steps) is not the steady state
            guarded.extend(_block(model, x, steps))
            guard.close()
    gc.unfreeze()
    base, with_guard = statistics.median(plain), statistics.median(guarded)
    return {
        "tensors": len(optimizers),
        "optimizers": len(optimizers),
        "step_ms": base * 1e3,
        "watch_step_ms": with_guard * 1e3,
        "diff_ms": (with_guard - base) * 1e3,
        "us_per_check": (with_guard - base) * 1e6 / len(optimizers),
        "ratio": with_guard / base,
    }


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[20, 100])
    parser.add_argument("--blocks", type=int, default=6, help="blocks per variant, alternating")
    parser.add_argument("--steps", type=int, default=15, help="timed steps per block")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads={args.threads}, wall clock, {args.blocks} blocks x {args.steps} steps")
    print(f"  {'optimizers':>10} {'step':>10} {'with watch':>11} {'difference':>11} {'per check':>10} {'ratio':>7}")
    rows = []
    for layers in args.layers:
        row = measure(layers, args.blocks, args.steps)
        rows.append(row)
        print(f"  {row['optimizers']:>10} {row['step_ms']:7.2f} ms {row['watch_step_ms']:8.2f} ms "
              f"{row['diff_ms']:8.2f} ms {row['us_per_check']:7.1f} us {row['ratio']:7.3f}")
        sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": args.threads, "sizes": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
