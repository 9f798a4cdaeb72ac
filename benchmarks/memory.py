"""What GradGuard keeps as a run goes on: the Python memory its own code allocated after a warm-up and still holds.

Nothing the guard keeps may grow with the number of steps. ``tracemalloc`` starts a few steps before the end of
``--warmup`` steps (the diagnosis window, the first logging steps, every cache filled once); at the end of the
warm-up and again after the measured steps, the allocations still alive are summed over the frames of GradGuard's
own files, and the difference is what the guard kept from the measured steps. (Both sums hold the current step's
gradients' Python objects, which the guard's first read of ``.grad`` creates, so they cancel out.) Lightning's,
TensorBoard's and torch's own allocations are not counted; tensor storage is not traced at all, and the guard's
device tensors are bounded by construction: one counter vector per counter and device, one ring buffer per measured
parameter list.

Two loops, each with a TensorBoard log written every 10 steps (so the staged logging copies are exercised):

* ``trainer``: a ``LightningModule`` under the ``Trainer`` with ``GradGuard()``;
* ``watch``: a hand-written loop with ``watch(model, optimizer, log_dir=...)``.

The model holds ``--tensors`` parameter tensors (small vectors, combined by one ``torch.stack``) so that even 10,000
tensors make a quick step.

Usage::

    python benchmarks/memory.py                                   # 200 tensors x 2,000 steps, 10,000 x 300
    python benchmarks/memory.py --sizes 200:100 --warmup 20       # smoke run

"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import tempfile
import tracemalloc
import warnings
from typing import Any, Callable, Optional

import torch
from torch import nn

OWN = "*lightning_gradguard*"


class ManyTensors(nn.Module):
    """``tensors`` parameter vectors that every forward pass uses once."""

    def __init__(self, tensors: int) -> None:
        super().__init__()
        self.vectors = nn.ParameterList(nn.Parameter(torch.randn(2)) for _ in range(tensors))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.stack(list(self.vectors)).square().mean()


LEAD_IN = 3  # steps traced before the baseline, so that the objects alive at it were allocated under tracing


class Meter:
    """:meth:`trace` a few steps before the warm-up ends, :meth:`baseline` at its end, :meth:`stop` after the measured
    steps: returns the growth of the memory GradGuard's own frames hold."""

    def __init__(self) -> None:
        self.base = 0

    def trace(self) -> None:
        tracemalloc.start(1)

    def baseline(self) -> None:
        self.base = _held()

    def stop(self) -> int:
        grown = _held() - self.base
        tracemalloc.stop()
        return grown


def _held() -> int:
    gc.collect()
    snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, OWN)])
    return sum(stat.size for stat in snapshot.statistics("filename"))


def trainer_growth(tensors: int, steps: int, warmup: int, log_dir: str) -> int:
    import lightning.pytorch as pl
    from lightning.pytorch import Callback, Trainer
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_gradguard import GradGuard

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = ManyTensors(tensors)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.net(batch[0]).sum()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    meter = Meter()
    result: dict[str, int] = {}

    class Measure(Callback):  # at the end of a batch: after the step, as in the plain loop below
        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            if batch_idx == warmup - LEAD_IN:
                meter.trace()
            elif batch_idx == warmup:
                meter.baseline()
            elif batch_idx == warmup + steps:
                result["bytes"] = meter.stop()

    data = torch.utils.data.TensorDataset(torch.randn(warmup + steps + 1, 2))
    trainer = Trainer(accelerator="cpu", max_epochs=1, logger=TensorBoardLogger(log_dir), log_every_n_steps=10,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[GradGuard(summary=False), Measure()])
    trainer.fit(Module(), torch.utils.data.DataLoader(data, batch_size=1))
    return result["bytes"]


def watch_growth(tensors: int, steps: int, warmup: int, log_dir: str) -> int:
    from lightning_gradguard import watch

    model = ManyTensors(tensors)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    guard = watch(model, optimizer, log_dir=log_dir, log_every_n_steps=10, summary=False)
    meter = Meter()
    x = torch.randn(2)
    for step in range(warmup + steps + 1):
        loss = model(x).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == warmup - LEAD_IN:
            meter.trace()
        elif step == warmup:
            meter.baseline()
    grown = meter.stop()
    guard.close()
    return grown


LOOPS: dict[str, Callable[[int, int, int, str], int]] = {"trainer": trainer_growth, "watch": watch_growth}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["200:2000", "10000:300"], help="TENSORS:STEPS pairs")
    parser.add_argument("--warmup", type=int, default=200, help="steps before the baseline")
    parser.add_argument("--loops", nargs="+", choices=list(LOOPS), default=list(LOOPS))
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    rows = []
    for size in args.sizes:
        tensors, steps = (int(part) for part in size.split(":"))
        for loop in args.loops:
            with tempfile.TemporaryDirectory() as log_dir:
                grown = LOOPS[loop](tensors, steps, args.warmup, log_dir)
            rows.append({"loop": loop, "tensors": tensors, "steps": steps, "bytes": grown})
            print(f"{loop:8s} {tensors:6d} tensors, {steps:5d} steps after {args.warmup} of warm-up: GradGuard holds "
                  f"{grown / 1024:8.1f} KiB more ({grown / steps:7.1f} bytes per step)")
            gc.collect()
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"torch": torch.__version__, "warmup": args.warmup, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
