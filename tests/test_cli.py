"""``gradguard report PATH`` on the output of real runs (a Trainer with TensorBoard, a plain loop)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from models import HealthyMLP, RegressionData
from plain_models import PLANTED, PlantedModule, PlantedNet, batches

from lightning_gradguard import GradGuard
from lightning_gradguard.adapters.loop import watch
from lightning_gradguard.cli import EXIT_ERROR, EXIT_MISSING, EXIT_OK, main

NAMES = sorted(f"net.{n}" for n in PLANTED)


def _fit(root: str, module: LightningModule) -> tuple[str, GradGuard]:
    guard = GradGuard(summary=False)
    logger = TensorBoardLogger(root, name="run")
    trainer = Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=logger,
        callbacks=[guard],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, RegressionData(n_batches=3))
    return logger.log_dir, guard


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    """A finished Trainer run with a planted unused layer and detached path: (log_dir, its GradReport)."""
    log_dir, guard = _fit(str(tmp_path_factory.mktemp("planted")), PlantedModule())
    return log_dir, guard.report()


@pytest.fixture(scope="module")
def healthy_run(tmp_path_factory):
    log_dir, guard = _fit(str(tmp_path_factory.mktemp("healthy")), HealthyMLP())
    return log_dir, guard.report()


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------------------------------------- reading real output
def test_log_directory_prints_the_table(planted_run, capsys):
    log_dir, report = planted_run
    code, out, err = run_cli(capsys, "report", log_dir)
    assert code == EXIT_OK and err == ""
    assert out.strip() == report.summary()
    assert "parameter" in out and all(name in out for name in NAMES)


def test_parent_directory_with_one_run_is_found(planted_run, capsys):
    log_dir, report = planted_run
    code, out, _ = run_cli(capsys, "report", os.path.dirname(os.path.dirname(log_dir)))
    assert code == EXIT_OK and out.strip() == report.summary()


def test_json_format_round_trips(planted_run, capsys):
    log_dir, report = planted_run
    code, out, _ = run_cli(capsys, "report", os.path.join(log_dir, "gradguard.json"), "--format", "json")
    assert code == EXIT_OK
    assert json.loads(out) == report.to_dict()


def test_markdown_format(planted_run, capsys):
    log_dir, _ = planted_run
    code, out, _ = run_cli(capsys, "report", log_dir, "--format", "markdown")
    assert code == EXIT_OK
    assert "| parameter | None steps | None micro-batches | non-finite | zero | cause | hint |" in out
    assert all(f"| {name} | 3/3 | 3/3 |" in out for name in NAMES)


def test_fail_on_missing_gates_ci(planted_run, healthy_run, capsys):
    code, _, err = run_cli(capsys, "report", planted_run[0], "--fail-on-missing")
    assert code == EXIT_MISSING
    assert "4 parameters missed a gradient" in err
    code, out, _ = run_cli(capsys, "report", healthy_run[0], "--fail-on-missing")
    assert code == EXIT_OK
    assert "all 6 trainable parameters received a gradient at each of 3 optimizer steps" in out


def test_tensorboard_events_alone_are_enough(planted_run, tmp_path, capsys):
    """Without gradguard.json, the report comes from the dashboard's text entry in the event files."""
    log_dir, report = planted_run
    copy = tmp_path / "only_events"
    shutil.copytree(log_dir, copy)
    os.remove(copy / "gradguard.json")
    code, out, _ = run_cli(capsys, "report", str(copy), "--format", "json")
    assert code == EXIT_OK
    assert json.loads(out) == report.to_dict()  # the end-of-fit entry, not the first-missing one
    (event_file,) = [p for p in os.listdir(copy) if "tfevents" in p]
    code, out, _ = run_cli(capsys, "report", str(copy / event_file))
    assert code == EXIT_OK and out.strip() == report.summary()


