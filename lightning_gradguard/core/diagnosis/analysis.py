"""Which reason a backward pass gave a parameter nothing: the cut it sits behind, or what its modules did.

After each watched backward pass, for the trainable parameters that pass gave no gradient, a graph walk from the
inputs of the recorded cuts (:func:`~lightning_gradguard.core.diagnosis.graph.reachable`) finds which cut each
parameter sits behind. Cuts are walked in program order, with one shared ``seen`` set, so the first cut on a
parameter's path wins and the walks together visit each graph node once.

A parameter missed by several backward passes of one micro-batch (a GAN's two losses, several ``backward()``
calls before a step) keeps the reason of the latest pass that missed it, and only if every pass of the
micro-batch missed it: a parameter that one of them reached is not missing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Optional

from lightning_gradguard.core.diagnosis.graph import consumers, reachable
from lightning_gradguard.core.diagnosis.locations import grad_disabling_statement
from lightning_gradguard.core.diagnosis.model_map import ModelMap
from lightning_gradguard.core.diagnosis.recording import NO_GRAD, Event, Recording

if TYPE_CHECKING:
    from lightning_gradguard.core.registry import ParamRegistry

# reasons a backward pass gave a parameter nothing: (tag, payload)
EVENT = 0  # behind a recorded cut (payload: the Event)
USED = 1  # used with autograd on, its result never reached the loss (payload: only while in eval mode)
MODULE = 2  # judged from its modules' runs (payload: the runs of that backward pass)
NONE_BACK = 3  # the backward pass reached it, but its gradient came back None (payload: see _consumer)
ENTERED = 4  # used with autograd on, its result then used with autograd off (payload: that no-grad Event)

Reason = tuple[int, Any]


class Analysis:
    """The reasons found for missed parameters, per micro-batch and for the open window.

    Example::

        analysis = Analysis(model_map, recording)
        analysis.analyze(missed=[3, 4], registry=engine.registry)   # after a watched backward pass
        analysis.reason(3)                                           # (EVENT, <the cut>) or another reason

    """

    def __init__(self, model_map: ModelMap, recording: Recording) -> None:
        self.model_map = model_map
        self.recording = recording
        self.reasons: dict[int, Reason] = {}  # registry index -> the reason of the latest micro-batch that missed it
        self._mb_missed: Optional[set[int]] = None  # missed by every backward pass of this micro-batch so far
        self._mb_reasons: dict[int, Reason] = {}

    @property
    def empty(self) -> bool:
        """Nothing recorded that a later step could still use."""
        return self._mb_missed is None and not self.reasons and not self._mb_reasons

    def analyze(self, missed: Sequence[int], registry: ParamRegistry, root: Any = None) -> None:
        """Find the reasons of the trainable, not-allowed parameters among ``missed`` (registry indices).

        ``root``: the ``grad_fn`` the backward pass started from, when known: a parameter used with autograd on
        that the pass reached anyway got None from the node that consumes it (a custom ``autograd.Function``).
        """
        params = registry.params
        allowed = registry.allowed
        model_map = self.model_map
        model_map.refresh()
        targets = [i for i in missed if i < len(params) and params[i].requires_grad and not allowed[i]]
        missed_set = set(targets)
        self._mb_missed = missed_set if self._mb_missed is None else self._mb_missed & missed_set
        if not targets:
            return
        recording = self.recording
        labels, entered = _first_cuts(recording.events.values(), model_map.param_index, recording.last_use)
        reached: dict[int, Any] = {}
        if root is not None and model_map.trace_cuts:
            used = [i for i in targets if i not in labels and id(params[i]) in recording.used]
            reached = consumers(root, {id(params[i]) for i in used}) if used else {}
        for i in targets:
            event = labels.get(i)
            used = id(params[i]) in recording.used
            if event is not None and event.kind == NO_GRAD and event.checkpoint is None and used:
                # also used with autograd on, and no with-no_grad block of the user's around the no-grad use: the
                # library turned autograd off for a side computation (nn.Embedding(max_norm=...) renormalizing)
                if grad_disabling_statement(event.frames) is None:
                    event = None
            if event is not None:
                self._mb_reasons[i] = (ENTERED if i in entered else EVENT, event)
            elif id(params[i]) in reached:
                self._mb_reasons[i] = (NONE_BACK, _consumer(reached[id(params[i])]))
            elif model_map.trace_cuts and id(params[i]) in recording.used:
                self._mb_reasons[i] = (USED, id(params[i]) not in recording.used_training)  # used in eval mode only
            else:
                self._mb_reasons[i] = (MODULE, recording.runs)

    def flush_micro_batch(self) -> None:
        """A micro-batch ended: its reasons become the window's."""
        missed = self._mb_missed
        if missed:
            for i, reason in self._mb_reasons.items():
                if i in missed:
                    self.reasons[i] = reason  # the latest micro-batch that missed it
        self._mb_missed = None
        self._mb_reasons = {}

    def reason(self, index: int) -> Optional[Reason]:
        """The reason for ``index``: the current micro-batch's if it missed it so far, else the window's."""
        if self._mb_missed is not None and index in self._mb_missed:
            reason = self._mb_reasons.get(index)
            if reason is not None:
                return reason
        return self.reasons.get(index)

    def forget(self, indices: Iterable[int]) -> None:
        """These parameters' reasons were used (their step was checked)."""
        for index in indices:
            self.reasons.pop(index, None)


def _first_cuts(
    events: Iterable[Event], param_index: dict[int, int], last_use: dict[int, int]
) -> tuple[dict[int, Event], set[int]]:
    """``(registry index -> the first recorded cut the parameter sits behind, the indices whose cut is a no-grad
    block their result entered)``; releases each cut's graph.

    ``last_use``: ``id(parameter) -> when it was last used with autograd on``. A parameter used directly under
    no_grad and with autograd on after that (a rollout, old values for PPO's ratio, then the training forward) got
    no gradient from the no-grad use by design: the cut that explains it is elsewhere.
    """
    labels: dict[int, Event] = {}
    entered: set[int] = set()
    seen: set[Any] = set()
    for event in events:  # program order: the first cut a parameter sits behind wins
        no_grad = event.kind == NO_GRAD
        for i in reachable(event.roots, seen, param_index):
            if i not in labels:
                labels[i] = event
                if no_grad and event.checkpoint is None:
                    entered.add(i)
        for leaf in event.leaves:
            i = param_index.get(leaf)
            if i is not None and not (no_grad and last_use.get(leaf, -1) > event.last):
                if labels.setdefault(i, event) is event:
                    entered.discard(i)
        event.roots, event.leaves = [], set()  # never keep the graph alive past the analysis
    return labels, entered


_COMPILED_MODULES = ("torch._functorch", "torch._dynamo", "torch._inductor")


def _consumer(node: Any) -> tuple[str, Optional[str], bool]:
    """``(node name, custom autograd.Function name or None, whether it is compiled code)`` of the node that consumes
    a parameter: names only, so that a reason never keeps the graph alive. torch.compile wraps a compiled graph in
    a Function of its own: that one is not the user's."""
    function = getattr(node, "_forward_cls", None)  # the class of a custom torch.autograd.Function
    compiled = str(getattr(function, "__module__", "")).startswith(_COMPILED_MODULES)
    return type(node).__name__, getattr(function, "__qualname__", None), compiled
