"""Feature checks that need a GPU: 16-mixed with a planted overflow, fused Adam under 16-mixed, Lightning's
FSDPStrategy with a planted unused parameter, and a ``torch.compile``d model.

Run through ``benchmarks/gpu_features.sh`` on a CUDA machine (about a minute on an H100). ``--device cpu`` runs
the same checks where the CPU can (the real GradScaler path through ``MixedPrecision("16-mixed", "cpu")``, CPU
fused Adam, the ``aot_eager`` compile backend; FSDP is skipped: Lightning's FSDPStrategy needs a GPU), which is how
the script itself is tested. Prints a Markdown table and, with ``--json PATH``, writes every figure as JSON.
Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
from typing import Any, Callable

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import GradGuard
from lightning_gradguard.core.registry import clean_name

IN_DIM, HIDDEN = 32, 64
INIT_SCALE = 1024.0


# ---------------------------------------------------------------------- instruments
class RecordingLogger(Logger):
    """Keeps every ``log_metrics`` call (a real Lightning logger, in memory)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    @property
    def experiment(self) -> None:
        return None

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.append((step, dict(metrics)))

    def norms(self) -> list[dict[str, float]]:
        prefix = "gradguard/norm/"
        return [{k[len(prefix):]: v for k, v in m.items() if k.startswith(prefix)} for _, m in self.rows]

    def series(self, tag: str) -> list[float]:
        return [m[tag] for _, m in self.rows if tag in m]


class UnscaledNorms(Callback):
    """Reference norms at the step, unscaled with the scaler's public API where the optimizer unscales itself."""

    def __init__(self) -> None:
        self.norms: list[dict[str, float]] = []
        self.raw_over_logged: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        divide = scaler.get_scale() if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling",
                                                                        False) else 1.0
        names = {id(p): clean_name(n) for n, p in pl_module.named_parameters()}  # FSDP adds wrapper names
        self.norms.append({
            names[id(p)]: float(p.grad.double().norm()) / divide
            for group in optimizer.param_groups for p in group["params"] if p.grad is not None
        })


def max_relative_error(logged: list[dict[str, float]], reference: list[dict[str, float]]) -> float:
    """The largest relative difference over every finite norm; Inf where the two disagree on what exists."""
    if len(logged) != len(reference):
        return math.inf
    worst = 0.0
    for got, want in zip(logged, reference):
        if set(got) != set(want):
            return math.inf
        for name, value in want.items():
            if math.isfinite(value):
                worst = max(worst, abs(got[name] - value) / max(abs(value), 1e-12))
            elif math.isfinite(got[name]):
                return math.inf
    return worst


# ---------------------------------------------------------------------- models
def loader(n_batches: int, batch_size: int = 16, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_batches * batch_size, IN_DIM, generator=g)
    y = torch.randn(n_batches * batch_size, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


class MLP(LightningModule):
    """Three layers; ``unused`` is registered and optimized but never called; the loss overflows on
    ``overflow_batches`` (multiplied by 1e38, so the scaled loss is Inf)."""

    def __init__(self, overflow_batches=(), fused: bool = False, unused: bool = False) -> None:
        super().__init__()
        self.overflow_batches, self.fused = frozenset(overflow_batches), fused
        self.l1 = nn.Linear(IN_DIM, HIDDEN)
        self.l2 = nn.Linear(HIDDEN, HIDDEN)
        self.l3 = nn.Linear(HIDDEN, 1)
        if unused:
            self.unused = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x):
        return self.l3(torch.tanh(self.l2(torch.tanh(self.l1(x)))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self(x), y)
        if batch_idx in self.overflow_batches:
            loss = loss * 1e38
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3, fused=self.fused)


