"""The TensorBoard dashboard: layout, report text, histograms, gradient flow, read back by TensorBoard itself.

Event files are read with TensorBoard's ``EventAccumulator``; the last test starts a real ``tensorboard`` server
on a loopback port and reads the scalars, the custom-scalars layout and the report text from its HTTP endpoints.
"""

from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import warnings

import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from models import HealthyMLP, RegressionData
from plain_models import PLANTED, PlantedModule
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2

from lightning_gradguard import GradGuard, GradGuardError
from lightning_gradguard.output.sinks.pictures import gradient_flow_stats
from lightning_gradguard.output.sinks.tensorboard import dashboard_layout
from lightning_gradguard.report_text import report_from_text, report_markdown

HAS_MATPLOTLIB = __import__("importlib").util.find_spec("matplotlib") is not None
NAMES = {f"net.{n}" for n in PLANTED}


@pytest.fixture(autouse=True)
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def fit(make_trainer, tmp_path, module, n_batches=4, **guard_options):
    logger = TensorBoardLogger(str(tmp_path), name="run")
    guard = GradGuard(summary=False, **guard_options)
    trainer = make_trainer(callbacks=[guard], logger=logger, log_every_n_steps=1)
    trainer.fit(module, RegressionData(n_batches=n_batches))
    return guard, logger.log_dir


def read(log_dir: str) -> EventAccumulator:
    acc = EventAccumulator(log_dir, size_guidance={"tensors": 0, "images": 0, "histograms": 0, "scalars": 0})
    acc.Reload()
    return acc


def layout_of(acc: EventAccumulator) -> layout_pb2.Layout:
    layout = layout_pb2.Layout()
    layout.ParseFromString(acc.Tensors("custom_scalars__config__")[-1].tensor_proto.string_val[0])
    return layout


# ---------------------------------------------------------------------------------------------- layout
def test_layout_has_one_chart_per_top_level_module_and_regexes_match_only_its_tags():
    names = ["encoder.0.weight", "encoder.0.bias", "enc.weight", "head.weight", "scale"]
    layout = dashboard_layout(names, amp=True)
    assert list(layout) == [
        "GradGuard",
        "GradGuard: gradient norm by module",
        "GradGuard: steps without a gradient by module",
    ]
    assert "steps skipped by the AMP gradient scaler" in layout["GradGuard"]
    norms = layout["GradGuard: gradient norm by module"]
    assert list(norms) == ["encoder", "enc", "head", "(root)"]
    tags = [
        "gradguard/norm/encoder.0.weight",
        "gradguard/module_norm/encoder.0",
        "gradguard/module_norm/encoder",
        "gradguard/norm/enc.weight",
        "gradguard/norm/head.weight",
        "gradguard/norm/scale",
        "gradguard/none_steps/enc.weight",
    ]

    def matched(chart):
        regexes = chart[1]
        return [t for t in tags if any(re.match(r, t) for r in regexes)]  # TensorBoard uses re.match

    assert matched(norms["encoder"]) == tags[:3]
    assert matched(norms["enc"]) == ["gradguard/norm/enc.weight"]
    assert matched(norms["(root)"]) == ["gradguard/norm/scale"]
    nones = layout["GradGuard: steps without a gradient by module"]
    assert matched(nones["enc"]) == ["gradguard/none_steps/enc.weight"]
    assert "steps skipped by the AMP gradient scaler" not in dashboard_layout(names)["GradGuard"]


# ---------------------------------------------------------------------------------------------- trainer output
def test_trainer_run_writes_layout_report_text_and_json(make_trainer, tmp_path):
    guard, log_dir = fit(make_trainer, tmp_path, PlantedModule(), n_batches=4)
    acc = read(log_dir)
    layout = layout_of(acc)
    assert [c.title for c in layout.category] == [
        "GradGuard",
        "GradGuard: gradient norm by module",
        "GradGuard: steps without a gradient by module",
    ]
    assert [chart.title for chart in layout.category[1].chart] == ["net"]

    texts = acc.Tensors("gradguard/report/text_summary")
    assert [t.step for t in texts] == [0, 4]  # the first missing gradient, then the end of fit
    first, final = (t.tensor_proto.string_val[0].decode() for t in texts)
    assert first.startswith("### GradGuard: first missing gradient at step 0")
    assert "| parameter | None steps |" in final and all(f"| {n} |" in final for n in NAMES)
    assert report_from_text(first).steps == 1
    with open(os.path.join(log_dir, "gradguard.json")) as f:
        assert report_from_text(final).to_dict() == json.load(f) == guard.report().to_dict()
    if guard.report().params["net.side.weight"].cause == "detached":  # the diagnosis names the line
        assert "self.side(x).detach()" in final


