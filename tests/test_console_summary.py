"""The end-of-run summary on the console: short for huge models, unchanged for small ones, honest when empty."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from models import HealthyMLP, RegressionData
from test_cli_inputs import planted_report
from torch import nn

from lightning_gradguard import GradGuard, watch
from lightning_gradguard.cli import EXIT_MISSING, main
from lightning_gradguard.output.sinks.console import CONSOLE_MAX_ROWS, print_summary
from lightning_gradguard.report import GradReport

LAYERS = 5000  # 10,000 parameter tensors
USED = 3500  # the last 1,500 layers (3,000 tensors, 30%) are never called


class Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(2, 2) for _ in range(LAYERS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:USED]:
            x = x + layer(x)
        return x


@pytest.fixture(scope="module")
def huge_run(tmp_path_factory):
    """A real plain loop over a 10,000-tensor model with 30% of it unused, logging to a directory.

    Returns (what it printed at the end, its log directory, its report).
    """
    import contextlib
    import io

    log_dir = tmp_path_factory.mktemp("huge")
    torch.manual_seed(0)
    model = Chain()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    printed = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(printed):
        warnings.simplefilter("ignore")
        guard = watch(model, optimizer, log_dir=log_dir)
        for _ in range(2):
            model(torch.randn(4, 2)).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
        guard.close()
    return printed.getvalue(), str(log_dir), guard.report()


def test_the_console_summary_of_a_huge_model_is_short(huge_run):
    printed, log_dir, report = huge_run
    assert len(report.params) == 10_000 and len(report.missing) == 3_000
    lines = printed.rstrip("\n").splitlines()
    assert len(lines) <= 40, printed[:3000]
    assert lines[0] == (
        "GradGuard: 2 optimizer steps, 2 backward passes; 3000 of 10000 parameters missed a gradient at some step"
    )
    # one line per distinct explanation (here one per unused module) up to the bound, then the rest by cause
    assert "- ... and 1492 more explanations, of 2984 parameters (unused)" in lines
    assert "... and 2992 more parameters (2992 missed a gradient at some step)" in lines
    table = lines.index("... and 2992 more parameters (2992 missed a gradient at some step)")
    assert lines[table - CONSOLE_MAX_ROWS].startswith("layers.3500.weight  2/2")
    path = os.path.join(log_dir, "gradguard.json")
    assert lines[-1] == f"The full table: {path} (`gradguard report {log_dir}` prints it)"


def test_the_full_table_is_in_the_file_and_the_command(huge_run, capsys):
    _, log_dir, report = huge_run
    assert main(["report", log_dir, "--fail-on-missing"]) == EXIT_MISSING
    out = capsys.readouterr().out
    assert out == report.summary() + "\n"
    rows = [line for line in out.splitlines() if line.startswith("layers.") and "unused (every step)" in line]
    assert len(rows) == 3000
    assert GradReport.load(os.path.join(log_dir, "gradguard.json")).to_dict() == report.to_dict()


def test_print_summary_names_the_file_when_it_knows_it(huge_run):
    _, log_dir, report = huge_run
    path = os.path.join(log_dir, "gradguard.json")
    text = print_summary(report, write=lambda _: None, report_path=path)
    assert text.splitlines()[-1] == f"The full table: {path} (`gradguard report {log_dir}` prints it)"
    assert print_summary(report, write=lambda _: None, max_rows=None) == report.summary()
    # a run that writes no report file (no logger, no log_dir): the one place the full table is
    unwritten = print_summary(report, write=lambda _: None)
    assert unwritten.splitlines()[-1] == "The full table: guard.report().format_table()"


def test_a_small_report_prints_as_before():
    report = planted_report()
    printed = []
    text = print_summary(report, write=printed.append)
    assert printed == [text] and text == report.summary() == report.format_table()
    assert "..." not in text and "The full table" not in text
    assert text.splitlines()[0] == (
        "GradGuard: 2 optimizer steps, 2 backward passes; 4 of 8 parameters missed a gradient at some step"
    )


def test_a_run_that_checked_nothing_says_so(make_trainer, capsys):
    """allow_none="*" leaves nothing to check: the summary says so and why, not "all 0 ... received a gradient"."""
    guard = GradGuard(allow_none="*")
    make_trainer(callbacks=[guard]).fit(HealthyMLP(), RegressionData(n_batches=3))
    out = capsys.readouterr().out
    expected = (
        "GradGuard: nothing was checked in 3 optimizer steps: the optimizers that stepped hold no parameter with "
        "requires_grad=True that allow_none leaves checked"
    )
    assert expected in out.splitlines()
    assert "all 0" not in out
    assert guard.report().summary() == expected
