"""The code in README.md and docs/*.md stays true: every Python block compiles, and the runnable ones run.

A block is runnable when the line before its opening fence is a comment of this form (see docs/development.md):

    <!-- runnable: prelude="lightning" expect="['unused.weight', 'unused.bias']" -->

It then runs as a script in a fresh subprocess, in an empty directory, after the named prelude (a model the reader
would bring), must exit with status 0, and must print the expected text (what a user would look for: the planted
parameter named).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
_MARKER = re.compile(r"^\s*<!--\s*runnable(?P<attrs>.*?)-->\s*$")
_ATTR = re.compile(r'(\w+)="([^"]*)"')

# Code run before a block that uses objects the reader brings. Each defines what docs/development.md says it does.
_LIGHTNING = '''
import torch
import torch.nn.functional as F
from lightning import LightningModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Model(LightningModule):
    def __init__(self):
        super().__init__()
        self.encoder, self.head = nn.Linear(4, 8), nn.Linear(8, 1)
        self.unused = nn.Linear(8, 8)  # a planted bug: never called

    def forward(self, x):
        return self.head(torch.tanh(self.encoder(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


model = Model()
datamodule = DataLoader(TensorDataset(torch.randn(64, 4), torch.randn(64, 1)), batch_size=8)
'''

_FITTED = _LIGHTNING + '''
from lightning import Trainer
from lightning_gradguard import GradGuard

guard = GradGuard()
Trainer(max_epochs=1, callbacks=[guard], enable_progress_bar=False).fit(model, datamodule)
'''

_ENGINE = '''
import torch
from torch import nn


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.used, self.unused = nn.Linear(4, 1), nn.Linear(4, 1)

    def forward(self, x):
        return self.used(x)


model = Model()
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
data = [torch.randn(8, 4) for _ in range(3)]
'''

PRELUDES = {"lightning": _LIGHTNING, "fitted": _FITTED, "engine": _ENGINE}


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    code: str
    runnable: bool
    prelude: str
    expect: str

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def python_blocks(path: Path) -> list[Block]:
    """The top-level ```python blocks of a Markdown file (a block shown inside another fence is text, not code)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if not opening or (opening["fence"][0] == "`" and "`" in opening["info"]):  # inline code, as in CommonMark
            i += 1
            continue
        fence, indent, info = opening["fence"], len(opening["indent"]), opening["info"].split()
        closing = re.compile(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        end = i + 1
        while end < len(lines) and not closing.match(lines[end]):
            end += 1
        if info[:1] == ["python"]:
            marker = _MARKER.match(lines[i - 1]) if i > 0 else None
            attrs = dict(_ATTR.findall(marker["attrs"])) if marker else {}
            unknown = set(attrs) - {"prelude", "expect"}
            assert not unknown, f"{path.name}:{i + 1}: unknown runnable attribute(s) {sorted(unknown)}"
            body = "\n".join(line[indent:] for line in lines[i + 1 : end])
            blocks.append(Block(path, i + 1, body + "\n", marker is not None, attrs.get("prelude", ""),
                                attrs.get("expect", "")))
        i = end + 1
    return blocks


ALL_BLOCKS = [block for path in DOCUMENTS for block in python_blocks(path)]
RUNNABLE = [block for block in ALL_BLOCKS if block.runnable]


@pytest.mark.parametrize("block", ALL_BLOCKS, ids=lambda b: b.id)
def test_python_block_compiles(block: Block) -> None:
    try:
        compile(block.code, block.id, "exec")
    except SyntaxError as err:
        pytest.fail(f"{block.id}: the ```python block does not compile ({err}); "
                    "use ```text for output and ```bash for shell commands")


@pytest.mark.slow
@pytest.mark.parametrize("block", RUNNABLE, ids=lambda b: b.id)
def test_runnable_block_runs_and_shows_what_the_page_says(tmp_path: Path, block: Block) -> None:
    assert block.prelude in ("", *PRELUDES), f"{block.id}: unknown prelude {block.prelude!r}; known: {sorted(PRELUDES)}"
    script = tmp_path / "snippet.py"
    script.write_text(PRELUDES.get(block.prelude, "") + "\n" + block.code, encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, f"{block.id} failed:\n{done.stderr[-3000:]}"
    assert block.expect in done.stdout + done.stderr, (
        f"{block.id}: expected {block.expect!r} in its output; it printed:\n{(done.stdout + done.stderr)[-3000:]}"
    )


@pytest.mark.parametrize(
    ("page", "expected"),
    [
        ("docs/plain-pytorch.md", "['unused.weight', 'unused.bias']"),  # watch() in a hand-written loop
        ("docs/fabric.md", "unused.weight"),  # watch_fabric
        ("docs/huggingface.md", "model.enable_input_require_grads()"),  # GradGuardCallback in the HF Trainer
        ("docs/pytorch-lightning.md", "unused.weight"),  # lightning_gradguard.pl
        ("docs/architecture.md", "unused.weight, unused.bias"),  # the engine driven directly
        ("docs/getting-started.md", "unused.weight"),  # the Trainer callback
        ("README.md", "unused.weight"),
    ],
)
def test_each_way_of_using_gradguard_has_a_runnable_example(page: str, expected: str) -> None:
    """The examples users copy first are among the blocks that run, so none of them can silently stop being tested."""
    runs = [block for block in RUNNABLE if block.path == ROOT / page]
    assert runs, f"{page} has no runnable python block"
    assert any(expected in block.expect for block in runs), f"no runnable block of {page} expects {expected!r}"


def test_runnable_marker_is_never_ignored() -> None:
    """A `runnable` comment that is not right before a ```python fence would silently run nothing."""
    for path in DOCUMENTS:
        lines = path.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines):
            if _MARKER.match(line):
                following = lines[number + 1] if number + 1 < len(lines) else ""
                assert re.match(r"^\s*`{3,}python\s*$", following), (
                    f"{path.name}:{number + 1}: a runnable comment must be followed directly by a ```python fence"
                )


def test_report_tables_in_the_docs_have_the_columns_gradguard_prints():
    """An output example is only as good as its likeness: every report table quoted in the docs has the header that
    ``GradReport.format_table`` writes today."""
    from lightning_gradguard.report import GradReport, ParamReport

    report = GradReport(1, 1, {"a": ParamReport(steps=1, none_steps=1, micro_batches=1, none_micro_batches=1)}, [])
    printed = next(line for line in report.format_table().splitlines() if line.startswith("parameter "))
    columns = re.split(r"\s{2,}", printed.strip())
    stale = []
    for document in DOCUMENTS:
        for number, line in enumerate(document.read_text(encoding="utf-8").splitlines(), 1):
            if line.startswith("parameter ") and "None steps" in line and re.split(r"\s{2,}", line.strip()) != columns:
                stale.append(f"{document.name}:{number}")
    assert stale == []