def test_healthy_run_text_is_the_one_line_verdict(make_trainer, tmp_path):
    guard, log_dir = fit(make_trainer, tmp_path, HealthyMLP(), n_batches=3)
    texts = read(log_dir).Tensors("gradguard/report/text_summary")
    assert [t.step for t in texts] == [3]  # nothing went missing: only the end-of-fit entry
    text = texts[0].tensor_proto.string_val[0].decode()
    assert "all 6 trainable parameters received a gradient at each of 3 optimizer steps" in text


def test_strict_mode_writes_the_report_before_raising(make_trainer, tmp_path):
    logger = TensorBoardLogger(str(tmp_path), name="run")
    trainer = make_trainer(callbacks=[GradGuard(strict=True, summary=False)], logger=logger)
    with pytest.raises(GradGuardError):
        trainer.fit(PlantedModule(), RegressionData(n_batches=3))
    texts = read(logger.log_dir).Tensors("gradguard/report/text_summary")
    decoded = [t.tensor_proto.string_val[0].decode() for t in texts]
    assert any(text.startswith("### GradGuard stopped training at step 0") for text in decoded)


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="the gradient-flow image needs matplotlib (the plot extra)")
def test_histograms_and_gradient_flow_on_their_own_cadence(make_trainer, tmp_path):
    guard, log_dir = fit(
        make_trainer, tmp_path, PlantedModule(), n_batches=6, histogram_every_n_steps=2, gradient_flow_every_n_steps=3
    )
    acc = read(log_dir)
    histograms = set(acc.Tags()["histograms"])
    assert histograms == {f"gradguard/grad_hist/net.{n}" for n in ("encoder.weight", "encoder.bias", "head.weight",
                                                                   "head.bias")}
    assert [h.step for h in acc.Histograms("gradguard/grad_hist/net.head.weight")] == [1, 3, 5]
    head = acc.Histograms("gradguard/grad_hist/net.head.weight")[0].histogram_value
    assert head.num == 8  # every element of the (1, 8) gradient

    images = acc.Images("gradguard/gradient_flow")
    assert [i.step for i in images] == [0, 2, 5]  # the first missing gradient, then every 3rd step
    from PIL import Image

    picture = Image.open(io.BytesIO(images[0].encoded_image_string))
    assert picture.size == (images[0].width, images[0].height) and picture.width >= 600


def test_gradient_flow_stats_mean_max_and_missing():
    # per parameter: L1 norm, max |g| and element count as the engine measures them; b.weight had no gradient
    names = ["a.weight", "b.weight", "a.bias"]
    l1, peak, numel, missing = [4.0, 0.0, 2.0], [3.0, 0.0, 2.0], [2, 0, 1], [False, True, False]
    labels, means, maxes, flags = gradient_flow_stats(names, l1, peak, numel, missing)
    assert labels == ["a.weight", "b.weight", "a.bias"]
    assert means == pytest.approx([2.0, 0.0, 2.0])
    assert maxes == pytest.approx([3.0, 0.0, 2.0])
    assert flags == [False, True, False]
    # more parameters than bars: grouped by module, a module with a missing parameter says how many
    labels, means, maxes, flags = gradient_flow_stats(names, l1, peak, numel, missing, max_bars=2)
    assert labels == ["a", "b (1 missing)"]
    assert means == pytest.approx([(4.0 + 2.0) / 3, 0.0]) and maxes == pytest.approx([3.0, 0.0])
    assert flags == [False, True]


def test_engine_measures_the_gradient_flow_statistics():
    """The dashboard's statistics come from the engine's measurement: mean and max |g| of the gradients."""
    from lightning_gradguard.core.measure import StatsRequest, measure_stats

    grads = [torch.tensor([[1.0, -3.0]]), None, torch.tensor([-2.0])]
    stats = measure_stats(StatsRequest(flow=True, histograms=[("a", [0, 2])]), [0, 1, 2], grads)
    indices, l1, peak, numel = stats.flow
    assert indices == [0, 2] and l1.tolist() == [4.0, 2.0] and peak.tolist() == [3.0, 2.0] and numel == [2, 1]
    (name, packed), = stats.histograms
    low, high, count, total, squares = packed[:5].tolist()
    assert name == "a" and (low, high, count, total, squares) == (-3.0, 1.0, 3.0, -4.0, 14.0)
    assert packed[5:].sum().item() == 3


