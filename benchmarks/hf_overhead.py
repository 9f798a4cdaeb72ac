"""What ``GradGuardCallback()`` costs a step of the Hugging Face Trainer: a GPT-2 with and without it.

The model is transformers' ``GPT2LMHeadModel`` at the size of ``overhead.py --preset cpu`` (4 layers, width 128,
4 heads, vocabulary 2048, sequence 128, batch 8; 52 parameter tensors, 1.1M parameters), trained by the real
``Trainer`` (AdamW, gradient clipping at 1.0, ``logging_steps=10``, ``report_to=["tensorboard"]``) on random tokens.
The two variants take turns in blocks of ``--steps`` optimizer steps (a ``Trainer`` each, continuing the same
model); a timing callback placed after GradGuard's measures each step from ``on_step_begin`` to ``on_step_end``
(forward, backward, clipping, the optimizer step, every callback's step events, GradGuard's publishing of its
metrics included). The first ``--warmup`` steps of every block are left out: the optimizer's state is created there,
and GradGuard's diagnosis window watches the first two steps of every ``train()`` (measured by ``diagnosis.py``).
Prints the median step of each variant and their ratio.

Usage::

    python benchmarks/hf_overhead.py                          # 2-core CPU: about 1.5 minutes
    python benchmarks/hf_overhead.py --smoke --json hf.json   # a tiny model, a few steps: checks the script runs

"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any, Callable, Optional

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is built from its config: nothing to download

from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from lightning_gradguard.hf import GradGuardCallback  # noqa: E402

# (vocabulary, sequence, layers, heads, width, batch)
SIZES = {"cpu": (2048, 128, 4, 4, 128, 8), "smoke": (64, 16, 1, 2, 16, 2)}


class StepTimer(TrainerCallback):
    """Times every optimizer step from ``on_step_begin`` to ``on_step_end`` with ``clock``."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._start = self.clock()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.times.append(self.clock() - self._start)


def _block(model: torch.nn.Module, data: list, batch: int, out: str, steps: int, guarded: bool,
           clock: Callable[[], float]) -> list[float]:
    timer = StepTimer(clock)  # after GradGuard's callback: its on_step_end is inside the timed step
    callbacks = [GradGuardCallback(summary=False), timer] if guarded else [timer]
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=batch, max_steps=steps, logging_steps=10,
                             report_to=["tensorboard"], use_cpu=True, save_strategy="no", disable_tqdm=True,
                             learning_rate=1e-4, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks).train()
    return timer.times


def run(size: str, blocks: int, steps: int, warmup: int, clock_name: str) -> dict[str, Any]:
    vocab, seq, layers, heads, width, batch = SIZES[size]
    torch.manual_seed(0)
    torch.set_num_threads(1)
    config = GPT2Config(vocab_size=vocab, n_positions=seq, n_layer=layers, n_head=heads, n_embd=width,
                        bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(batch * (steps + warmup)):
        ids = torch.randint(0, vocab, (seq,), generator=g)
        data.append({"input_ids": ids, "labels": ids})
    clock = time.process_time if clock_name == "cpu" else time.perf_counter
    times: dict[str, list[float]] = {"no callback": [], "GradGuardCallback()": []}
    with tempfile.TemporaryDirectory() as tmp:
        for block in range(blocks):
            for name, guarded in (("no callback", False), ("GradGuardCallback()", True)):
                out = os.path.join(tmp, f"{block}-{guarded}")
                times[name] += _block(model, data, batch, out, steps + warmup, guarded, clock)[warmup:]
    medians = {name: statistics.median(values) * 1e3 for name, values in times.items()}
    return {
        "size": size,
        "clock": clock_name,
        "tensors": sum(1 for _ in model.parameters()),
        "params": sum(p.numel() for p in model.parameters()),
        "steps": {name: len(values) for name, values in times.items()},
        "median_ms": medians,
        "ratio": medians["GradGuardCallback()"] / medians["no callback"],
    }


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny model and a few steps")
    parser.add_argument("--blocks", type=int, default=None, help="turns of each variant (default 4; smoke 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per turn (default 30; smoke 2)")
    parser.add_argument("--warmup", type=int, default=3, help="steps left out at the start of every turn")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu", help="process CPU time or wall time")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    blocks = args.blocks or (1 if args.smoke else 4)
    steps = args.steps or (2 if args.smoke else 30)
    result = run("smoke" if args.smoke else "cpu", blocks, steps, args.warmup, args.clock)
    print(
        f"GPT2LMHeadModel ({result['tensors']} tensors, {result['params']:,} parameters) under the Hugging Face "
        f"Trainer, {result['clock']} time, median of {result['steps']['no callback']} steps each:"
    )
    for name, value in result["median_ms"].items():
        print(f"  {name:<22} {value:8.2f} ms")
    print(f"  ratio                  {result['ratio']:8.3f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
