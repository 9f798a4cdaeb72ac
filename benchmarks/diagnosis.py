"""What the diagnosis window costs: one window on a small GPT-style transformer, and the steps after it.

GradGuard watches the forward pass (forward hooks, a TorchFunctionMode, a graph walk) only during diagnosis
windows: the first optimizer steps of a run and the steps right after a parameter first goes missing. This
script measures, on one model, with the engine driven the way every adapter drives it:

* ``window``: the extra time of one diagnosis window (its steps, minus as many ordinary steps), for a healthy
  model and for one with a planted bug (a detached block, so the graph walk and the cause text really run);
* ``after``: the median step time after the window, against the median step time of the same loop under a guard
  without diagnosis (``engine.bind`` without ``module``), the two alternating step by step, and their ratio:
  instruments are gone, so it is ~1.0.

Self-contained (the model is defined here). Run::

    python benchmarks/diagnosis.py                   # CPU, one thread
    python benchmarks/diagnosis.py --device cuda --layers 6 --width 256
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lightning_gradguard.config import GuardConfig
from lightning_gradguard.core.engine import GradGuardEngine


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.cut = False  # the planted bug: detach this block's output

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        x = x + self.mlp(self.ln2(x))
        return x.detach() if self.cut else x


class TinyGPT(nn.Module):
    """Token and position embeddings, pre-norm blocks, a language-model head tied to the token embedding."""

    def __init__(self, vocab: int, width: int, layers: int, heads: int, context: int) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.lm_head.weight = self.tokens.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        mask = torch.triu(torch.full((t, t), float("-inf"), device=idx.device), diagonal=1)
        x = self.tokens(idx) + self.positions(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x, mask)
        return self.lm_head(self.ln_f(x))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_steps(model, optimizer, engine: Optional[GradGuardEngine], batches, device, first_step: int) -> list[float]:
    """One timed training step per batch: forward, backward, the engine's calls, optimizer step."""
    times = []
    for n, (x, y) in enumerate(batches):
        _sync(device)
        start = time.perf_counter()
        if engine is not None:
            engine.start_micro_batch()
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        if engine is not None:
            engine.before_backward(loss)
        loss.backward()
        if engine is not None:
            engine.after_backward()
            engine.check_step(optimizer, first_step + n)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def measure(args: argparse.Namespace, planted_bug: bool) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = TinyGPT(args.vocab, args.width, args.layers, args.heads, args.context).to(device)
    if planted_bug:
        model.blocks[0].cut = True
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)

    def batches(n: int):
        data = torch.randint(0, args.vocab, (n, args.batch, args.context + 1), generator=g)
        return [(d[:, :-1].to(device), d[:, 1:].to(device)) for d in data]

    quiet = dict(warn=lambda message: None)
    run_steps(model, optimizer, None, batches(args.warmup), device, 0)  # allocator, kernels, caches

    plain = GradGuardEngine(GuardConfig(), **quiet)  # the same guard without diagnosis: no module bound
    plain.bind(model.named_parameters())
    guard = GradGuardEngine(GuardConfig(), **quiet)
    window_extra, window_times, plain_steps = [], [], 0
    guard_steps = 0
    for repeat in range(args.windows):
        # a window's steps against as many ordinary steps right before them (the load of a shared machine drifts)
        before = run_steps(model, optimizer, plain, batches(2), device, plain_steps)
        plain_steps += 2
        start = time.perf_counter()
        if repeat == 0:
            guard.bind(model.named_parameters(), module=model)  # opens the first window: instruments go in
        else:
            guard.start_run()  # a new run: its first window again
        arm_s = time.perf_counter() - start
        window_steps = guard.diagnosis.window_steps
        window = run_steps(model, optimizer, guard, batches(window_steps), device, guard_steps)
        guard_steps += window_steps
        assert not guard.diagnosis.instruments.armed, "the window should have closed"
        window_extra.append(arm_s + sum(window) - window_steps * statistics.mean(before))
        window_times.append(arm_s + sum(window))
    # after the window no instrument is left, so the two guards can alternate step by step
    after, plain_again = [], []
    for batch in batches(args.steps):
        after += run_steps(model, optimizer, guard, [batch], device, guard_steps)
        plain_again += run_steps(model, optimizer, plain, [batch], device, plain_steps)
        guard_steps += 1
        plain_steps += 1
    guard.end_diagnosis()

    baseline = statistics.median(plain_again)
    report = guard.report()
    return {
        "planted_bug": planted_bug,
        "missing": len(report.missing),
        "causes": sorted({p.cause for p in report.params.values() if p.missing}, key=str),
        "window_steps": window_steps,
        "windows_measured": args.windows,
        "window_extra_s_median": statistics.median(window_extra),
        "window_extra_s_max": max(window_extra),
        "window_total_s_max": max(window_times),
        "median_step_ms_without_diagnosis": baseline * 1e3,
        "median_step_ms_after_window": statistics.median(after) * 1e3,
        "after_over_without": statistics.median(after) / baseline,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on the CPU")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--context", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=25, help="timed steps per guard after the windows")
    parser.add_argument("--windows", type=int, default=5, help="diagnosis windows measured")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    results = [measure(args, planted_bug=False), measure(args, planted_bug=True)]
    if args.json:
        print(json.dumps({"config": vars(args), "results": results}, indent=2))
        return
    model = TinyGPT(args.vocab, args.width, args.layers, args.heads, args.context)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"TinyGPT: {args.layers} layers, width {args.width}, {n_params / 1e6:.2f}M parameters, batch {args.batch}x"
        f"{args.context}, device {args.device}, {args.threads} thread(s)"
    )
    for r in results:
        label = "planted bug (block 0 detached)" if r["planted_bug"] else "healthy model"
        print(f"\n{label}: {r['missing']} parameters missing, causes {r['causes']}")
        print(f"  one diagnosis window ({r['window_steps']} steps): {r['window_extra_s_median'] * 1e3:.1f} ms extra "
              f"(median of {r['windows_measured']}; worst {r['window_extra_s_max'] * 1e3:.1f} ms; a whole window, "
              f"steps included, at most {r['window_total_s_max'] * 1e3:.0f} ms)")
        print(f"  median step without diagnosis: {r['median_step_ms_without_diagnosis']:.2f} ms")
        print(f"  median step after the window:  {r['median_step_ms_after_window']:.2f} ms "
              f"(ratio {r['after_over_without']:.3f})")


if __name__ == "__main__":
    main()
