"""What keeps the package's structure honest: one declaration of the options, no module writing another object's
private attributes, modules of one concept, and an import that does not pull in the Lightning stack."""

from __future__ import annotations

import ast
import inspect
import os
import subprocess
import sys
import typing
from dataclasses import fields

import pytest

from lightning_gradguard.adapters.lightning import GradGuard
from lightning_gradguard.config import GuardConfig

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lightning_gradguard")
MAX_LINES = 460  # "about 400": a module past this is doing more than one thing


def modules() -> list[str]:
    return sorted(
        os.path.join(root, name) for root, _, names in os.walk(PACKAGE) for name in names if name.endswith(".py")
    )


def test_gradguard_signature_is_the_option_declaration():
    """GradGuard spells out its options for LightningCLI and IDEs; they must be exactly GuardConfig's."""
    parameters = list(inspect.signature(GradGuard.__init__).parameters.values())[1:]
    declared = fields(GuardConfig)
    assert [p.name for p in parameters] == [f.name for f in declared]
    for parameter, field in zip(parameters, declared):
        default = field.default
        assert parameter.default == default or (parameter.default == () and default == ()), parameter.name
    hints = typing.get_type_hints(GradGuard.__init__)
    for name in ("nonfinite_check", "log_granularity"):  # choices a YAML config is validated against
        assert typing.get_origin(hints[name]) is typing.Literal, name


# writes into another framework's objects, on purpose: a LightningModule run without a Trainer by check_gradients
# gets the attribute Lightning's own Fabric integration sets (and gets the old value back afterwards)
FOREIGN = {"preflight.py": {"model._fabric_optimizers"}}


def test_no_module_writes_another_objects_private_attribute():
    """State has one owner: only an object's own methods write its `_private` attributes."""
    offenders = []
    for path in modules():
        tree = ast.parse(open(path, encoding="utf-8").read())
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else (
                [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
            )
            for target in targets:
                for sub in ast.walk(target):
                    if (isinstance(sub, ast.Attribute) and sub.attr.startswith("_") and not sub.attr.startswith("__")
                            and not (isinstance(sub.value, ast.Name) and sub.value.id in ("self", "cls"))
                            and ast.unparse(sub) not in FOREIGN.get(os.path.relpath(path, PACKAGE), ())):
                        offenders.append(f"{os.path.relpath(path, PACKAGE)}:{node.lineno}: {ast.unparse(target)}")
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr"
                    and len(node.args) > 1 and isinstance(node.args[1], ast.Constant)
                    and str(node.args[1].value).startswith("_")):
                offenders.append(f"{os.path.relpath(path, PACKAGE)}:{node.lineno}: {ast.unparse(node)}")
    assert offenders == []


def test_modules_stay_small():
    sizes = {os.path.relpath(path, PACKAGE): sum(1 for _ in open(path, encoding="utf-8")) for path in modules()}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}


@pytest.mark.slow
def test_the_plain_loop_import_leaves_the_lightning_trainer_out():
    """`from lightning_gradguard import watch` must not pay for the Lightning Trainer (seconds of imports)."""
    code = (
        "import sys; from lightning_gradguard import watch, check_gradients, GradReport; "
        "print(sorted(m for m in sys.modules if m.startswith(('lightning.pytorch', 'pytorch_lightning'))))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


ROOT = os.path.dirname(PACKAGE)
SHIPPED_TEXT = ("README.md", "CHANGELOG.md", "docs", "examples", "lightning_gradguard", "benchmarks")


def shipped_text_files() -> list[str]:
    found = []
    for entry in SHIPPED_TEXT:
        path = os.path.join(ROOT, entry)
        if os.path.isfile(path):
            found.append(path)
            continue
        for root, dirs, names in os.walk(path):
            dirs[:] = [d for d in dirs if not d.startswith(("_", "."))]
            found += [os.path.join(root, n) for n in names if n.endswith((".py", ".md", ".sh", ".txt", ".toml"))]
    return found


def test_what_ships_refers_only_to_files_a_user_has():
    """A user reading the code or the docs can open every Markdown file they name, and no text refers to a
    numbered work item or a directory outside the project."""
    import re

    existing = {name for _, _, names in os.walk(ROOT) for name in names if name.endswith(".md")}
    # a bare file name ending in .md, not part of a URL or a path that the text spells out in full
    mention = re.compile(r"(?<![\w/.-])([\w-]+\.md)\b")
    problems = []
    for path in shipped_text_files():
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        for name in mention.findall(text):
            if name not in existing:
                problems.append(f"{os.path.relpath(path, ROOT)} names {name}, which the project does not have")
        if re.search(r"\(issue [0-9]|\bshared/", text, re.IGNORECASE):
            problems.append(f"{os.path.relpath(path, ROOT)} refers to a work item or to a directory outside it")
    assert problems == []
