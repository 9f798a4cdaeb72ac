"""The README's runnable snippets run as written (the README stays true)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _first_python_block(heading: str) -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(heading)
    match = re.search(r"```python\n(.*?)```", text[start:], re.S)
    assert match, f"no python block after {heading!r}"
    return match.group(1)


# the engine snippet uses a model, an optimizer and data the reader brings: a small stand-in for each
ENGINE_PRELUDE = """
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
"""


@pytest.mark.parametrize(
    ("heading", "prelude", "expected"),
    [
        ("## Plain PyTorch loops", "", "['unused.weight', 'unused.bias']"),
        ("## Lightning Fabric", "", "unused.weight"),
        ("## The older `pytorch_lightning` package", "", "unused.weight"),
        ("## How it works", ENGINE_PRELUDE, "unused.weight, unused.bias"),
    ],
)
def test_readme_snippet_runs_and_finds_the_planted_bug(tmp_path, heading, prelude, expected):
    script = tmp_path / "snippet.py"
    script.write_text(prelude + _first_python_block(heading), encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert expected in done.stdout + done.stderr