def test_plain_loop_log_dir(tmp_path, capsys):
    model = PlantedNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        guard = watch(model, optimizer, log_dir=tmp_path, summary=False)
        for x, y in batches(2):
            F.mse_loss(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
        guard.close()
    code, out, _ = run_cli(capsys, "report", str(tmp_path), "--fail-on-missing")
    assert code == EXIT_MISSING
    assert all(name in out for name in PLANTED)


def test_the_reports_of_named_guards_are_found(tmp_path, capsys):
    """Two named guards in one log directory (a GAN's networks): each writes gradguard-<name>.json and tags under
    gradguard/<name>/; the command finds them (and asks which), or reads the one it is given."""
    model = PlantedNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        guard = watch(model, optimizer, log_dir=tmp_path, summary=False, name="critic")
        for x, y in batches(2):
            F.mse_loss(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
        guard.close()
    assert os.listdir(tmp_path).count("gradguard-critic.json") == 1
    code, out, _ = run_cli(capsys, "report", str(tmp_path), "--fail-on-missing")
    assert code == EXIT_MISSING and all(name in out for name in PLANTED)
    (event_file,) = [p for p in os.listdir(tmp_path) if "tfevents" in p]
    code, out, _ = run_cli(capsys, "report", str(tmp_path / event_file), "--fail-on-missing")  # the tags alone
    assert code == EXIT_MISSING and all(name in out for name in PLANTED)
    shutil.copy(tmp_path / "gradguard-critic.json", tmp_path / "gradguard-generator.json")
    code, _, err = run_cli(capsys, "report", str(tmp_path))
    assert code == EXIT_ERROR and "holds 2 runs" in err and "gradguard-generator.json" in err


@pytest.mark.slow
def test_console_script(planted_run):
    """The installed ``gradguard`` entry point (or ``python -m``) with a real exit status."""
    executable = shutil.which("gradguard")
    command = [executable] if executable else [sys.executable, "-m", "lightning_gradguard.cli"]
    result = subprocess.run([*command, "report", planted_run[0], "--fail-on-missing"], capture_output=True, text=True)
    assert result.returncode == EXIT_MISSING, result.stderr
    assert "net.unused.weight" in result.stdout


# ---------------------------------------------------------------------------------------------- clear errors
def test_several_runs_are_listed(planted_run, healthy_run, tmp_path, capsys):
    shutil.copytree(planted_run[0], tmp_path / "a" / "version_0")
    shutil.copytree(healthy_run[0], tmp_path / "b" / "version_0")
    code, out, err = run_cli(capsys, "report", str(tmp_path))
    assert code == EXIT_ERROR and out == ""
    assert "holds 2 runs with a GradGuard report; pass one of them:" in err
    assert str(tmp_path / "a" / "version_0" / "gradguard.json") in err
    assert str(tmp_path / "b" / "version_0" / "gradguard.json") in err


def test_directory_without_a_report(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("nothing here")
    code, out, err = run_cli(capsys, "report", str(tmp_path))
    assert code == EXIT_ERROR and out == ""
    assert "no GradGuard report found" in err and "gradguard.json" in err


def test_corrupt_json(tmp_path, capsys):
    path = tmp_path / "gradguard.json"
    path.write_text('{"steps": 3, "micro_batches": 3, "params": {"a.weight": {"steps": ')  # a killed write
    code, _, err = run_cli(capsys, "report", str(path))
    assert code == EXIT_ERROR
    assert "corrupt report, not valid JSON" in err and "line 1" in err


def test_json_that_is_not_a_report(tmp_path, capsys):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"loss": 0.1}))
    code, _, err = run_cli(capsys, "report", str(path))
    assert code == EXIT_ERROR and 'not a GradGuard report: the report lacks the field "steps"' in err
    path.write_text("[1, 2]")
    code, _, err = run_cli(capsys, "report", str(path))
    assert code == EXIT_ERROR and "not an object" in err


def test_missing_path_and_no_command(tmp_path, capsys):
    code, _, err = run_cli(capsys, "report", str(tmp_path / "nope"))
    assert code == EXIT_ERROR and "no such file or directory" in err
    code, _, err = run_cli(capsys)
    assert code == EXIT_ERROR and "report" in err  # the help names the command
    code, _, err = run_cli(capsys, "report", str(tmp_path), "--format", "xml")  # argparse's usage error, returned
    assert code == EXIT_ERROR and "invalid choice: 'xml'" in err
    code, out, _ = run_cli(capsys, "report", "--help")
    assert code == EXIT_OK and "--fail-on-missing" in out


# ---------------------------------------------------------------------------------------------- no torch, no Lightning
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("torch", "lightning", "pytorch_lightning", "lightning_fabric", "lightning_utilities")


def _imported_modules(*argv: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run ``python -X importtime -m lightning_gradguard.cli ...``; returns the result and the modules it imported."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "lightning_gradguard.cli", *argv],
        capture_output=True, text=True, env=env, timeout=120,
    )
    lines = [line for line in result.stderr.splitlines() if line.startswith("import time:")]
    modules = {line.rsplit("|", 1)[-1].strip() for line in lines}
    return result, modules


@pytest.mark.slow
def test_the_command_imports_neither_torch_nor_lightning(planted_run, tmp_path):
    """A CI gate answers at once: reading gradguard.json imports no torch, no Lightning, not even tensorboard."""
    result, modules = _imported_modules("report", planted_run[0], "--fail-on-missing")
    assert result.returncode == EXIT_MISSING, result.stderr[-2000:]
    assert "net.unused.weight" in result.stdout
    assert "lightning_gradguard.report" in modules  # the importtime listing is there to be read
    heavy = sorted(m for m in modules if m.split(".")[0] in (*HEAVY, "tensorboard"))
    assert heavy == []


@pytest.mark.slow
def test_event_files_need_tensorboard_but_not_torch(planted_run, tmp_path):
    copy = tmp_path / "only_events"
    shutil.copytree(planted_run[0], copy)
    os.remove(copy / "gradguard.json")
    result, modules = _imported_modules("report", str(copy))
    assert result.returncode == EXIT_OK, result.stderr[-2000:]
    assert "net.unused.weight" in result.stdout
    assert any(m.startswith("tensorboard") for m in modules)
    assert sorted(m for m in modules if m.split(".")[0] in HEAVY) == []
