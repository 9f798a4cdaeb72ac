"""What the instruments record during a watched forward pass: module runs, parameter uses and graph cuts.

The records cover one *segment*: the forward computation that the next backward pass differentiates. They are
cleared when that backward pass has been analyzed, and at the start of a micro-batch that starts before its forward
pass (what ran since the last backward pass, validation or logging, is not part of it).

Calls made on behalf of the framework or an optimizer, and calls inside a custom ``torch.autograd.Function``'s
forward, are not the user's and are not recorded as cuts (:func:`.locations.user_frames` tells them apart). Each
distinct cut is kept once per segment, with the graph nodes that led into it, where the graph walk of
:mod:`.analysis` starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import FrameType
from typing import Any, Optional

import torch
from torch import Tensor

from lightning_gradguard.core.diagnosis.locations import IN_FUNCTION, Frame, user_frames
from lightning_gradguard.core.diagnosis.model_map import ModelMap

# kinds of recorded events
DETACH = "detach"
DATA = "data"
NUMBER = "number"
INTEGER = "integer"
CUT = "cut"
NO_GRAD = "no_grad"

_MAX_EVENTS = 512  # distinct (kind, line) events kept per backward pass: bounds time and memory
_MAX_ROOTS = 4096  # graph roots kept per event (a detach inside a loop)


class Event:
    """One place in the user's code where a graph was cut, with the graph nodes that led into it."""

    __slots__ = ("kind", "op", "frames", "checkpoint", "inference", "roots", "leaves", "last")

    def __init__(self, kind: str, op: str, frames: list[Frame], checkpoint: Optional[int], inference: bool) -> None:
        self.kind = kind
        self.op = op
        self.frames = frames
        self.checkpoint = checkpoint
        self.inference = inference
        self.roots: list[Any] = []  # grad_fn nodes of the inputs that carried a graph
        self.leaves: set[int] = set()  # ids of leaf inputs that required grad (parameters used directly)
        self.last = 0  # the recording's clock at its latest occurrence


def _add_inputs(event: Event, args: Sequence[Any], kwargs: dict[str, Any]) -> None:
    def add(t: Tensor) -> None:
        node = t.grad_fn
        if node is None:
            event.leaves.add(id(t))
        elif len(event.roots) < _MAX_ROOTS:
            event.roots.append(node)

    for a in args:
        if isinstance(a, Tensor):
            if a.requires_grad:
                add(a)
        elif type(a) is list or type(a) is tuple:
            for b in a:
                if isinstance(b, Tensor) and b.requires_grad:
                    add(b)
    for a in kwargs.values():
        if isinstance(a, Tensor) and a.requires_grad:
            add(a)


class Recording:
    """The records of the current segment, written by the instruments.

    Attributes:
        events: ``(kind, file, line)`` (or ``(kind, op)``) -> :class:`Event`, in program order.
        runs: ``id(module) -> [runs with autograd on, runs with autograd off, (frames, inference) of the first
            run with autograd off]``.
        used: ids of the parameters used with autograd on.
        used_training: those of them used while the model was in training mode (the rest were used only in eval
            mode: an evaluation pass that left autograd on, or a model trained in eval mode).
        paused: set between the end of a forward pass and the end of its backward pass; the instruments record
            nothing then (backward recomputation, such as activation checkpointing, is not the user's forward).

    Example::

        recording = Recording(model_map)
        recording.note_use((weight, x), {})   # from the TorchFunctionMode
        assert id(weight) in recording.used
        recording.new_segment()

    """

    def __init__(self, model_map: ModelMap) -> None:
        self.model_map = model_map
        self.events: dict[tuple, Event] = {}
        self.runs: dict[int, list[Any]] = {}
        self.used: set[int] = set()
        self.used_training: set[int] = set()
        self.last_use: dict[int, int] = {}  # id(parameter) -> the clock at its latest use with autograd on
        self.clock = 0  # counts uses and cuts, to order them
        self.paused = False

    def new_segment(self) -> None:
        self.events = {}
        self.runs = {}
        self.used = set()
        self.used_training = set()
        self.last_use = {}

    def count_run(self, module: torch.nn.Module, caller: FrameType) -> None:
        """``module`` ran (``caller``: the frame that called its forward hook)."""
        runs = self.runs.get(id(module))
        if runs is None:
            runs = self.runs[id(module)] = [0, 0, None]
        if torch.is_grad_enabled():
            runs[0] += 1
            return
        found = user_frames(caller, find_checkpoint=True)
        if found is IN_FUNCTION:  # inside a custom autograd.Function's forward: the Function records the graph
            runs[0] += 1
            return
        runs[1] += 1
        if runs[2] is None:
            runs[2] = (found, torch.is_inference_mode_enabled())

    def note_use(self, args: Sequence[Any], kwargs: dict[str, Any]) -> None:
        """The registered parameters among a torch call's arguments were used with autograd on."""
        index = self.model_map.param_index
        found = []
        for a in args:
            if id(a) in index:
                found.append(id(a))
            elif type(a) is list or type(a) is tuple:  # an RNN's flat weights
                found.extend(id(b) for b in a if id(b) in index)
        found.extend(id(a) for a in kwargs.values() if id(a) in index)
        if found:
            self.used.update(found)
            self.clock += 1
            for key in found:
                self.last_use[key] = self.clock
            root = self.model_map.root
            if root is None or root.training:
                self.used_training.update(found)

    def record(
        self,
        kind: str,
        op: str,
        args: Sequence[Any],
        kwargs: dict[str, Any],
        caller: FrameType,
        extra: Optional[tuple] = None,
    ) -> None:
        """Record a cut at the user's frames around ``caller`` (the frame that called the torch function)."""
        if self.model_map.evaluating():  # an evaluation loop between training steps
            return
        found = user_frames(caller, find_checkpoint=kind == NO_GRAD)
        if found is None:  # the framework's or an optimizer's own call
            return
        if found is IN_FUNCTION:  # autograd is off inside a custom Function's forward, by design: a use, not a cut
            if kind == NO_GRAD:
                self.note_use(args, kwargs)
            return
        frames, checkpoint = found
        key = (kind, frames[0][0], frames[0][1]) if frames else (kind, op)
        event = self.events.get(key)
        if event is None:
            if len(self.events) >= _MAX_EVENTS:
                return
            event = self.events[key] = Event(kind, op, frames, checkpoint, torch.is_inference_mode_enabled())
        self.clock += 1
        event.last = self.clock
        if extra is not None:  # detach_(): the node read before the call
            node, source = extra
            if node is None:
                event.leaves.add(id(source))
            else:
                event.roots.append(node)
        _add_inputs(event, args, kwargs)