class PlainMLP(MLP):
    """No Python branch on ``batch_idx`` (a compiled training_step would specialize on it)."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)


def trainer(device: str, callbacks, logger=None, **kwargs) -> Trainer:
    options = dict(
        accelerator=device,
        devices=1,
        max_epochs=1,
        logger=logger or False,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    options.update(kwargs)
    return Trainer(**options)


def amp_precision(device: str) -> dict[str, Any]:
    scaler = torch.amp.GradScaler(device, init_scale=INIT_SCALE)
    from lightning.pytorch.plugins.precision import MixedPrecision

    return {"plugins": [MixedPrecision("16-mixed", device, scaler=scaler)]}


# ---------------------------------------------------------------------- the checks
_AMP_NORMS: dict[bool, list[dict[str, float]]] = {}  # logged norms of the 16-mixed runs, by `fused`


def check_amp_overflow(device: str, fused: bool = False) -> dict[str, Any]:
    """16-mixed with an overflow planted at batch 2: one skipped step, unscaled norms, nothing missing."""
    torch.manual_seed(0)
    guard, logger, reference = GradGuard(strict=True, summary=False), RecordingLogger(), UnscaledNorms()
    t = trainer(device, [guard, reference], logger, **amp_precision(device))
    t.fit(MLP(overflow_batches={2}, fused=fused), loader(6))
    report = guard.report()
    error = max_relative_error(logger.norms(), reference.norms)
    result = {
        "amp_skipped_steps": report.amp_skipped_steps,
        "logged_amp_skipped_steps": logger.series("gradguard/amp_skipped_steps")[-1:],
        "missing": report.missing,
        "nonfinite_params_at_each_step": logger.series("gradguard/nonfinite_params"),
        "scale_after": t.precision_plugin.scaler.get_scale(),
        "max_relative_norm_error": error,
        "norms": logger.norms(),
    }
    _AMP_NORMS[fused] = result["norms"]
    result["passed"] = (
        report.amp_skipped_steps == 1 and not report.missing and error < 1e-3
        and result["scale_after"] == INIT_SCALE / 2 and result["nonfinite_params_at_each_step"][2] > 0
    )
    return result


def check_fused_adam(device: str) -> dict[str, Any]:
    """Fused Adam under 16-mixed: Lightning does not unscale before the hook; the logged norms must be unscaled."""
    fused = check_amp_overflow(device, fused=True)
    if False not in _AMP_NORMS:  # the non-fused run of the first check, unless it was skipped
        check_amp_overflow(device, fused=False)
    agreement = max_relative_error(fused.pop("norms"), _AMP_NORMS[False])
    fused["max_relative_difference_to_non_fused_run"] = agreement
    fused["passed"] = fused["passed"] and agreement < 1e-2
    return fused


def check_fsdp(device: str) -> dict[str, Any]:
    """Lightning's FSDPStrategy (one GPU, every Linear its own FSDP unit) with a planted unused layer."""
    if device != "cuda":
        return {"skipped": "Lightning's FSDPStrategy needs a GPU", "passed": None}
    from lightning.pytorch.strategies import FSDPStrategy

    torch.manual_seed(0)
    guard, logger, reference = GradGuard(summary=False), RecordingLogger(), UnscaledNorms()
    strategy = FSDPStrategy(auto_wrap_policy={nn.Linear})
    t = trainer(device, [guard, reference], logger, strategy=strategy)
    t.fit(MLP(unused=True), loader(4))
    report = guard.report()
    error = max_relative_error(logger.norms(), reference.norms)
    result = {
        "missing": report.missing,
        "none_steps": {name: report.params[name].none_steps for name in report.missing},
        "strategy": (report.distributed.strategy if report.distributed else None),
        "unchecked": (report.distributed.unchecked if report.distributed else None),
        "max_relative_norm_error": error,
        "params": sorted(report.params),
    }
    result["passed"] = (
        report.missing == ["unused.weight", "unused.bias"]
        and all(v == 4 for v in result["none_steps"].values())
        and not any("_fsdp_wrapped_module" in n for n in report.params)
        and error < 1e-4
    )
    return result


class GraphCounter:
    """Wraps a compile backend and counts the graphs Dynamo compiles (a graph break makes one more)."""

    def __init__(self, backend: str) -> None:
        from torch._dynamo.backends.registry import lookup_backend

        self.inner = lookup_backend(backend)
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return self.inner(gm, example_inputs)


def check_compile(device: str) -> dict[str, Any]:
    """A torch.compile'd LightningModule: the user's names, the unused layer found, no extra graph.

    Dynamo splits the graphs before any backend sees them, so the baseline without the guard uses the fast
    ``aot_eager`` backend and only the run with the guard pays for Inductor on a GPU.
    """
    backend = "inductor" if device == "cuda" else "aot_eager"
    graphs = {}
    reports = {}
    for label in ("without_guard", "with_guard"):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        counter = GraphCounter(backend if label == "with_guard" else "aot_eager")
        guard = GradGuard(summary=False) if label == "with_guard" else None
        model = torch.compile(PlainMLP(unused=True), backend=counter)
        started = time.perf_counter()
        trainer(device, [guard] if guard else []).fit(model, loader(6))
        graphs[label] = {
            "graphs": counter.graphs,
            "graph_breaks": sum(torch._dynamo.utils.counters["graph_break"].values()),
            "fit_seconds": round(time.perf_counter() - started, 1),
        }
        if guard is not None:
            reports[label] = guard.report()
    report = reports["with_guard"]
    result = {
        "backend": backend,
        **graphs,
        "missing": report.missing,
        "orig_mod_in_names": any("_orig_mod" in n for n in report.params),
    }
    result["passed"] = (
        report.missing == ["unused.weight", "unused.bias"]
        and not result["orig_mod_in_names"]
        and graphs["with_guard"]["graphs"] == graphs["without_guard"]["graphs"]
        and graphs["with_guard"]["graph_breaks"] == graphs["without_guard"]["graph_breaks"]
    )
    return result


CHECKS: dict[str, Callable[[str], dict[str, Any]]] = {
    "16-mixed, planted overflow": check_amp_overflow,
    "16-mixed, fused Adam": check_fused_adam,
    "FSDPStrategy, planted unused layer": check_fsdp,
    "torch.compile": check_compile,
}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--json", default=None, help="write every figure to this JSON file")
    args = parser.parse_args(argv)
    torch.set_float32_matmul_precision("high")
    environment = {
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    results: dict[str, Any] = {"environment": environment}
    failed = False
    print(f"GradGuard feature checks on {environment['device']} (torch {environment['torch']})\n")
    print("| check | result | figures |")
    print("|---|---|---|")
    for name, check in CHECKS.items():
        started = time.perf_counter()
        try:
            result = check(args.device)
        except Exception:  # noqa: BLE001 - a check that crashes is a failed check, the others still run
            result = {"passed": False, "error": traceback.format_exc(limit=8)}
        result["seconds"] = round(time.perf_counter() - started, 1)
        results[name] = result
        verdict = {True: "pass", False: "FAIL", None: "skipped"}[result.get("passed")]
        failed |= result.get("passed") is False
        result.pop("norms", None)
        figures = {k: v for k, v in result.items() if k not in ("passed", "params", "error")}
        print(f"| {name} | {verdict} | {json.dumps(figures, default=str)} |")
        if "error" in result:
            print(result["error"], file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
