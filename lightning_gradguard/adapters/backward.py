"""How an adapter notices backward passes and micro-batches in a loop GradGuard does not drive (plain PyTorch, the
Hugging Face Trainer): from inside autograd, without a hook on every parameter.

A forward hook on the model puts a pre-hook on the ``grad_fn`` of each of its outputs; autograd calls it when a
backward pass reaches the model, and the pass is bracketed from there to autograd's end-of-backward callback. A
forward call since the previous backward pass starts a new micro-batch; several backward passes from one forward
(several losses) share it.

The gradients a backward pass is compared with (which parameters it gave a gradient) are recorded before it
starts, because by the time it reaches the model's outputs, a parameter used only in the loss may have received its
gradient already. ``zero_grad`` records them for free (every gradient None); between two backward passes of an
accumulation window nothing changes them, so the last pass's end serves. Only a step with no ``zero_grad`` after it
(gradients kept across steps) makes the next pass read them when it starts.

``torch.autograd.grad`` calls write no ``.grad`` and are not counted: the engine is asked whether it will run a
parameter's ``AccumulateGrad`` node.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import Tensor, nn

from lightning_gradguard.core.observer import EngineObserver
from lightning_gradguard.hooks import user_hook
from lightning_gradguard.isolation import feature

if TYPE_CHECKING:
    from lightning_gradguard.adapters.watcher import Watcher
    from lightning_gradguard.core.engine import GradGuardEngine

_MAX_OUTPUTS = 64  # output tensors hooked per forward call (a model returning a long list of tensors)


class BackwardBracket:
    """Brackets the backward passes that reach ``model``'s outputs (or start at a hooked tensor) for ``watcher``.

    The adapter tells it what it sees: :meth:`zero_grad_ran`, :meth:`stepping` and :meth:`stepped` around each
    step, and :meth:`start` from hooks of its own (a parameter's gradient hook).

    Args:
        watcher: the guard whose calls the backward passes become.
        model: the module whose forward calls mark micro-batches and whose outputs mark backward passes.

    """

    def __init__(self, watcher: Watcher, model: nn.Module) -> None:
        self.watcher = watcher
        self.open = False  # inside a backward pass this bracket noticed (or chose to ignore)
        self.forward_seen = False  # a forward call of the model was seen at all
        self.all_through_model = True  # every bracketed backward pass reached the model's outputs
        self._bracketed = False  # the open backward pass writes .grad and was handed to the engine
        self._through_model = False
        self._forward_since_backward = False
        self._marked = False  # the gradients the next backward pass starts from are recorded
        self._stepped = False  # an optimizer stepped since the last backward pass ended
        self.restarts = WindowRestarts(watcher.engine, watcher.optimizers)
        self._optimizer_zeroes = False  # the loop calls an optimizer's zero_grad (the gradients are read there)
        self._task = -1  # autograd's id of the backward pass bracketed now
        self._hint: Any = None  # an AccumulateGrad node found behind an output before: most passes reach it again
        try:
            self.handles = [
                model.register_forward_pre_hook(user_hook(self._forward_start)),
                model.register_forward_hook(user_hook(self._forward_end)),
            ]
        except RuntimeError:  # a TorchScript module takes no hooks: the per-parameter detector stays on instead
            self.handles = []
        self._mark(None)  # the first backward pass starts from the gradients as they are now

    # ------------------------------------------------------------------ what the adapter tells it
    def zero_grad_ran(self, optimizer: Optional[torch.optim.Optimizer], set_to_none: bool) -> None:
        """``optimizer.zero_grad()`` just ran (``optimizer`` None: something else cleared every gradient)."""
        self._end_failed()
        self.restarts.cleared(optimizer)
        self._optimizer_zeroes = self._optimizer_zeroes or optimizer is not None
        self._mark(optimizer if set_to_none else None)

    def stepping(self, optimizer: torch.optim.Optimizer) -> None:
        """``optimizer`` is about to step (a zero_grad before it cleared what it steps on: no window restart)."""
        self._end_failed()
        self.restarts.stepping(optimizer)

    def stepped(self) -> None:
        self._stepped = True

    def unseen(self) -> None:
        """A backward pass this bracket did not see wrote gradients (found at the step): bracket it there."""
        self.restarts.apply()
        self._forward_since_backward = self._marked = self._stepped = False
        self.watcher.unseen_backward()

    # ------------------------------------------------------------------ hooks
    def _forward_start(self, module: nn.Module, args: Any) -> None:
        self._end_failed()
        if torch.is_grad_enabled() and not self.watcher.closed:  # evaluation under no_grad is not a micro-batch
            self._forward_since_backward = True
            self.forward_seen = True
            if self._stepped and not self._marked and not self._optimizer_zeroes:
                # a loop that clears gradients with model.zero_grad(), or not at all: what the next pass starts from,
                # read before any of it runs (a loop that calls an optimizer's zero_grad has it read there)
                self._mark(None)

    def _forward_end(self, module: nn.Module, args: Any, output: Any) -> None:
        if not torch.is_grad_enabled() or self.watcher.closed:
            return
        hooked: list[Any] = []
        for tensor in _tensors(output):
            node = tensor.grad_fn
            if node is not None and len(hooked) < _MAX_OUTPUTS and not any(node is n for n in hooked):
                node.register_prehook(self._output_reached)  # runs when a backward pass reaches the output
                hooked.append(node)

    def _output_reached(self, grad_outputs: Any) -> None:
        if not self.open:
            self.start(torch._C._current_autograd_node())
        self._through_model = True

    def start(self, output_node: Any = None) -> None:
        """A backward pass reached a hooked point (``output_node``: the model output's ``grad_fn``; None from a
        parameter's own gradient hook)."""
        if self.open and self._task != torch._C._current_graph_task_id():
            self._end()  # the pass bracketed before raised (an out-of-memory error the loop caught and skipped)
        if self.open or self.watcher.closed:
            return
        self.open = True
        self._task = torch._C._current_graph_task_id()
        self._through_model = False
        torch.autograd.Variable._execution_engine.queue_callback(self._end)
        self._bracketed = self._writes_grad(output_node)  # torch.autograd.grad() writes no .grad
        if not self._bracketed:
            return
        engine = self.watcher.engine
        self.restarts.apply()
        if not self._marked:  # no zero_grad since the last backward pass: the baseline is what that one left
            if self._stepped:  # ... unless a step came in between (gradients kept across steps): read them now
                engine.mark_gradients()
            else:
                engine.keep_baseline()
        new_micro_batch = self._forward_since_backward or not self.forward_seen
        self._forward_since_backward = False
        self.watcher.backward_started(output_node, new_micro_batch=new_micro_batch)  # the node: what diagnosis walks

    def _writes_grad(self, output_node: Any) -> bool:
        if output_node is not None and self._hint is not None:
            # a parameter's AccumulateGrad node lives as long as something holds it, so every forward call's graph
            # reaches the same one: asking about it spares a walk of the graph at each backward pass
            try:
                if torch._C._will_engine_execute_node(self._hint):
                    return True
            except (RuntimeError, AttributeError):
                pass
        writes, node = accumulates_into_grad(output_node, with_node=True)
        if writes and node is not None and output_node is not None:
            self._hint = node
        return writes

    def _end_failed(self) -> None:
        """End the bracketed backward pass if it raised: its end-of-backward callback never comes. Called on the
        training thread outside backward (a forward call, a step), where a pass that is still open has failed."""
        if self.open and torch._C._current_graph_task_id() == -1:
            self._end()

    def _end(self) -> None:
        self.open = False
        if self._bracketed:
            self._bracketed = False
            self.all_through_model = self.all_through_model and self._through_model
            self._marked = False
            self._stepped = False
            self.watcher.backward_ended()

    @feature("check")
    def _mark(self, cleared: Optional[torch.optim.Optimizer]) -> None:
        if self.open or self.watcher.closed:
            return
        self.watcher.engine.mark_gradients(cleared)
        self._marked = True

    # the isolation of `feature` reports through the guard
    @property
    def _disabled(self) -> set[str]:
        return self.watcher.disabled

    def _report_internal_error(self, message: str) -> None:
        self.watcher.report_internal_error(message)


class WindowRestarts(EngineObserver):
    """Where each optimizer's accumulation window starts, in a loop that steps several optimizers (a GAN).

    Two events start a window at the next backward pass instead of at the optimizer's last step:

    * its ``zero_grad`` ran without a step (a GAN's other network, a step the AMP scaler skipped): what came before
      contributes nothing to its next step (if its step comes first, it stepped on nothing);
    * another optimizer stepped while the window had backward passes but none of them reached this optimizer's
      parameters: those passes were the other optimizer's (the discriminator's pass, which sees the generator's
      output through ``.detach()``, then the discriminator's step), whichever way the loop clears gradients
      (``model.zero_grad()``, as the PyTorch DCGAN example does, is not seen).

    Args:
        engine: the engine whose windows restart.
        optimizers: the loop's optimizers (their first windows start empty too).

    """

    def __init__(self, engine: GradGuardEngine, optimizers: Sequence[torch.optim.Optimizer] = ()) -> None:
        self.engine = engine
        self._pending: list[torch.optim.Optimizer] = []
        # windows no backward pass has reached yet; weak, so that an optimizer the loop drops is not kept alive
        self._empty: list[weakref.ref[torch.optim.Optimizer]] = [weakref.ref(o) for o in optimizers]
        engine.observe(self)

    def cleared(self, optimizer: Optional[torch.optim.Optimizer]) -> None:
        if optimizer is not None and optimizer not in self._pending:
            self._pending.append(optimizer)

    def stepping(self, optimizer: torch.optim.Optimizer) -> None:
        # a pending restart of `optimizer` stays: once it has stepped its window is fresh and the restart does nothing,
        # and a backward pass found at this step (see `unseen`) still starts its window after the zero_grad
        windows = self.engine.windows
        for ref in self._empty:
            other = ref()
            if other is not None and other is not optimizer and windows.backwards_since_step(other):
                self.cleared(other)
        self._starts_empty(optimizer)  # its next window

    def apply(self) -> None:
        """A backward pass that writes ``.grad`` starts: the pending windows start with it."""
        for optimizer in self._pending:
            self.engine.restart_window(optimizer)
            self._starts_empty(optimizer)
        self._pending.clear()

    def _starts_empty(self, optimizer: torch.optim.Optimizer) -> None:
        if not any(ref() is optimizer for ref in self._empty):
            self._empty.append(weakref.ref(optimizer))

    def after_backward(self, micro_batch: int, missed: Sequence[int]) -> None:
        if not self._empty:
            return
        if not missed:  # the common case: every parameter received a gradient
            self._empty = []
            return
        missed_set = set(missed)
        registry = self.engine.registry
        self._empty = [
            ref for ref in self._empty
            if (o := ref()) is not None and all(i in missed_set for i in registry.optimizer_params(o)[0])
        ]


def accumulates_into_grad(output_node: Any = None, with_node: bool = False) -> Any:
    """Whether the running backward pass writes ``.grad`` (``backward()``) or returns gradients (``autograd.grad``).

    The engine says whether it will run a parameter's ``AccumulateGrad`` node: from a parameter's own hook that is
    the current node; from a hook on the model's output, the nearest such node behind the output's ``grad_fn``.
    ``with_node``: return ``(answer, the node asked about or None)``.
    """
    node = None
    try:
        node = torch._C._current_autograd_node() if output_node is None else _nearest_accumulate(output_node)
        writes = node is None or bool(torch._C._will_engine_execute_node(node))
    except RuntimeError:  # "... we are currently running autograd.grad()"
        writes = False
    except AttributeError:  # private helpers missing in some release: assume the common case
        writes = True
    return (writes, node) if with_node else writes


def _nearest_accumulate(node: Any, budget: int = 64) -> Any:
    """The first ``AccumulateGrad`` node (a parameter's) found breadth-first behind ``node``, within ``budget``."""
    queue, seen = [node], {node}
    while queue and budget > 0:
        current = queue.pop(0)
        budget -= 1
        if type(current).__name__ == "AccumulateGrad":
            return current
        for parent, _ in current.next_functions:
            if parent is not None and parent not in seen:
                seen.add(parent)
                queue.append(parent)
    return None


def _tensors(output: Any, depth: int = 3) -> Iterable[Tensor]:
    """The tensors a forward call returned: the output itself, or those in a tuple, list, dict or dataclass, nested
    up to ``depth`` levels (a Hugging Face output's ``hidden_states`` tuple, an RNN's ``(out, (h, c))``): a loss
    may be computed from any of them."""
    if isinstance(output, Tensor):
        yield output
        return
    if depth <= 0:
        return
    if isinstance(output, dict):
        values: Iterable[Any] = output.values()
    elif isinstance(output, (list, tuple)):
        values = output
    elif hasattr(output, "__dataclass_fields__"):
        values = (getattr(output, name, None) for name in output.__dataclass_fields__)
    else:
        return
    for value in values:
        if isinstance(value, Tensor):
            yield value
        elif value is not None and not isinstance(value, (str, bytes, int, float, bool)):
            yield from _tensors(value, depth - 1)
