"""A ``GradGuard`` that crosses a process boundary: ``strategy="ddp_spawn"`` pickles the Trainer's callbacks into the
processes it starts. The guard travels as its options and its counts; the run, the summary and ``gradguard.json``
happen in those processes, and the launching process's guard says so instead of returning an empty report.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from torch import nn

from lightning_gradguard import GradGuard, GradReport


class WithUnused(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 1)
        self.unused = nn.Linear(2, 2)  # planted: never called

    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(guard: GradGuard, steps: int, tmp_path) -> None:
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(32, 4)), batch_size=4)
    trainer = Trainer(max_steps=steps, callbacks=[guard], logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(WithUnused(), loader)


def test_a_pickled_guard_keeps_its_options_and_counts(tmp_path):
    guard = GradGuard(summary=False, name="run", allow_none="nothing.*")
    _fit(guard, 3, tmp_path)
    copy = pickle.loads(pickle.dumps(guard))
    assert copy.config == guard.config and copy.state_key == guard.state_key
    # before it sees the model, the copy holds the counts (a checkpoint of it keeps them) but cannot name them: it
    # says so, rather than report an all-clear of zero steps
    assert copy.state_dict()["steps"] == guard.state_dict()["steps"]
    with pytest.raises(RuntimeError, match="holds the counts of a run but has not seen its model"):
        copy.report()
    _fit(copy, 2, tmp_path)  # the counts continue where the original left them
    unused = copy.report().params["unused.weight"]
    assert (copy.report().steps, unused.steps, unused.none_steps) == (5, 5, 5)
    assert guard.report().steps == 3  # the original ran in this process: its report stands


class TaggedGuard(GradGuard):
    """A user's subclass with its own constructor and state."""

    def __init__(self, tag: str) -> None:
        super().__init__(strict=True, summary=False)
        self.tag = tag


def test_a_subclass_with_its_own_constructor_pickles_with_its_state():
    copy = pickle.loads(pickle.dumps(TaggedGuard("run-7")))
    assert type(copy) is TaggedGuard and copy.tag == "run-7" and copy.config.strict


SPAWN_SCRIPT = textwrap.dedent(
    """
    import sys, warnings, logging
    import torch
    from lightning.pytorch import Trainer
    from lightning_gradguard import GradGuard
    sys.path.insert(0, {tests!r})
    from test_spawned_processes import WithUnused

    if __name__ == "__main__":
        warnings.simplefilter("ignore")
        logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
        guard = GradGuard()
        trainer = Trainer(strategy="ddp_spawn_find_unused_parameters_true", devices=2, accelerator="cpu",
                          max_steps=3, callbacks=[guard], default_root_dir={root!r}, enable_progress_bar=False,
                          enable_model_summary=False, enable_checkpointing=False)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(32, 4)), batch_size=4)
        trainer.fit(WithUnused(), loader)
        try:
            guard.report()
        except RuntimeError as err:
            print("LAUNCHER:", err)
    """
)


@pytest.mark.slow
def test_ddp_spawn_runs_the_guard_in_the_spawned_processes(tmp_path):
    script = tmp_path / "spawn_fit.py"
    script.write_text(SPAWN_SCRIPT.format(tests=str(Path(__file__).parent), root=str(tmp_path)))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "unused.weight" in done.stdout and "3 optimizer steps" in done.stdout  # rank zero's summary
    assert "LAUNCHER: this GradGuard was pickled or copied before it saw any training" in done.stdout
    assert "GradReport.load(path)" in done.stdout
    [path] = list(tmp_path.rglob("gradguard.json"))
    report = GradReport.load(path)
    assert report.steps == 3 and report.missing == ["unused.weight", "unused.bias"]
    assert json.loads(path.read_text())["steps"] == 3
