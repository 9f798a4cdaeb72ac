"""Where in the user's code something happened: stack frames turned into ``model.py:42 in forward: `h = h.detach()```.

A missing gradient is cut off in one line of the user's code, but the operation that cuts it runs deep inside
``torch`` (a ``Linear`` inside a ``Sequential`` inside the user's ``forward``). :func:`user_frames` walks the
Python stack outward from that operation, skipping PyTorch's own frames, and keeps the user's. It also says when
the operation ran on behalf of the framework (Lightning's own ``loss.detach()``, GradGuard itself) or an
optimizer's ``step()``, which are never the user's bug, and when it ran inside a reentrant
``torch.utils.checkpoint`` segment.

:func:`grad_disabling_statement` finds the ``with torch.no_grad():`` (``inference_mode``, ``set_grad_enabled
(False)``, or the decorator) around a line, from the file's syntax tree, so that a ``no_grad`` cause points at
the statement that turned autograd off rather than at a layer call inside it.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import io
import linecache
import os
import re
import sys
import sysconfig
import textwrap
import tokenize
from dataclasses import dataclass
from types import CodeType, FrameType
from typing import Any, Optional

import torch

# what a frame belongs to
USER = 0
INTERNAL = 1  # PyTorch and the Python standard library: transparent, look further out
FRAMEWORK = 2  # Lightning, torchmetrics, GradGuard: an operation started here is not the user's
OPTIMIZER = 3  # torch.optim: an optimizer step touches every parameter under no_grad, by design
CHECKPOINT = 4  # the forward of a reentrant torch.utils.checkpoint segment (CheckpointFunction.forward)
FUNCTION = 5  # torch.autograd.Function.apply: a custom Function's forward runs with autograd off, by design

Frame = tuple[str, int, str]  # (filename, line number, function name)

_MAX_DEPTH = 256


def _package_dir(name: str) -> Optional[str]:
    """Where package ``name`` is installed, found without importing it (importing Lightning takes seconds)."""
    module = sys.modules.get(name)
    path = getattr(module, "__file__", None) if module is not None else None
    if path is None:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):  # an optional framework that is not installed
            return None
        path = spec.origin if spec is not None else None
    return os.path.dirname(os.path.abspath(path)) + os.sep if path else None


def _stdlib_dirs() -> tuple[str, ...]:
    dirs = set()
    for key in ("stdlib", "platstdlib"):
        path = sysconfig.get_paths().get(key)
        if path:
            dirs.add(os.path.abspath(path) + os.sep)
    return tuple(dirs)


# GradGuard's own frames are never the user's: the package root, three levels above this file
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))) + os.sep
_TORCH_DIR = _package_dir("torch") or ""
_OPTIM_DIR = os.path.join(_TORCH_DIR, "optim") + os.sep
_CHECKPOINT_FILE = os.path.join(_TORCH_DIR, "utils", "checkpoint.py")
_FUNCTION_FILE = os.path.join(_TORCH_DIR, "autograd", "function.py")
_FRAMEWORK_DIRS = tuple(
    d
    for d in (_package_dir(n) for n in ("lightning", "lightning_fabric", "pytorch_lightning", "torchmetrics"))
    if d
) + (_PACKAGE_DIR,)
_STDLIB_DIRS = _stdlib_dirs()
_kinds: dict[CodeType, int] = {}


def frame_kind(code: CodeType) -> int:
    """What the code object of a frame belongs to (cached per code object)."""
    kind = _kinds.get(code)
    if kind is None:
        kind = _kinds[code] = _classify(code)
    return kind


def _classify(code: CodeType) -> int:
    return _classify_path(code.co_filename, getattr(code, "co_qualname", code.co_name))


def _classify_path(path: str, qualname: str) -> int:
    if path.startswith("<frozen"):
        return INTERNAL
    path = os.path.abspath(path) if not path.startswith("<") else path
    if _TORCH_DIR and path.startswith(_TORCH_DIR):
        if path == _CHECKPOINT_FILE and qualname in ("CheckpointFunction.forward", "forward"):
            return CHECKPOINT
        if path == _FUNCTION_FILE and qualname in ("Function.apply", "apply"):
            return FUNCTION
        if path.startswith(_OPTIM_DIR):
            return OPTIMIZER
        return INTERNAL
    if path.startswith(_FRAMEWORK_DIRS):
        return FRAMEWORK
    if path.startswith(_STDLIB_DIRS) and "-packages" not in path:
        return INTERNAL
    return USER


IN_FUNCTION: tuple[list[Frame], Optional[int]] = ([], None)  # returned (by identity) for custom Function forwards


def user_frames(
    frame: Optional[FrameType], limit: int = 6, find_checkpoint: bool = False
) -> Optional[tuple[list[Frame], Optional[int]]]:
    """The user's frames around an operation, innermost first, and where a reentrant checkpoint segment starts.

    Args:
        frame: the frame that called the operation (or the innermost frame to look at).
        limit: how many user frames to keep.
        find_checkpoint: keep walking outward to learn whether the operation ran inside a reentrant
            ``torch.utils.checkpoint`` segment (only needed for operations that ran with autograd off).

    Returns:
        ``None`` when the operation was started by the framework or an optimizer step (not the user's code);
        otherwise ``(frames, checkpoint)``: up to ``limit`` user frames, innermost first, and, when the operation
        ran inside a reentrant checkpoint segment, the index in ``frames`` of the user frame that called
        ``checkpoint(...)`` (``None`` otherwise; ``frames`` is extended to include it). With ``find_checkpoint``,
        an operation inside the forward of a custom ``torch.autograd.Function`` returns :data:`IN_FUNCTION`:
        autograd is off there by design and the Function records the graph as a whole.

    """
    frames: list[Frame] = []
    in_checkpoint = False
    depth = 0
    while frame is not None and depth < _MAX_DEPTH:
        depth += 1
        code = frame.f_code
        kind = frame_kind(code)
        if kind == USER:
            if in_checkpoint:  # the first user frame outside the segment: the line that called checkpoint()
                frames.append((code.co_filename, frame.f_lineno, code.co_name))
                return frames, len(frames) - 1
            if len(frames) < limit:
                frames.append((code.co_filename, frame.f_lineno, code.co_name))
            elif not find_checkpoint:
                break
        elif kind == CHECKPOINT:
            if find_checkpoint and _segment_has_grad_input(frame):
                # the segment runs its forward without autograd by design and recomputes it in backward with
                # autograd on, as a custom Function records its graph as a whole: a use, not a cut
                return IN_FUNCTION
            in_checkpoint = True
        elif kind == FUNCTION and not in_checkpoint and find_checkpoint:
            return IN_FUNCTION
        elif not frames and kind in (FRAMEWORK, OPTIMIZER):
            return None
        frame = frame.f_back
    return frames, None


def _segment_has_grad_input(frame: FrameType) -> bool:
    """Whether a reentrant checkpoint segment (``CheckpointFunction.forward(ctx, run_function, preserve_rng_state,
    *args)``) was given a tensor that requires grad: only without one does it cut its parameters off."""
    try:
        args = frame.f_locals.get("args", ())
        return any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
    except Exception:  # noqa: BLE001 - another torch release's frame: assume the pitfall, as before
        return False


@dataclass(frozen=True)
class Location:
    """A line of the user's code."""

    filename: str
    lineno: int
    function: str

    @property
    def source(self) -> str:
        """The line's code, without its trailing comment."""
        return _without_comment(linecache.getline(self.filename, self.lineno)).strip()

    def __str__(self) -> str:
        text = f"{os.path.basename(self.filename)}:{self.lineno} in {self.function}"
        source = self.source
        return f"{text}: `{source}`" if source else text


def _without_comment(line: str) -> str:
    if "#" not in line:
        return line
    try:
        for token in tokenize.generate_tokens(io.StringIO(line.lstrip()).readline):
            if token.type == tokenize.COMMENT:
                return line.lstrip()[: token.start[1]]
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass
    return line


def location(frame: Frame) -> Location:
    return Location(frame[0], frame[1], frame[2])


# ---------------------------------------------------------------------- the statement that turned autograd off
_DISABLES_GRAD = re.compile(r"\b(no_grad|inference_mode)\b|\bset_grad_enabled\(\s*(False|0)\s*\)")
_Span = tuple[int, int, int]  # (first line, last line, line of the statement or decorator)
_spans: dict[str, Optional[list[_Span]]] = {}


def _grad_disabling_spans(filename: str) -> Optional[list[_Span]]:
    if filename in _spans:
        return _spans[filename]
    spans: Optional[list[_Span]] = None
    lines = linecache.getlines(filename)
    if lines:
        try:
            tree = ast.parse("".join(lines))
        except (SyntaxError, ValueError):
            tree = None
        if tree is not None:
            spans = []
            for node in ast.walk(tree):
                if isinstance(node, (ast.With, ast.AsyncWith)):
                    for item in node.items:
                        if _DISABLES_GRAD.search(ast.unparse(item.context_expr)):
                            spans.append((node.lineno, node.end_lineno or node.lineno, node.lineno))
                            break
                elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    for decorator in node.decorator_list:
                        if _DISABLES_GRAD.search(ast.unparse(decorator)):
                            spans.append((node.lineno, node.end_lineno or node.lineno, decorator.lineno))
                            break
    _spans[filename] = spans
    return spans


def grad_disabling_statement(frames: list[Frame]) -> Optional[Location]:
    """The innermost ``with torch.no_grad():``-like statement (or decorator) around any of ``frames``' lines.

    ``frames`` are searched innermost first; the first frame whose line sits inside such a block wins.
    """
    for filename, lineno, function in frames:
        spans = _grad_disabling_spans(filename)
        inside = [span for span in spans or () if span[0] <= lineno <= span[1]]
        if inside:
            innermost = max(inside, key=lambda span: span[0])
            return Location(filename, innermost[2], function)
    return None


# ---------------------------------------------------------------------- where a module attribute was defined
_definitions: dict[tuple[type, str], Optional[Location]] = {}
_REGISTERING_CALLS = ("register_parameter", "register_module", "add_module", "register_buffer")


def definition_site(root: Any, dotted_name: str) -> Optional[Location]:
    """The line of the user's code that assigned ``dotted_name`` (a module or parameter path under ``root``).

    ``encoder.attention`` is looked up as ``self.attention = ...`` (or ``self.register_module("attention", ...)``)
    in the classes of ``root.encoder``; indices of containers (``blocks.3``) fall back to the container's own
    assignment. ``None`` when the assignment is not in the user's source (a library class, dynamic ``setattr``).
    """
    parts = [p for p in dotted_name.split(".") if p]
    while parts and parts[-1].isdigit():
        parts.pop()
    if not parts:
        return None
    try:
        parent = root.get_submodule(".".join(parts[:-1])) if len(parts) > 1 else root
    except (AttributeError, ValueError):
        return None
    attr = parts[-1]
    for cls in type(parent).__mro__:
        key = (cls, attr)
        if key not in _definitions:
            _definitions[key] = _find_assignment(cls, attr)
        if _definitions[key] is not None:
            return _definitions[key]
    return None


def _find_assignment(cls: type, attr: str) -> Optional[Location]:
    try:
        filename = inspect.getsourcefile(cls)
        lines, start = inspect.getsourcelines(cls)
    except (OSError, TypeError):
        return None
    if filename is None or _classify_path(filename, "") != USER:
        return None
    try:
        tree = ast.parse(textwrap.dedent("".join(lines)))
    except SyntaxError:
        return None
    found: Optional[tuple[int, str]] = None
    for node in ast.walk(tree):
        lineno = None
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(_is_self_attribute(t, attr) for t in targets):
                lineno = node.lineno
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr in _REGISTERING_CALLS and node.args and _is_constant(node.args[0], attr):
                lineno = node.lineno
        if lineno is not None and (found is None or lineno < found[0]):
            function = _enclosing_function(tree, lineno) or cls.__name__
            found = (lineno, function)
    if found is None:
        return None
    return Location(filename, start + found[0] - 1, found[1])


def _is_self_attribute(node: ast.AST, attr: str) -> bool:
    if isinstance(node, ast.Tuple):
        return any(_is_self_attribute(n, attr) for n in node.elts)
    return (
        isinstance(node, ast.Attribute)
        and node.attr == attr
        and isinstance(node.value, ast.Name)
        and node.value.id == "self"
    )


def _is_constant(node: ast.AST, value: str) -> bool:
    return isinstance(node, ast.Constant) and node.value == value


def _enclosing_function(tree: ast.AST, lineno: int) -> Optional[str]:
    best: Optional[ast.AST] = None
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            end = node.end_lineno or node.lineno
            if node.lineno <= lineno <= end and (best is None or node.lineno > best.lineno):  # type: ignore[attr-defined]
                best = node
    return best.name if best is not None else None  # type: ignore[attr-defined]
