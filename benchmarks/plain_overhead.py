"""What ``watch(model, optimizer)`` costs a hand-written training loop, as the number of parameter tensors grows.

The plain-loop adapter cannot be told when a backward pass starts, so it puts one gradient hook on every trainable
parameter (the first to fire in a backward pass takes the snapshot; the others return at once) and reads the
arrivals from an autograd end-of-backward callback. That per-parameter hook is the price of an exact bracket in a
loop GradGuard does not drive, and it is what this script measures next to the engine's own work.

The loop is the PyTorch tutorial's (forward, ``zero_grad``, backward, step) on a chain of tiny ``Linear`` layers
(the model of ``scaling.py``), with and without ``watch()``, in alternating blocks of steps (hooks cannot be put on
and taken off between single steps without distorting them). Prints the median step of each and the difference.

Usage::

    python benchmarks/plain_overhead.py                     # 100, 1000, 10000 tensors: about 1.5 minutes
    python benchmarks/plain_overhead.py --sizes 100 --blocks 2 --steps 3 --json plain.json

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

from lightning_gradguard import watch

try:
    from scaling import ManyTensors  # run as a script from benchmarks/
except ImportError:  # pragma: no cover - imported as benchmarks.plain_overhead
    from benchmarks.scaling import ManyTensors


def _block(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        loss = model(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - t)
    return times


def measure(n_tensors: int, blocks: int, steps: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = ManyTensors(n_tensors)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(2, 4)
    _block(model, optimizer, x, 3)
    plain: list[float] = []
    guarded: list[float] = []
    gc.collect()
    gc.freeze()
    for b in range(blocks):
        order = ("plain", "watch") if b % 2 == 0 else ("watch", "plain")
        for variant in order:
            if variant == "plain":
                plain.extend(_block(model, optimizer, x, steps))
                continue
            guard = watch(model, optimizer, summary=False)
            _block(model, optimizer, x, 3)  # its diagnosis window (the first two steps) is not the steady state
            guarded.extend(_block(model, optimizer, x, steps))
            guard.close()
    gc.unfreeze()
    base, with_guard = statistics.median(plain), statistics.median(guarded)
    return {
        "tensors": sum(1 for _ in model.parameters()),
        "step_ms": base * 1e3,
        "watch_step_ms": with_guard * 1e3,
        "diff_ms": (with_guard - base) * 1e3,
        "diff_us_per_tensor": (with_guard - base) * 1e6 / n_tensors,
        "ratio": with_guard / base,
    }


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--blocks", type=int, default=6, help="blocks per variant, alternating")
    parser.add_argument("--steps", type=int, default=15, help="timed steps per block")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads={args.threads}, wall clock, {args.blocks} blocks x {args.steps} steps")
    print(f"  {'tensors':>7} {'step':>10} {'with watch':>11} {'difference':>11} {'per tensor':>11} {'ratio':>7}")
    rows = []
    for n in args.sizes:
        row = measure(n, args.blocks, args.steps)
        rows.append(row)
        print(f"  {row['tensors']:>7} {row['step_ms']:7.2f} ms {row['watch_step_ms']:8.2f} ms "
              f"{row['diff_ms']:8.2f} ms {row['diff_us_per_tensor']:8.2f} us {row['ratio']:7.3f}")
        sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": args.threads, "sizes": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
