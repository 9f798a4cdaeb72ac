"""Nothing GradGuard keeps grows with the number of steps: the memory its own code holds, measured with tracemalloc
after a warm-up (``benchmarks/memory.py``), under the Trainer and in a plain loop, for a small and a big model."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import memory  # noqa: E402 - the benchmark's own measurement

pytestmark = pytest.mark.slow  # thousands of steps under tracemalloc

KIB = 1024


@pytest.mark.parametrize("loop", ["trainer", "watch"])
def test_a_small_model_over_2000_steps_keeps_under_64_kib(tmp_path, loop):
    grown = memory.LOOPS[loop](200, 2000, 100, str(tmp_path))
    assert grown < 64 * KIB, f"{grown / KIB:.1f} KiB"


@pytest.mark.parametrize("loop", ["trainer", "watch"])
def test_a_10000_tensor_model_over_300_steps_keeps_under_1_mib(tmp_path, loop):
    grown = memory.LOOPS[loop](10_000, 300, 30, str(tmp_path))
    assert grown < 1024 * KIB, f"{grown / KIB:.1f} KiB"
