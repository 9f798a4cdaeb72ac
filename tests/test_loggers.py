"""GradGuard through the loggers people use, each read back with its own client.

One real fit writes through ``CSVLogger``, ``MLFlowLogger`` (a local SQLite tracking store), ``WandbLogger``
(offline: no network) and ``TensorBoardLogger`` at once. The model's parameter names hold dots, brackets, slashes,
a colon, a space, a dash, a non-ASCII letter, an empty path segment and a near-collision (``w[0]`` next to ``w0``),
so that every backend must store legal, distinct names. Each backend is read back with its own reader: the ``csv``
module, ``mlflow.tracking.MlflowClient``, W&B's ``wandb leet inspect`` on the offline run file, and TensorBoard's
``EventAccumulator``; the series and values must agree with the CSV file, which stores names as they are.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from lightning.pytorch import LightningModule
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from models import RegressionData
from torch import nn

from lightning_gradguard import GradGuard
from lightning_gradguard.output.sinks.loggers import mlflow_metric_name

mlflow = pytest.importorskip("mlflow", reason="the mlflow extra: pip install 'lightning-gradguard[mlflow]'")
wandb = pytest.importorskip("wandb", reason="the wandb extra: pip install 'lightning-gradguard[wandb]'")

from lightning.pytorch.loggers import MLFlowLogger, WandbLogger  # noqa: E402 - after the skips

STEPS = 4


class Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_parameter("w[0]", nn.Parameter(torch.full((4,), 0.5)))
        self.register_parameter("w0", nn.Parameter(torch.full((4,), -0.25)))  # Lightning's MLflow filter: also "w0"
        self.register_parameter("w/1", nn.Parameter(torch.ones(1)))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return (h * getattr(self, "w[0]") + h * self.w0).sum(-1, keepdim=True) * getattr(self, "w/1")


class OddNames(LightningModule):
    """Parameters named ``blocks.enc/0.weight``, ``blocks.head[1].w[0]``, ``blocks.a b:c.bias``, ...; the
    ``blocks.skip//ü-2`` layer is never called, so it gets a ``none_steps`` series too."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleDict(
            {"enc/0": nn.Linear(4, 4), "a b:c": nn.Linear(4, 4), "head[1]": Head(), "skip//ü-2": nn.Linear(4, 1)}
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = torch.tanh(self.blocks["a b:c"](self.blocks["enc/0"](x)))
        return F.mse_loss(self.blocks["head[1]"](h), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


ODD = [
    "blocks.enc/0.weight",
    "blocks.a b:c.bias",
    "blocks.head[1].w[0]",
    "blocks.head[1].w0",
    "blocks.head[1].w/1",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One fit through all four loggers; returns the loggers, the guard, the warnings and the model."""
    root = tmp_path_factory.mktemp("loggers")
    saved = {k: os.environ.get(k) for k in ("WANDB_MODE", "WANDB_DIR", "WANDB_SILENT", "WANDB_CONSOLE")}
    os.environ.update(WANDB_MODE="offline", WANDB_DIR=str(root), WANDB_SILENT="true", WANDB_CONSOLE="off")
    loggers = {
        "csv": CSVLogger(str(root), name="csv"),
        "mlflow": MLFlowLogger(experiment_name="gradguard", tracking_uri=f"sqlite:///{root / 'mlflow.db'}"),
        "wandb": WandbLogger(project="gradguard", save_dir=str(root), offline=True),
        "tensorboard": TensorBoardLogger(str(root), name="tb"),
    }
    guard = GradGuard(log_every_n_steps=1, log_granularity="param", summary=False)
    from lightning.pytorch import Trainer

    trainer = Trainer(
        accelerator="cpu", max_epochs=1, logger=list(loggers.values()), callbacks=[guard], log_every_n_steps=1,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = OddNames()
            trainer.fit(model, RegressionData(n_batches=STEPS))
        loggers["wandb"].experiment.finish()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return loggers, guard, [str(w.message) for w in caught], model


def csv_series(logger: CSVLogger) -> dict[str, dict[int, float]]:
    """``{metric: {step: value}}`` of the GradGuard columns of the metrics CSV."""
    with open(os.path.join(logger.log_dir, "metrics.csv"), newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    series: dict[str, dict[int, float]] = {}
    for row in rows:
        for key, value in row.items():
            if key.startswith("gradguard/") and value != "":
                series.setdefault(key, {})[int(row["step"])] = float(value)
    return series


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)


def test_csv_holds_every_series_under_its_own_name(run):
    loggers, guard, messages, model = run
    series = csv_series(loggers["csv"])
    for name in ODD:
        assert sorted(series[f"gradguard/norm/{name}"]) == list(range(STEPS)), name
    none_steps = series["gradguard/none_steps/blocks.skip//ü-2.weight"]
    assert sorted(none_steps.items()) == [(s, s + 1.0) for s in range(STEPS)]
    assert series["gradguard/none_params"] == {s: 2.0 for s in range(STEPS)}
    # the gradients of the last step are still in .grad after the fit: their norms are the logged ones
    parameters = dict(model.named_parameters())
    for name in ODD:
        assert close(series[f"gradguard/norm/{name}"][STEPS - 1], parameters[name].grad.norm().item()), name
    assert "internal error" not in " ".join(messages)
    assert guard.report().missing == ["blocks.skip//ü-2.weight", "blocks.skip//ü-2.bias"]


def test_mlflow_stores_legal_distinct_names_with_the_same_values(run):
    loggers, _, messages, _ = run
    logger = loggers["mlflow"]
    client = mlflow.tracking.MlflowClient(tracking_uri=logger._tracking_uri)
    stored = client.get_run(logger.run_id).data.metrics
    expected = csv_series(loggers["csv"])
    names = {mlflow_metric_name(name): name for name in expected}
    assert len(names) == len(expected)  # no two parameters share a series
    assert set(stored) == set(names)
    assert "gradguard/norm/blocks.head_-5b-1_-5d-.w_-5b-0_-5d-" in stored
    assert "gradguard/norm/blocks.head_-5b-1_-5d-.w0" in stored  # "w0" itself stays as it was
    assert "gradguard/norm/blocks.a b_-3a-c.bias" in stored
    assert "gradguard/none_steps/blocks.skip/_--/_-fc--2.weight" in stored  # the empty segment, then "ü"
    for key, name in names.items():
        history = {m.step: m.value for m in client.get_metric_history(logger.run_id, key)}
        assert set(history) == set(expected[name]), key
        assert all(close(history[s], v) for s, v in expected[name].items()), key
    # Lightning's own filter had nothing to delete, so it never warned
    assert not [m for m in messages if "MLFlow only allows" in m]


@pytest.mark.slow
def test_wandb_offline_run_holds_every_series(run):
    loggers, _, _, _ = run
    run_dir = loggers["wandb"].experiment.dir  # .../wandb/offline-run-*/files
    (log_file,) = [
        os.path.join(os.path.dirname(run_dir), f) for f in os.listdir(os.path.dirname(run_dir)) if f.endswith(".wandb")
    ]
    wandb_cli = shutil.which("wandb") or os.path.join(os.path.dirname(sys.executable), "wandb")
    result = subprocess.run(
        [wandb_cli, "leet", "inspect", "--json", log_file], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    history: dict[str, dict[int, float]] = {}
    for line in result.stdout.splitlines():
        record = json.loads(line)
        if record.get("type") != "history":
            continue
        item = record["history"]["item"]
        step = int(item["trainer/global_step"])
        for key, value in item.items():
            if key.startswith("gradguard/"):
                history.setdefault(key, {})[step] = float(value)
    expected = csv_series(loggers["csv"])
    assert set(history) == set(expected)  # W&B stores names as they are: nothing to rewrite
    for name, values in expected.items():
        assert set(history[name]) == set(values) and all(close(history[name][s], v) for s, v in values.items())


def test_tensorboard_agrees(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    loggers, _, _, _ = run
    accumulator = EventAccumulator(loggers["tensorboard"].log_dir, size_guidance={"scalars": 0})
    accumulator.Reload()
    expected = csv_series(loggers["csv"])
    tags = {t for t in accumulator.Tags()["scalars"] if t.startswith("gradguard/")}
    assert tags == set(expected)
    for name in ODD:
        events = accumulator.Scalars(f"gradguard/norm/{name}")
        assert {e.step: e.value for e in events}.keys() == expected[f"gradguard/norm/{name}"].keys()
        assert all(close(e.value, expected[f"gradguard/norm/{name}"][e.step]) for e in events)


# ---------------------------------------------------------------------------------------------- the name mapping
def _decode(mapped: str) -> str:
    """The inverse of :func:`mlflow_metric_name` (names under 250 characters), to prove it loses nothing."""
    segments = []
    for part in mapped.split("/"):
        if part == "_--":
            segments.append("")
            continue
        out, i = [], 0
        while i < len(part):
            if part.startswith("_-", i):
                end = part.index("-", i + 2)
                out.append(chr(int(part[i + 2 : end], 16)))
                i = end + 1
            else:
                out.append(part[i])
                i += 1
        segments.append("".join(out))
    return "/".join(segments)


names = st.text(st.characters(codec="utf-8"), max_size=40) | st.text("ab_-./[]: ", max_size=20)


@given(name=names)
def test_the_mlflow_mapping_is_legal_stable_and_reversible(name):
    from mlflow.utils.validation import _validate_metric_name

    key = f"gradguard/norm/{name}"
    mapped = mlflow_metric_name(key)
    _validate_metric_name(mapped)  # MLflow's own check: raises on an illegal name
    assert re.sub("[^a-zA-Z0-9_/. -]+", "", mapped) == mapped  # what Lightning's MLFlowLogger would delete
    if len(mapped) < 250:
        assert _decode(mapped) == key
    else:
        assert len(mapped) == 250
    as_path = all(segment not in ("", ".", "..") for segment in key.split("/"))
    if as_path and "_-" not in key and re.fullmatch("[a-zA-Z0-9_/. -]*", key) and len(key) <= 250:
        assert mapped == key  # already legal: untouched


def test_long_names_stay_distinct():
    a = mlflow_metric_name("gradguard/norm/" + "x" * 300 + "a")
    b = mlflow_metric_name("gradguard/norm/" + "x" * 300 + "b")
    assert len(a) == len(b) == 250 and a != b
