"""Hooks GradGuard puts on the user's modules and tensors, made so that copies of those objects do not carry it.

A deep copy of a watched model (an EMA teacher, a best-model snapshot) copies the model's hook dictionaries, and
with them whatever each hook references: a bound method of the guard would drag along a copy of the guard, of the
optimizer and of the autograd graph it holds, or fail on the first object that cannot be copied. ``torch.save(model)``
pickles the same dictionaries. So every such hook is wrapped by :func:`user_hook`: a copy of it, and the hook a pickle
reads back, is :func:`ignore`, which does nothing.
"""

from __future__ import annotations

from typing import Any, Callable


def ignore(*args: Any, **kwargs: Any) -> None:
    """What a copied or unpickled GradGuard hook is: nothing."""


class _UserHook:
    __slots__ = ("fn",)
    __torch_unserializable__ = True  # a tensor hook: torch leaves it out of a pickle without a warning

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __deepcopy__(self, memo: dict) -> Callable[..., None]:
        return ignore

    def __reduce__(self) -> tuple[Callable[[], Callable[..., None]], tuple]:
        return _ignored, ()


def _ignored() -> Callable[..., None]:
    return ignore


def user_hook(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn``, to be registered as a hook on a module or tensor of the user's (see the module docstring)."""
    return _UserHook(fn)
