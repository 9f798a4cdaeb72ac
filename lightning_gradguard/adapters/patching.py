"""What a guard attaches to objects it does not own, and takes off again: methods wrapped on the user's optimizers
and models, a handler that closes forgotten guards when the interpreter exits, and warnings that point at the user's
line rather than at a hook inside torch or GradGuard."""

from __future__ import annotations

import atexit
import functools
import os
import sys
import warnings
import weakref
from typing import TYPE_CHECKING, Any

import torch

from lightning_gradguard.errors import GradGuardWarning

if TYPE_CHECKING:
    from lightning_gradguard.adapters.watcher import Watcher


def warn_at_user_code(message: str) -> None:
    """Warn with the location of the user's line (``optimizer.step()``), not of a hook inside torch or GradGuard."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    internal = (package, os.path.dirname(os.path.abspath(torch.__file__)))
    level, frame = 2, sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(internal):
        frame = frame.f_back
        level += 1
    warnings.warn(message, GradGuardWarning, stacklevel=level)


_open_guards: weakref.WeakSet = weakref.WeakSet()


def close_at_exit(guard: Watcher) -> None:
    """Close ``guard`` when the interpreter exits if nothing closed it before, so that the one-line form (``watch``
    without ``close()``) still reports, and a run that raised still writes its report file."""
    if not _open_guards and not _exit_hook:
        _exit_hook.append(True)
        atexit.register(_close_open_guards)
    _open_guards.add(guard)


def open_guards() -> list[Watcher]:
    """The guards not closed yet (a notebook cell run twice finds the earlier one here)."""
    return [guard for guard in list(_open_guards) if not guard.closed]


_exit_hook: list[bool] = []


def _close_open_guards() -> None:
    for guard in list(_open_guards):
        try:
            guard.at_exit()
        except Exception:  # noqa: BLE001 - nothing can be done at exit
            pass


class MethodWrapper:
    """Replaces ``owner.<name>`` (as an instance attribute) by ``wrapper(original, *args, **kwargs)``.

    ``remove()`` puts back what was there; when another wrapper went on top in the meantime (two guards on one
    Fabric), this one stays in the chain and only passes calls through.
    """

    def __init__(self, owner: Any, name: str, wrapper: Any) -> None:
        self._owner = owner
        self._name = name
        self._previous = vars(owner).get(name, _ABSENT)
        original = getattr(owner, name)
        self._active = True

        @functools.wraps(original)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if not self._active:
                return original(*args, **kwargs)
            return wrapper(original, *args, **kwargs)

        self._wrapped = wrapped
        setattr(owner, name, wrapped)

    def remove(self) -> None:
        self._active = False
        if vars(self._owner).get(self._name) is self._wrapped:
            if self._previous is _ABSENT:
                delattr(self._owner, self._name)
            else:
                setattr(self._owner, self._name, self._previous)


_ABSENT = object()
