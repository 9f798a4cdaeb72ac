"""The examples run as a user runs them (a fresh process, in an empty directory) and say what they promise."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


pytestmark = pytest.mark.slow  # several processes, or subprocesses


def run_example(name: str, cwd) -> str:
    env = dict(os.environ, PYTHONWARNINGS="ignore::DeprecationWarning", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, name)],
        cwd=str(cwd), env=env, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, f"{name} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


@pytest.mark.timeout(300)
def test_quickstart_names_the_planted_bug_and_writes_tensorboard_logs(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = run_example("quickstart.py", tmp_path)
    assert "Parameters that never received a gradient: ['norm.weight', 'norm.bias']" in out
    assert "norm.weight: no gradient at 48 of 48 optimizer steps" in out
    assert "encoder.0.weight" not in out.split("Parameters that never")[1]

    log_dir = tmp_path / "lightning_logs" / "version_0"
    events = [f for f in os.listdir(log_dir) if f.startswith("events.out.tfevents")]
    assert len(events) == 1
    assert (log_dir / "gradguard.json").is_file()
    accumulator = EventAccumulator(str(log_dir))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {"gradguard/none_steps/norm.weight", "gradguard/norm/classifier.weight", "gradguard/total_norm"} <= tags
    assert "gradguard/norm/norm.weight" not in tags


@pytest.mark.timeout(300)
def test_accumulation_separates_never_from_sometimes(tmp_path):
    out = run_example("accumulation.py", tmp_path)
    assert "8 optimizer steps over 32 micro-batches" in out
    assert "dead.weight    never: no gradient at any of its 8 optimizer steps" in out
    assert "rare.weight    None at some steps: no gradient at 4 of 8 optimizer steps" in out
    assert "aux.weight     None in some micro-batches: a gradient at every step, but only from 8 of 32" in out
    assert "report.intermittent (every step, not every micro-batch): ['aux.weight', 'aux.bias']" in out
    assert "trunk.weight" not in out


@pytest.mark.timeout(300)
def test_seed_article_tells_the_truth_about_each_example(tmp_path):
    out = run_example("seed_article.py", tmp_path)
    sections = {part.split("\n", 1)[0]: part for part in out.split("\n== ")[1:]}

    def section(prefix: str) -> str:
        (text,) = [v for k, v in sections.items() if k.startswith(prefix)]
        return text

    assert "GradGuard: all 6 trainable parameters received a gradient at each of 4 optimizer steps" in section(
        "Example 1"
    )
    assert "GradGuard: all 7 trainable parameters received a gradient at each of 4 optimizer steps" in section(
        "Example 2"
    )
    assert "AttributeError: 'tuple' object has no attribute 'size'" in section("Example 3 as written")
    assert "GradGuard: all 4 trainable parameters received a gradient" in section("Example 3 corrected")

    bug4 = section("Bug 4")
    assert "2 of 8 trainable parameters received no gradient" in bug4
    assert "attention.weight: None at 4/4 steps" in bug4 and "attention.bias: None at 4/4 steps" in bug4
    assert "rnn." not in bug4 and "fc." not in bug4
    assert "cause='unused'" in bug4 or "cause=None" in bug4  # never a wrong cause
    bug5 = section("Bug 5")
    assert "4 of 10 trainable parameters received no gradient" in bug5
    for name in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
        assert f"encoder.{name}: None at 4/4 steps" in bug5
    assert "decoder." not in bug5
    assert "cause='detached'" in bug5 or "cause=None" in bug5


@pytest.mark.timeout(300)
@pytest.mark.parametrize("launch", ["torchrun", "python"])
def test_ddp_plain_names_the_unused_layer_and_the_rank_without_the_expert(tmp_path, launch):
    """Launched both ways its docstring says (torchrun; plain python, which spawns the two CPU processes itself);
    rank zero alone reports and warns."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONWARNINGS="ignore::DeprecationWarning", OMP_NUM_THREADS="1")
    for variable in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(variable, None)
    script = os.path.join(EXAMPLES, "ddp_plain.py")
    torchrun = ["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}"]
    runner = torchrun if launch == "torchrun" else []
    result = subprocess.run([sys.executable, *runner, script], cwd=str(tmp_path), env=env, capture_output=True,
                            text=True, timeout=240)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "missing: ['unused.weight', 'unused.bias']" in out
    assert "rank-dependent: expert.weight received no gradient on ranks [1] in 24 micro-batches" in out
    assert "unused.weight  6/6         24/24" in out
    assert out.count("GradGuardWarning") == 1  # one warning, from rank zero
    report = json.loads((tmp_path / "runs" / "ddp_plain" / "gradguard.json").read_text())
    assert report["distributed"]["world_size"] == 2 and report["distributed"]["strategy"] == "ddp"