def test_report_markdown_round_trips_and_hides_the_json():
    from lightning_gradguard.report import GradReport, ParamReport

    report = GradReport(2, 4, {"x.weight": ParamReport(2, 2, 4, 4, cause="unused", detail="a --> b <tricky>")})
    text = report_markdown(report, "title")
    assert text.startswith("### title\n\n")
    comment = text[text.index("<!-- gradguard-report-json") :]
    assert comment.count("-->") == 1  # a "-->" inside the report cannot end the comment early
    assert report_from_text(text).to_dict() == report.to_dict()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"histogram_every_n_steps": 0}, ValueError, "histogram_every_n_steps"),
        ({"histogram_every_n_steps": "2"}, TypeError, "histogram_every_n_steps"),
        ({"gradient_flow_every_n_steps": -3}, ValueError, "gradient_flow_every_n_steps"),
        ({"gradient_flow_every_n_steps": 1.5}, TypeError, "gradient_flow_every_n_steps"),
    ],
)
def test_dashboard_options_are_validated(kwargs, error, match):
    with pytest.raises(error, match=match):
        GradGuard(**kwargs)


def test_gradient_flow_without_matplotlib_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'lightning-gradguard\[plot\]'"):
        GradGuard(gradient_flow_every_n_steps=10)
    GradGuard(histogram_every_n_steps=10)  # histograms need no matplotlib


# ---------------------------------------------------------------------------------------------- a real TensorBoard
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(port: int, path: str, **params) -> object:
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}{query}", timeout=10) as response:
        return json.loads(response.read().decode())


@pytest.mark.slow
def test_tensorboard_server_serves_scalars_layout_and_report(make_trainer, tmp_path):
    guard, log_dir = fit(make_trainer, tmp_path / "logs", PlantedModule(), n_batches=4)
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(tmp_path / "logs"), "--host", "127.0.0.1",
         "--port", str(port), "--load_fast=false", "--reload_interval", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        run, tags = None, {}
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert server.poll() is None, server.stderr.read().decode()
            try:
                tags = _get(port, "/data/plugin/scalars/tags")
            except OSError:  # not listening yet
                tags = {}
            if tags and any("gradguard/total_norm" in t for t in tags.values()):
                run = next(iter(tags))
                break
            time.sleep(0.5)
        assert run is not None, "TensorBoard did not serve the run in time"
        assert {f"gradguard/none_steps/{n}" for n in NAMES} <= set(tags[run])

        layout = _get(port, "/data/plugin/custom_scalars/layout")
        titles = [c["title"] for c in layout["category"]]
        assert titles[0] == "GradGuard" and titles[1] == "GradGuard: gradient norm by module"
        net_chart = layout["category"][1]["chart"][0]
        assert net_chart["title"] == "net"
        series = _get(port, "/data/plugin/custom_scalars/scalars", run=run, tag=net_chart["multiline"]["tag"][0])
        assert series["regex_valid"]
        assert set(series["tag_to_events"]) == {f"gradguard/norm/net.{n}" for n in ("encoder.weight", "encoder.bias",
                                                                                     "head.weight", "head.bias")}
        assert [event[1] for event in series["tag_to_events"]["gradguard/norm/net.head.bias"]] == [0, 1, 2, 3]

        text_tags = _get(port, "/data/plugin/text/tags")
        (text_tag,) = text_tags[run]
        assert text_tag.startswith("gradguard/report")
        entries = _get(port, "/data/plugin/text/text", run=run, tag=text_tag)
        assert [e["step"] for e in entries] == [0, 4]
        html = entries[-1]["text"]
        assert "<th>parameter</th>" in html and "<td>net.unused.weight</td>" in html
        assert "gradguard-report-json" not in html  # the embedded JSON is not shown
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_amp_run_layout_has_the_skipped_steps_chart(make_trainer, tmp_path):
    from lightning.pytorch.plugins.precision import MixedPrecision

    logger = TensorBoardLogger(str(tmp_path), name="run")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    trainer = make_trainer(
        callbacks=[GradGuard(summary=False)], logger=logger, log_every_n_steps=1,
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
    )  # fmt: skip
    trainer.fit(HealthyMLP(), RegressionData(n_batches=2))
    acc = read(logger.log_dir)
    overview = [chart.title for chart in layout_of(acc).category[0].chart]
    assert "steps skipped by the AMP gradient scaler" in overview
    if "gradguard/amp_skipped_steps" in acc.Tags()["scalars"]:  # written by the callback's precision context
        chart = next(c for c in layout_of(acc).category[0].chart if c.title.startswith("steps skipped"))
        assert re.match(chart.multiline.tag[0], "gradguard/amp_skipped_steps")
