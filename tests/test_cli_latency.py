"""``benchmarks/cli_latency.py`` runs and reports every case; a report file is read in under 1 s, as CI needs."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


pytestmark = pytest.mark.slow  # several processes, or subprocesses


def test_the_command_answers_in_under_a_second(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("benchmark_cli_latency", os.path.join(BENCHMARKS, "cli_latency.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    out = tmp_path / "latency.json"
    assert module.main(["--runs", "3", "--json", str(out)]) == 0
    cases = json.loads(out.read_text())["cases"]
    assert set(cases) == {"python", "small", "10k", "events"}
    # the target, generous on purpose: about 0.05-0.2 s is typical, 5-7 s when torch was imported
    assert cases["small"]["median_s"] < 1.0 and cases["10k"]["median_s"] < 1.0
    assert "meets the 1 s target" in capsys.readouterr().out
