"""Failure isolation: the guard must never lose the user's training run through its own fault.

Every adapter hook runs as a named *feature* (``"check"``, ``"log"``, ``"dashboard"``, ...). If the guard's own
code raises inside a feature, the error is reported once and that feature turns off for the rest of the run;
training continues. Only :class:`~lightning_gradguard.GradGuardError`, what strict mode was asked to raise, and a
:class:`~lightning_gradguard.GradGuardWarning` the user turned into an error with a warnings filter propagate.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Protocol, TypeVar

from lightning_gradguard.errors import GradGuardError, GradGuardWarning

F = TypeVar("F", bound=Callable[..., Any])

# features whose results another feature reads: turning the first off turns the others off too
_DEPENDENTS = {"check": ("log",)}

# called with the message of every internal error (the project's tests fail a test that caused one)
listeners: list[Callable[[str], None]] = []


def internal_error(message: str) -> str:
    """Tell the listeners of an internal error of GradGuard's own code; returns the message for the warning."""
    for listener in listeners:
        listener(message)
    return message


class IsolatedAdapter(Protocol):
    _disabled: set[str]

    def _report_internal_error(self, message: str) -> None: ...


def feature(name: str) -> Callable[[F], F]:
    """Decorate an adapter method to run as feature ``name`` (see the module docstring)."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(self: IsolatedAdapter, *args: Any, **kwargs: Any) -> Any:
            if name in self._disabled:
                return None
            try:
                return fn(self, *args, **kwargs)
            except (GradGuardError, GradGuardWarning):  # strict mode, or a warning the user made an error
                raise
            except Exception as err:  # noqa: BLE001 - isolating the user's run from the guard's own bugs
                self._disabled.add(name)
                self._disabled.update(_DEPENDENTS.get(name, ()))
                self._report_internal_error(internal_error(
                    f"GradGuard: internal error in {name!r} ({type(err).__name__}: {err}); {name!r} is turned off "
                    "for the rest of this run, training continues. Please report this at the project's issue "
                    "tracker."
                ))
                return None

        return wrapper  # type: ignore[return-value]

    return decorate
