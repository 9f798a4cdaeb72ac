"""The benchmark scripts run (CPU smoke modes) and report what they claim; speed itself is never asserted here."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def load(name: str):
    sys.path.insert(0, BENCHMARKS)
    try:
        spec = importlib.util.spec_from_file_location(f"benchmark_{name}", os.path.join(BENCHMARKS, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(BENCHMARKS)


def test_gpt_presets_have_the_documented_shapes():
    import torch

    gpt = load("gpt")
    with torch.device("meta"):
        model = gpt.GPT(gpt.PRESETS["gpu"])
    params = list(model.parameters())
    assert len(params) == 149 and sum(p.numel() for p in params) == 163_037_184  # GPT-2 small, untied head
    assert gpt.PRESETS["gpu"].precision == "bf16-mixed" and gpt.PRESETS["gpu"].batch_size == 8


def test_overhead_smoke_run_reports_every_variant(tmp_path, capsys):
    overhead = load("overhead")
    out = tmp_path / "overhead.json"
    assert overhead.main(["--preset", "tiny", "--device", "cpu", "--rounds", "1", "--steps", "2", "--warmup", "1",
                          "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["variants"]) == {"none", "defaults", "every_step", "recipe"}
    assert all(row["steps"] == 2 for row in result["variants"].values())
    assert result["variants"]["none"]["ratio"] == 1.0
    assert "vs none" in capsys.readouterr().out


def test_norm_throughput_smoke_run_agrees_with_vector_norm(tmp_path):
    throughput = load("norm_throughput")
    out = tmp_path / "norms.json"
    assert throughput.main(["--preset", "tiny", "--device", "cpu", "--iters", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["tensors"] == 17 and result["max_relative_error"] < 1e-5
    assert set(result["methods"]) == {"gradguard", "gradguard+count", "foreach", "loop"}


def test_sync_check_smoke_run_passes_and_verifies_logged_norms(tmp_path):
    sync_check = load("sync_check")
    out = tmp_path / "sync.json"
    assert sync_check.main(["--preset", "tiny", "--device", "cpu", "--steps", "8", "--log-every", "4",
                            "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    baseline, guarded, plain = result["phases"]
    assert result["passed"] and guarded["steps"] == 8 and guarded["logging_steps"] == [3, 7]
    assert guarded["norm_check"]["compared"] == 2 * 17 and guarded["norm_check"]["missing_count"] == 0
    # the hand-written loop with watch(): the same steps logged, the same norms verified
    assert plain["steps"] == 8 and plain["logging_steps"] == [3, 7] and plain["trapped_steps"] == 6
    assert plain["norm_check"]["compared"] == 2 * 17 and plain["norm_check"]["max_relative_error"] < 1e-6


def test_gpu_adapters_smoke_run_passes_every_check_it_can_run_on_the_cpu(tmp_path):
    adapters = load("gpu_adapters")
    out = tmp_path / "adapters.json"
    assert adapters.main(["--device", "cpu", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    checks = {name: row for name, row in result.items() if isinstance(row, dict) and "passed" in row}
    assert len(checks) == 7
    skipped = [name for name, row in checks.items() if row["passed"] is None]
    assert skipped == ["Hugging Face Trainer: fp16=True, no clipping (CUDA only)"]
    assert all(row["passed"] for name, row in checks.items() if name not in skipped)


def test_scaling_smoke_run(tmp_path):
    scaling = load("scaling")
    out = tmp_path / "scaling.json"
    assert scaling.main(["--sizes", "40", "--steps", "2", "--log-steps", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    row = result["sizes"][0]
    assert row["tensors"] == 40 and row["defaults"]["logged_series"] > 0
    assert result["diagnosis"][0]["cause"] == "unused"


@pytest.mark.skipif(sys.platform == "win32", reason="bash script")
def test_gpu_check_script_is_valid_bash():
    import subprocess

    assert subprocess.run(["bash", "-n", os.path.join(BENCHMARKS, "gpu_check.sh")]).returncode == 0


def test_plain_overhead_smoke_run(tmp_path):
    plain = load("plain_overhead")
    out = tmp_path / "plain.json"
    assert plain.main(["--sizes", "40", "--blocks", "2", "--steps", "2", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["sizes"]
    assert row["tensors"] == 40
    assert row["step_ms"] > 0 and row["watch_step_ms"] > 0


def test_optimizer_in_backward_smoke_run(tmp_path):
    in_backward = load("optimizer_in_backward")
    out = tmp_path / "inbackward.json"
    assert in_backward.main(["--layers", "3", "--blocks", "2", "--steps", "2", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["sizes"]
    assert row["optimizers"] == 6  # one per tensor, each stepped from its gradient hook
    assert row["step_ms"] > 0 and row["watch_step_ms"] > 0


def test_adapter_scaling_smoke_run_times_both_adapters_side_by_side(tmp_path):
    adapter_scaling = load("adapter_scaling")
    out = tmp_path / "adapters.json"
    assert adapter_scaling.main(["--smoke", "--json", str(out)]) == 0
    loops = json.loads(out.read_text())["loops"]
    assert set(loops) == {"trainer", "watch"}
    for row in loops.values():
        assert row["tensors"] == 40 and row["pairs"] > 0 and row["without_ms"] > 0 and row["with_ms"] > 0
        assert row["in_hooks_ms"] > 0  # the guard's own hooks ran, and were timed, in the guarded steps
    # the guard in the Trainer checked exactly its own batches (warm-up and timed), and kept the decision a real
    # fit takes: no hook between backward and step, so the step check reuses the read after backward
    assert loops["trainer"]["guarded_steps"] == 2 + 3 and loops["trainer"]["reused_backward_read"] is True


def test_never_moved_smoke_run_times_both_calls(tmp_path):
    never_moved = load("never_moved")
    out = tmp_path / "never_moved.json"
    assert never_moved.main(["--sizes", "16", "--steps", "60", "--json", str(out)]) == 0
    [row] = json.loads(out.read_text())["rows"]
    assert row["tensors"] == 16 and row["steps"] == 60
    assert all(row[key] > 0 for key in ("ordinary_warm_us", "ordinary_after_step_us", "observed_us", "amortized_us"))
