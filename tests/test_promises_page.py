"""docs/promises.md stays true: every test it names exists, and the page is in the documentation's table of contents."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "promises.md"
_REFERENCE = re.compile(r"`(tests/[\w/]+\.py)(?:::(\w+))?`")


def _tests_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


def test_every_test_the_promises_page_names_exists():
    references = _REFERENCE.findall(PAGE.read_text(encoding="utf-8"))
    assert len(references) > 50
    missing = []
    for file, name in references:
        path = ROOT / file
        if not path.is_file():
            missing.append(file)
        elif name and name not in _tests_in(path):
            missing.append(f"{file}::{name}")
    assert missing == [], f"docs/promises.md names tests that do not exist: {missing}"


def test_every_promise_has_a_section_with_tests():
    text = PAGE.read_text(encoding="utf-8")
    sections = re.split(r"^## ", text, flags=re.M)[1:]
    titles = [s.splitlines()[0] for s in sections]
    assert titles == [
        "No false alarms",
        "The user's run and exceptions survive GradGuard",
        "Ranks decide together",
        "Exit codes mean what they say",
        "Bounded memory and output",
        "Atomic report files",
        "Bad input gets a clear error",
    ]
    for title, section in zip(titles, sections):
        assert _REFERENCE.search(section), f"the promise {title!r} names no test"


def test_the_page_is_in_the_table_of_contents():
    index = (ROOT / "docs" / "index.md").read_text(encoding="utf-8")
    toctree = index[index.index("```{toctree}") :]
    assert re.search(r"^promises$", toctree, flags=re.M)
