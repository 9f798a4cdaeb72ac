"""Where a guard's warning points: the user's line that called into the framework (``trainer.fit(...)``,
``trainer.train()``), past the framework's frames and the guard's own, so that the warning reads as being about the
user's run, and warning filters by module see the user's module."""

from __future__ import annotations

import os
import sys
from types import FrameType
from typing import Optional


def package_dirs(*names: str) -> tuple[str, ...]:
    """The directories of the imported packages among ``names`` (each ending in a separator)."""
    return tuple(
        os.path.dirname(os.path.abspath(module.__file__)) + os.sep
        for module in (sys.modules.get(name) for name in names)
        if module is not None and getattr(module, "__file__", None)
    )


def user_stacklevel(level: int, frame: Optional[FrameType], skip: tuple[str, ...]) -> Optional[int]:
    """The ``stacklevel`` of the first frame outside ``skip``, counting from ``frame`` at ``level``; None when
    every frame is inside (a warning then keeps the caller's default)."""
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(skip):
        frame, level = frame.f_back, level + 1
    return level if frame is not None else None
