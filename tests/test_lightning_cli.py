"""GradGuard configured from a LightningCLI YAML file: the settings arrive, and a wrong value is named.

``trainer.callbacks: [{class_path: lightning_gradguard.GradGuard, init_args: {...}}]`` is how LightningCLI users add
a callback. jsonargparse reads ``GradGuard.__init__``'s signature to check each value against its type hint before
anything is built (a bool, a choice among literals, an optional int), and the constructor checks the rest (a
positive ``norm_type``): either way the error names the argument.
"""

from __future__ import annotations

import os
import textwrap

import pytest
from models import UnusedLayerMLP

pytest.importorskip("jsonargparse", reason="LightningCLI needs the cli extra: pip install 'lightning-gradguard[cli]'")

from lightning.pytorch.cli import LightningCLI  # noqa: E402 - after the skip
from models import RegressionData  # noqa: E402

from lightning_gradguard import GradGuard  # noqa: E402
from lightning_gradguard.report import GradReport  # noqa: E402


@pytest.fixture(autouse=True)
def _command_line(monkeypatch):
    monkeypatch.setattr("sys.argv", ["train.py"])  # LightningCLI(args=...) stands for the command line


def write_config(tmp_path, init_args: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(
        textwrap.dedent(
            f"""\
            seed_everything: 0
            trainer:
              accelerator: cpu
              max_epochs: 1
              enable_checkpointing: false
              enable_progress_bar: false
              enable_model_summary: false
              log_every_n_steps: 1
              default_root_dir: {tmp_path}
              logger:
                class_path: lightning.pytorch.loggers.CSVLogger
                init_args:
                  save_dir: {tmp_path / "logs"}
              callbacks:
                - class_path: lightning_gradguard.GradGuard
                  init_args:
            """
        )
        + textwrap.indent(textwrap.dedent(init_args), " " * 8)
        + "data:\n  n_batches: 3\n"
    )
    return str(path)


def run_cli(path: str, subcommand: str = "fit") -> LightningCLI:
    return LightningCLI(
        UnusedLayerMLP, RegressionData, args=[subcommand, "--config", path], save_config_kwargs={"overwrite": True}
    )


def test_a_yaml_config_builds_the_guard_with_its_settings(tmp_path, capsys):
    path = write_config(
        tmp_path,
        """\
        strict: false
        allow_none: ["extra.*"]
        log_every_n_steps: 2
        norm_type: inf
        nonfinite_check: every_step
        log_granularity: param
        max_logged_series: 64
        summary: true
        """,
    )
    cli = run_cli(path)
    (guard,) = [c for c in cli.trainer.callbacks if isinstance(c, GradGuard)]
    config = guard.config
    assert (config.strict, config.allow_none, config.log_every_n_steps) == (False, ("extra.*",), 2)
    assert (config.norm_type, config.nonfinite_check, config.log_granularity) == (float("inf"), "every_step", "param")
    assert config.max_logged_series == 64 and guard.summary is True
    # and it ran: the unused layer is named in the summary, the report and gradguard.json beside the CSV metrics
    assert guard.report().missing == ["unused.weight", "unused.bias"]
    assert "2 of 6 parameters missed a gradient at some step" in capsys.readouterr().out
    saved = GradReport.load(os.path.join(cli.trainer.logger.log_dir, "gradguard.json"))
    assert saved.to_dict() == guard.report().to_dict()


@pytest.mark.parametrize(
    ("init_args", "expected"),
    [
        ("strict: maybe\n", ["strict", "maybe"]),
        ("nonfinite_check: sometimes\n", ["nonfinite_check", "sometimes"]),
        ("log_granularity: layer\n", ["log_granularity", "layer"]),
        ("max_logged_series: many\n", ["max_logged_series", "many"]),
        ("norm_type: large\n", ["norm_type", "large"]),
        ("allow_none: [1, 2]\n", ["allow_none", "Got value: 1"]),
        ("no_such_option: 1\n", ["no_such_option"]),
    ],
    ids=["strict", "nonfinite_check", "log_granularity", "max_logged_series", "norm_type", "allow_none", "unknown"],
)
def test_a_value_of_the_wrong_type_is_refused_before_training(tmp_path, capsys, init_args, expected):
    """jsonargparse checks the YAML against the type hints: it exits with usage status 2, naming the argument."""
    with pytest.raises(SystemExit) as info:
        run_cli(write_config(tmp_path, init_args))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert all(word in err for word in expected), err
    assert not (tmp_path / "logs").exists()  # nothing ran


@pytest.mark.parametrize(
    ("init_args", "python"),
    [
        ("norm_type: 0\n", {"norm_type": 0.0}),  # jsonargparse hands a float to Union[float, ...]
        ("norm_type: -2.5\n", {"norm_type": -2.5}),
        ("log_every_n_steps: 0\n", {"log_every_n_steps": 0}),
        ("max_logged_series: -1\n", {"max_logged_series": -1}),
    ],
    ids=["norm_type 0", "norm_type negative", "log_every_n_steps 0", "max_logged_series negative"],
)
def test_a_value_out_of_range_gives_the_same_error_as_in_python(tmp_path, init_args, python):
    """Types pass the parser; the constructor checks the range, and its message (the one Python users get) is in
    LightningCLI's error."""
    with pytest.raises((ValueError, TypeError)) as from_python:
        GradGuard(**python)
    message = str(from_python.value)
    assert next(iter(python)) in message
    with pytest.raises(Exception) as from_yaml:  # noqa: B017 - jsonargparse wraps it; the text is what users read
        run_cli(write_config(tmp_path, init_args))
    assert message in str(from_yaml.value)
