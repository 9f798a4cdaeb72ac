"""What GradGuard adds to every step of a small model: the fixed cost, with default settings.

Small models are where people debug, and reinforcement learning, tabular and research code trains them for real, so
the guard's per-step cost must not depend on the model being big enough to hide it. Two loops, each timed with and
without the guard, interleaved in one process:

* ``trainer``: a 16-tensor MLP (8 ``Linear(32, 32)`` layers) under the Lightning ``Trainer``: short fits, one
  without and one with ``GradGuard()`` in turn, ``--rounds`` times. The guarded fit pays everything a user pays:
  Lightning calling one more callback's hooks, the step check, non-finite counting at every step.
* ``watch``: a character-level language model (embedding, 2-layer LSTM, linear head) in a hand-written loop:
  blocks of steps with ``watch(model, optimizer)`` and blocks without, in turn.

A step is the interval between consecutive step starts, in this process's CPU time (``--clock cpu``: other processes
on a shared machine weigh less) or wall time. The first ``--warmup`` steps of every fit or block are left out: they
hold the diagnosis window (the first two steps of a run) and, in a plain loop, the first window's per-parameter
gradient hooks. Prints the median step of each variant, the difference in microseconds, and the ratio.

Usage::

    python benchmarks/fixed_cost.py                       # about 1 minute on 2 cores
    python benchmarks/fixed_cost.py --rounds 2 --steps 20 # smoke run

"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import statistics
import sys
import time
import warnings
from typing import Any, Callable, Optional

import torch
from torch import nn

LOOPS = ("trainer", "watch")


# ---------------------------------------------------------------------------------------------- the Trainer loop
def trainer_loop(rounds: int, steps: int, warmup: int, clock: Callable[[], float]) -> dict[str, list[float]]:
    import lightning.pytorch as pl
    from lightning.pytorch import Callback, Trainer

    from lightning_gradguard import GradGuard

    class MLP(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(*(layer for _ in range(8) for layer in (nn.Linear(32, 32), nn.ReLU())))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    class StepClock(Callback):
        def __init__(self) -> None:
            self.marks: list[float] = []

        def on_train_batch_start(self, *args: Any) -> None:
            self.marks.append(clock())

    generator = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(steps * 16, 32, generator=generator),
                                          torch.randn(steps * 16, 32, generator=generator))
    loader = torch.utils.data.DataLoader(data, batch_size=16)
    times: dict[str, list[float]] = {"without": [], "with": []}
    for _ in range(rounds):
        for variant in ("without", "with"):
            torch.manual_seed(0)
            step_clock = StepClock()
            callbacks: list[Any] = [step_clock] + ([GradGuard(summary=False)] if variant == "with" else [])
            trainer = Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                              enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
            trainer.fit(MLP(), loader)
            marks = step_clock.marks[warmup:]
            times[variant] += [b - a for a, b in zip(marks, marks[1:])]
            del trainer
            gc.collect()
    return times


# ---------------------------------------------------------------------------------------------- the plain loop
class CharLM(nn.Module):
    """A character-level language model: embedding, 2-layer LSTM, linear head (11 parameter tensors)."""

    def __init__(self, vocab: int = 64, embed: int = 32, hidden: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(tokens))
        return self.head(out)


def watch_loop(rounds: int, steps: int, warmup: int, clock: Callable[[], float]) -> dict[str, list[float]]:
    from lightning_gradguard import watch

    torch.manual_seed(0)
    model = CharLM()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, 64, (steps, 8, 33))
    times: dict[str, list[float]] = {"without": [], "with": []}

    def block(variant: str) -> None:
        guard = watch(model, optimizer, summary=False) if variant == "with" else None
        marks = []
        for batch in tokens:
            marks.append(clock())
            logits = model(batch[:, :-1])
            loss = nn.functional.cross_entropy(logits.reshape(-1, 64), batch[:, 1:].reshape(-1))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        marks.append(clock())
        if guard is not None:
            guard.close()
        marks = marks[warmup:]
        times[variant].extend(b - a for a, b in zip(marks, marks[1:]))

    for _ in range(rounds):
        for variant in ("without", "with"):
            block(variant)
    return times


# ---------------------------------------------------------------------------------------------- report
def summarize(times: dict[str, list[float]]) -> dict[str, float]:
    without = statistics.median(times["without"]) * 1e6
    guarded = statistics.median(times["with"]) * 1e6
    return {"without_us": without, "with_us": guarded, "extra_us": guarded - without, "ratio": guarded / without,
            "steps_each": min(len(times["without"]), len(times["with"]))}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loops", nargs="+", choices=LOOPS, default=list(LOOPS))
    parser.add_argument("--rounds", type=int, default=8, help="fits (trainer) or blocks (watch) per variant")
    parser.add_argument("--steps", type=int, default=120, help="steps per fit or block")
    parser.add_argument("--warmup", type=int, default=10, help="steps left out at the start of each fit or block")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    print(f"torch {torch.__version__}, threads={args.threads}, {args.clock} clock, {args.rounds} rounds x "
          f"{args.steps} steps (first {args.warmup} of each left out)")
    results = {}
    for loop in args.loops:
        run = trainer_loop if loop == "trainer" else watch_loop
        results[loop] = summary = summarize(run(args.rounds, args.steps, args.warmup, clock))
        print(f"{loop:8s} without {summary['without_us']:8.1f} us   with GradGuard {summary['with_us']:8.1f} us   "
              f"extra {summary['extra_us']:+7.1f} us per step   ratio {summary['ratio']:.3f}x   "
              f"({summary['steps_each']} steps each)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"torch": torch.__version__, "clock": args.clock, "loops": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
