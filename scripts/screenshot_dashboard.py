"""Take the README's dashboard screenshots in headless Chromium (not run by CI).

Runs the buggy encoder-decoder RNN of ``examples/plain_pytorch.py`` (an unused layer and a detached encoder, with
gradient accumulation) into a fresh log directory, starts TensorBoard on it, and photographs two of its tabs:

* ``docs/dashboard.png``: Custom Scalars, GradGuard's layout (total norm, None and non-finite counts, norms and
  None counts by top-level module);
* ``docs/dashboard_report.png``: Text, the report (causes with source lines, the table, hints).

It also saves the last gradient-flow picture of the run, as TensorBoard's Images tab shows it, at full size:
``docs/gradient_flow.png``.

Needs TensorBoard (a dependency), matplotlib (the ``plot`` extra) and Chromium (Debian:
``apt-get install -y chromium chromium-driver``)::

    python scripts/screenshot_dashboard.py [--out docs] [--steps 40] [--keep-logs DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHOTS = (
    # (file name, TensorBoard tab, window size, virtual time in ms for the single-page app to fetch and draw)
    ("dashboard.png", "custom_scalars", (1500, 1250), 20000),
    ("dashboard_report.png", "text", (1500, 1000), 15000),
)
FLOW_TAG = "gradguard/gradient_flow"

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


def write_run(log_dir: str, steps: int) -> None:
    """Train the example's buggy model with GradGuard writing its dashboard to ``log_dir``."""
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import warnings

    import plain_pytorch

    warnings.simplefilter("ignore", UserWarning)
    with contextlib.redirect_stdout(io.StringIO()):
        plain_pytorch.real_bugs(steps=steps, accumulate=4, log_dir=log_dir)


def save_gradient_flow(log_dir: str, out: str) -> None:
    """Write the run's last gradient-flow image (PNG bytes as logged) to ``out``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir, size_guidance={"images": 0})
    acc.Reload()
    with open(out, "wb") as f:
        f.write(acc.Images(FLOW_TAG)[-1].encoded_image_string)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_run(port: int, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/plugin/scalars/tags", timeout=5) as response:
                tags = json.loads(response.read().decode())
            if any("gradguard/total_norm" in run_tags for run_tags in tags.values()):
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError("TensorBoard did not serve the run in time")


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise SystemExit("Chromium not found: apt-get install -y chromium chromium-driver")


def screenshot(browser: str, url: str, out: str, size: tuple[int, int], budget_ms: int) -> None:
    with tempfile.TemporaryDirectory() as profile:
        command = [
            browser,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            f"--window-size={size[0]},{size[1]}",
            f"--virtual-time-budget={budget_ms}",
            f"--screenshot={out}",
            url,
        ]
        subprocess.run(command, check=True, capture_output=True, timeout=180)
    if not os.path.isfile(out) or os.path.getsize(out) < 10_000:
        raise RuntimeError(f"Chromium wrote no usable screenshot to {out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "docs"), help="where the PNG files go (default: docs/)")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps of the example run (default: 40)")
    parser.add_argument("--keep-logs", help="write the TensorBoard run here and keep it (default: a temp dir)")
    args = parser.parse_args(argv)

    browser = chromium()
    os.makedirs(args.out, exist_ok=True)
    logs = args.keep_logs or tempfile.mkdtemp(prefix="gradguard_dashboard_")
    write_run(os.path.join(logs, "plain_pytorch"), args.steps)
    flow = os.path.join(args.out, "gradient_flow.png")
    save_gradient_flow(os.path.join(logs, "plain_pytorch"), flow)
    print(f"wrote {flow}")
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", logs, "--host", "127.0.0.1", "--port", str(port),
         "--load_fast=false"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_run(port)
        for name, tab, size, budget in SHOTS:
            out = os.path.join(args.out, name)
            screenshot(browser, f"http://127.0.0.1:{port}/#{tab}", out, size, budget)
            print(f"wrote {out}")
    finally:
        server.terminate()
        server.wait(timeout=30)
        if not args.keep_logs:
            shutil.rmtree(logs, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
