"""How long ``gradguard report`` takes, start to exit, as a CI gate runs it: a fresh process each time.

Times the whole command (interpreter start, imports, reading, printing) as a subprocess, ``--runs`` times per case,
and prints the median and the range:

* ``python``: ``python -c pass``, the floor any Python command pays;
* ``small``: a run directory holding the ``gradguard.json`` of an 8-parameter model;
* ``10k``: the ``gradguard.json`` of a 10,000-parameter model with 3,000 parameters missing (a 3 MB file; the full
  table is printed);
* ``events``: a run directory holding only TensorBoard event files (the report is read from the dashboard's text
  entry; this imports ``tensorboard``, never torch).

The target is under 1 s for a report file: the command imports neither torch nor Lightning.

Usage::

    python benchmarks/cli_latency.py                 # 7 runs per case
    python benchmarks/cli_latency.py --runs 3 --json out.json

"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lightning_gradguard.report import GradReport  # noqa: E402 - after the path, so this checkout is measured
from lightning_gradguard.report_text import REPORT_TAG, report_markdown  # noqa: E402

TARGET_S = 1.0


def _report(n_params: int, n_missing: int) -> GradReport:
    params = {}
    for i in range(n_params):
        missing = i >= n_params - n_missing
        params[f"layers.{i // 2}.{'weight' if i % 2 == 0 else 'bias'}"] = {
            "steps": 2,
            "none_steps": 2 if missing else 0,
            "micro_batches": 2,
            "none_micro_batches": 2 if missing else 0,
            "cause": "unused" if missing else None,
            "detail": f"module `layers.{i // 2}` (Linear) was never called in the forward pass" if missing else None,
        }
    return GradReport.from_dict({"steps": 2, "micro_batches": 2, "params": params})


def _event_run(directory: str, report: GradReport) -> None:
    """A run directory with only an event file, written by tensorboard's own writer (no torch)."""
    from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    text = report_markdown(report, "GradGuard report at the end of training").encode()
    tensor = tensor_pb2.TensorProto(
        dtype=7, string_val=[text], tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=[{"size": 1}])
    )
    metadata = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="text"))
    value = summary_pb2.Summary.Value(tag=f"{REPORT_TAG}/text_summary", tensor=tensor, metadata=metadata)
    writer = EventFileWriter(directory)
    writer.add_event(event_pb2.Event(wall_time=time.time(), step=2, summary=summary_pb2.Summary(value=[value])))
    writer.close()


def _time(command: list[str], runs: int, expected: int) -> list[float]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        result = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        times.append(time.perf_counter() - start)
        if result.returncode != expected:
            raise RuntimeError(f"{command} exited {result.returncode}: {result.stderr.decode()[-2000:]}")
    return times


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="runs per case (default 7); the median is reported")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)

    command = [sys.executable, "-m", "lightning_gradguard.cli", "report"]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        cases = {}
        for name, report in (("small", _report(8, 4)), ("10k", _report(10_000, 3_000))):
            os.makedirs(os.path.join(tmp, name))
            report.save(os.path.join(tmp, name))
            cases[name] = ([*command, os.path.join(tmp, name), "--fail-on-missing"], 1)
        os.makedirs(os.path.join(tmp, "events"))
        _event_run(os.path.join(tmp, "events"), _report(8, 4))
        cases["events"] = ([*command, os.path.join(tmp, "events")], 0)
        cases = {"python": ([sys.executable, "-c", "pass"], 0), **cases}
        print(f"{'case':<8} {'median':>8} {'min':>8} {'max':>8}   ({args.runs} runs, a fresh process each)")
        for name, (cmd, expected) in cases.items():
            _time(cmd, 1, expected)  # warm the file cache
            times = _time(cmd, args.runs, expected)
            median = statistics.median(times)
            results[name] = {"median_s": median, "min_s": min(times), "max_s": max(times), "runs": args.runs}
            print(f"{name:<8} {median:>7.3f}s {min(times):>7.3f}s {max(times):>7.3f}s")
    worst = max(results[name]["median_s"] for name in ("small", "10k"))
    verdict = "meets" if worst < TARGET_S else "MISSES"
    print(f"gradguard report on a gradguard.json: {worst:.3f} s (worse median), {verdict} the {TARGET_S:.0f} s target")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"target_s": TARGET_S, "cases": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
