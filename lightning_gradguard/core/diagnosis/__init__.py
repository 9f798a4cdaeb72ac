"""Why a parameter received no gradient: ``unused``, ``no_grad`` or ``detached``, with the line that did it.

The engine knows *that* a parameter got no gradient (see :mod:`lightning_gradguard.core.arrivals`). To say *why*, the
forward pass must be watched, and watching costs time, so :class:`Diagnosis` watches only in **diagnosis
windows**: the first optimizer steps of a run, and the steps right after a parameter first goes missing without
a known cause. Outside a window nothing is installed and the steady state costs what it costs without diagnosis.
A cause found this way describes the step the window watched.

During a window three instruments run:

* **forward hooks** on the modules that own trainable parameters count, per backward pass, whether each module
  ran and whether autograd was on (``torch.is_grad_enabled()``; hooks never read ``grad_fn``, which would break
  ``torch.compile`` graphs);
* a **TorchFunctionMode** (:class:`_CutRecorder`) sees every torch call of the forward pass. It notes which
  parameters were used with autograd on, and records, with the user's stack frame, every call that cuts the
  graph: ``.detach()``, ``.data``, ``.item()``/``.tolist()``/``.numpy()``/``float()``, integer or boolean
  results (``argmax``, comparisons, ``.long()``) of inputs that carry a graph, and any use of such an input while
  autograd is off (``torch.no_grad()``, ``torch.inference_mode()``, a reentrant ``torch.utils.checkpoint``
  segment none of whose inputs required grad);
* after each backward pass, for the trainable parameters that pass gave no gradient, a **graph walk** from the
  inputs of the recorded cuts (:mod:`lightning_gradguard.core.diagnosis.graph`) finds which cut each parameter sits behind.

A missing parameter then gets the first cause that fits, in this order: behind a recorded cut (``detached``, or
``no_grad`` when the cut was autograd being off; the user's line is named), used with autograd on but its result
never reached the loss (``unused``), its module ran but never used it (``unused``), its module ran only with
autograd off (``no_grad``), its module never ran (``unused``).

Instruments are removed when the window ends, when a step raises (:meth:`Diagnosis.close`, called by the
adapters' exception paths and by strict mode before it raises), and at the end of a run. The mode is not
installed for ``torch.compile``'d models (an active mode would make Dynamo recompile once it is gone); there,
modules inside compiled code are opaque and their causes are reported as unknown rather than guessed.
"""

from __future__ import annotations

import functools
import sys
import threading
from collections.abc import Sequence
from types import FrameType
from typing import TYPE_CHECKING, Any, Callable, Optional, TypeVar

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from lightning_gradguard.core.causes import DETACHED, NO_GRAD, UNUSED
from lightning_gradguard.core.diagnosis.graph import reachable
from lightning_gradguard.core.diagnosis.locations import (
    IN_FUNCTION,
    Frame,
    definition_site,
    grad_disabling_statement,
    location,
    user_frames,
)
from lightning_gradguard.core.registry import clean_name

if TYPE_CHECKING:
    from lightning_gradguard.core.engine import GradGuardEngine, StepCheck

# kinds of recorded events
_DETACH = "detach"
_DATA = "data"
_NUMBER = "number"
_INTEGER = "integer"
_CUT = "cut"
_NO_GRAD = "no_grad"

# reasons a backward pass gave a parameter nothing
_EVENT = 0  # behind a recorded cut (payload: the _Event)
_USED = 1  # used with autograd on, its result never reached the loss
_MODULE = 2  # judged from its modules' runs (payload: the runs of that backward pass)

_MAX_EVENTS = 512  # distinct (kind, line) events kept per backward pass: bounds time and memory
_MAX_ROOTS = 4096  # graph roots kept per event (a detach inside a loop)

_METHOD_WRAPPER = type(Tensor.data.__get__)
_DATA_GETTER = Tensor.data.__get__
_DETACH_INPLACE = Tensor.detach_
_TO_NUMBER = {
    Tensor.item: "item",
    Tensor.tolist: "tolist",
    Tensor.numpy: "numpy",
    Tensor.__float__: "float",
    Tensor.__int__: "int",
    Tensor.__index__: "index",
}
# calls whose result has no history by design, without cutting anything: shapes, fresh tensors "like" an input
_NOT_A_CUT = frozenset(
    {
        "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "randint_like",
        "new_zeros", "new_ones", "new_empty", "new_full", "new_tensor", "empty_strided", "requires_grad_",
        "__format__", "__repr__", "__bool__", "__len__", "size", "dim", "numel", "stride",
    }
)  # fmt: skip
_NUMBER_TEXT = {
    "item": ".item() turns it into a Python number",
    "tolist": ".tolist() turns it into Python numbers",
    "numpy": ".numpy() turns it into a NumPy array",
    "float": "float() turns it into a Python number",
    "int": "int() turns it into a Python number",
    "index": "using it as an index turns it into a Python number",
}
_UNDIAGNOSED = (
    "GradGuard could not diagnose the cause: the backward passes it watched after the parameter first went missing "
    "gave it a gradient (or the run ended first)"
)
# the fix named for a reentrant checkpoint segment; an adapter whose framework turns checkpointing on itself names that
# framework's switch instead (Diagnosis.checkpoint_fix)
CHECKPOINT_FIX = "pass use_reentrant=False to checkpoint (recommended), or make one of its inputs require grad"
LEFTOVER_NOTE = (
    "Why .grad is not None: no backward pass touched it, but it still holds the tensor an earlier step left, "
    "because zero_grad(set_to_none=False) zeroes gradients instead of deleting them (the optimizer still applies "
    "it: momentum, weight decay)."
)


class _Event:
    """One place in the user's code where a graph was cut, with the graph nodes that led into it."""

    __slots__ = ("kind", "op", "frames", "checkpoint", "inference", "roots", "leaves")

    def __init__(self, kind: str, op: str, frames: list[Frame], checkpoint: Optional[int], inference: bool) -> None:
        self.kind = kind
        self.op = op
        self.frames = frames
        self.checkpoint = checkpoint
        self.inference = inference
        self.roots: list[Any] = []  # grad_fn nodes of the inputs that carried a graph
        self.leaves: set[int] = set()  # ids of leaf inputs that required grad (parameters used directly)


class _Owner:
    __slots__ = ("name", "module_id", "type_name", "opaque")

    def __init__(self, name: str, module: torch.nn.Module, opaque: bool) -> None:
        self.name = name
        self.module_id = id(module)
        self.type_name = type(module).__name__
        self.opaque = opaque

    def __str__(self) -> str:
        return f"module `{self.name}` ({self.type_name})" if self.name else f"the model ({self.type_name})"


def _any_graph(args: Sequence[Any], kwargs: dict[str, Any]) -> bool:
    for a in args:
        if isinstance(a, Tensor):
            if a.requires_grad:
                return True
        elif type(a) is list or type(a) is tuple:
            for b in a:
                if isinstance(b, Tensor) and b.requires_grad:
                    return True
    for a in kwargs.values():
        if isinstance(a, Tensor) and a.requires_grad:
            return True
    return False


def _add_inputs(event: _Event, args: Sequence[Any], kwargs: dict[str, Any]) -> None:
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


class _CutRecorder(TorchFunctionMode):
    """Sees every torch call of a watched forward pass; records parameter uses and graph cuts (see module doc)."""

    def __init__(self, diagnosis: Diagnosis) -> None:
        super().__init__()
        self.diagnosis = diagnosis
        self.off = False  # set when the mode could not be popped from this thread: it then only passes through
        self.thread = threading.get_ident()  # the thread whose mode stack holds it

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Optional[dict] = None):
        if kwargs is None:
            kwargs = {}
        d = self.diagnosis
        if self.off or d._paused:
            return func(*args, **kwargs)
        if func is _DETACH_INPLACE:  # the input loses its graph in place: look before the call
            source = args[0] if args else None
            cuts = isinstance(source, Tensor) and source.requires_grad and torch.is_grad_enabled()
            node = source.grad_fn if cuts else None
            out = func(*args, **kwargs)
            if cuts:
                try:
                    d._record(_DETACH, "detach_", (), {}, sys._getframe(1), extra=(node, source))
                except Exception as err:  # noqa: BLE001 - the guard never breaks the user's forward pass
                    d._fail(err)
            return out
        out = func(*args, **kwargs)  # the user's own errors propagate from here, untouched
        try:
            self._inspect(func, args, kwargs, out)
        except Exception as err:  # noqa: BLE001 - the guard never breaks the user's forward pass
            d._fail(err)
        return out

    def _inspect(self, func: Any, args: Sequence[Any], kwargs: dict[str, Any], out: Any) -> None:
        d = self.diagnosis
        if torch.is_grad_enabled():
            if isinstance(out, Tensor):
                if out.requires_grad:
                    d._note_use(args, kwargs)
                    return
                if type(func) is _METHOD_WRAPPER:  # property getters: only .data cuts
                    if func != _DATA_GETTER:
                        return
                    kind, op = _DATA, "data"
                else:
                    op = getattr(func, "__name__", "")
                    if op in _NOT_A_CUT:
                        return
                    if op == "detach":
                        kind = _DETACH
                    else:
                        kind = _CUT if out.is_floating_point() or out.is_complex() else _INTEGER
            elif isinstance(out, tuple):  # (values, indices) of max/topk/sort, an RNN's outputs
                without = None
                with_grad = False
                for o in out:
                    if isinstance(o, Tensor):
                        if o.requires_grad:
                            with_grad = True
                        elif without is None:
                            without = o
                if with_grad:
                    d._note_use(args, kwargs)
                if without is None:
                    return
                op = getattr(func, "__name__", "")
                kind = _CUT if without.is_floating_point() or without.is_complex() else _INTEGER
            else:
                op = _TO_NUMBER.get(func) if type(func) is not _METHOD_WRAPPER else None
                if op is None:
                    return
                kind = _NUMBER
            if _any_graph(args, kwargs):
                d._record(kind, op, args, kwargs, sys._getframe(2))
        elif _any_graph(args, kwargs):
            d._record(_NO_GRAD, getattr(func, "__name__", ""), args, kwargs, sys._getframe(2))


F = TypeVar("F", bound=Callable[..., Any])


def _guarded(default: Any = None) -> Callable[[F], F]:
    """Run an engine-facing method so that an internal error turns diagnosis off instead of failing the step."""

    def decorate(method: F) -> F:
        @functools.wraps(method)
        def wrapper(self: Diagnosis, *args: Any, **kwargs: Any) -> Any:
            if self.failed:
                return default() if callable(default) else default
            try:
                return method(self, *args, **kwargs)
            except Exception as err:  # noqa: BLE001 - diagnosis is an explanation, never worth a lost run
                self._fail(err)
                return default() if callable(default) else default

        return wrapper  # type: ignore[return-value]

    return decorate


def _remove_mode(mode: _CutRecorder) -> bool:
    """Pop ``mode`` from its thread's torch-function mode stack, wherever it sits; False if not possible from here.

    Only the thread that pushed it may pop it: autograd's worker threads run with a copy of the mode stack.
    """
    if threading.get_ident() != mode.thread:
        return False
    depth = torch._C._len_torch_function_stack()
    if not any(torch._C._get_function_stack_at(i) is mode for i in range(depth)):
        return False
    above = []
    while True:
        top = torch._C._pop_torch_function_stack()
        if top is mode:
            break
        above.append(top)
    for other in reversed(above):  # modes the user's code left above ours (an exception inside a `with`)
        torch._C._push_on_torch_function_stack(other)
    return True


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


def _is_compiled(module: torch.nn.Module) -> bool:
    return type(module).__name__ == "OptimizedModule" or getattr(module, "_compiled_call_impl", None) is not None


class Diagnosis:
    """Finds the cause of each missing gradient during diagnosis windows; driven by the engine.

    Args:
        engine: the engine whose ``module`` is watched and whose registry names the parameters.
        window_steps: optimizer steps a window watches.
        window_micro_batches: the most micro-batches a window keeps its instruments for (a window whose optimizer
            never steps still ends).
        max_windows: windows per run (the first one included); bounds the cost of models whose parameters keep
            going missing, such as a mixture of experts without ``allow_none``.

    Example::

        engine.bind(model.named_parameters(), module=model)   # creates engine.diagnosis, opens the first window
        # ... engine.start_micro_batch(); forward; engine.before_backward(loss); backward; engine.after_backward()
        engine.check_step(optimizer, step)                     # causes land in engine.state.causes
        engine.end_diagnosis()                                 # on exceptions and at the end of the run

    """

    def __init__(
        self, engine: GradGuardEngine, window_steps: int = 2, window_micro_batches: int = 32, max_windows: int = 8
    ) -> None:
        self.engine = engine
        self.window_steps = window_steps
        self.window_micro_batches = window_micro_batches
        self.max_windows = max_windows
        self.windows = 0  # windows opened in this run
        self.checkpoint_fix = CHECKPOINT_FIX  # the "Fix:" of a no_grad cause inside a reentrant checkpoint segment
        self.failed = False  # an internal error turned diagnosis off for the rest of the run
        self._steps_left = 0
        self._micro_batches_left = 0
        self._armed = False
        self._arm_pending = False
        self._open_pending = False
        self._paused = False
        self._handles: list[Any] = []
        self._mode: Optional[_CutRecorder] = None
        self._stale_modes: list[_CutRecorder] = []
        self._trace_cuts = True
        self._root: Optional[torch.nn.Module] = None
        self._tables_size = -1
        self._param_index: dict[int, int] = {}
        self._owners: dict[int, list[_Owner]] = {}
        self._owner_modules: list[torch.nn.Module] = []
        # what the current backward pass's forward did
        self._events: dict[tuple, _Event] = {}
        self._runs: dict[int, list[Any]] = {}
        self._used: set[int] = set()
        # per micro-batch and per window
        self._mb_missed: Optional[set[int]] = None  # missed by every backward pass of this micro-batch so far
        self._mb_reasons: dict[int, tuple[int, Any]] = {}
        self._reasons: dict[int, tuple[int, Any]] = {}
        self._awaiting: set[int] = set()  # parameters a reopened window is looking at
        self._attempted: set[int] = set()

    # ------------------------------------------------------------------ windows
    @property
    def active(self) -> bool:
        """Whether a diagnosis window is open (instruments installed or about to be)."""
        return self._steps_left > 0

    def start_run(self) -> None:
        """A new run: open the first window (again, for a guard reused across runs)."""
        self.failed = False
        self._start_run()

    @_guarded()
    def _start_run(self) -> None:
        self.windows = 0
        self._attempted.clear()
        self._awaiting.clear()
        self._reasons.clear()
        self.open()

    @_guarded()
    def open(self) -> None:
        """Open a window: instruments go in now (or right after the backward pass in progress)."""
        if self.windows >= self.max_windows or self.engine.module is None:
            return
        if not self.active:
            self.windows += 1
            self._reasons.clear()
        self._steps_left = self.window_steps
        self._micro_batches_left = self.window_micro_batches
        self._arm()

    def close(self) -> None:
        """End the window now and remove every instrument (safe to call at any time, also twice)."""
        self._steps_left = 0
        self._open_pending = False
        self._disarm()
        if not self.failed:
            self._finish_awaiting()

    def _fail(self, err: Exception) -> None:
        """An internal error: remove the instruments, stop diagnosing for this run, say so once."""
        if self.failed:
            return
        self.failed = True
        self._steps_left = 0
        self._open_pending = False
        try:
            self._disarm()
        except Exception:  # noqa: BLE001 - already failing; the stale-mode retry removes what is left
            pass
        self.engine.warn(
            f"GradGuard: internal error in the diagnosis of missing gradients ({type(err).__name__}: {err}); causes "
            "are not diagnosed for the rest of this run, training continues. Please report this at the project's "
            "issue tracker."
        )

    # ------------------------------------------------------------------ engine events
    def start_micro_batch(self) -> None:
        self._retry_stale_modes()
        self._start_micro_batch()

    @_guarded()
    def _start_micro_batch(self) -> None:
        self._flush_micro_batch()
        if self._open_pending and not _in_backward():
            self._open_pending = False
            self.open()
        if not self.active:
            return
        if self._arm_pending:
            self._arm()
        # a micro-batch that starts before its forward pass (Lightning): what ran since the last backward pass
        # (validation, logging, the optimizer step) is not part of it. Adapters that start it from inside the
        # backward pass (plain loops) already ran the forward pass: keep what it recorded.
        if self._armed and not self._paused and not _in_backward():
            self._new_segment()
        self._micro_batches_left -= 1
        if self._micro_batches_left < 0 and not _in_backward():
            self._disarm()

    def before_backward(self, loss: Optional[Tensor] = None) -> None:
        """The forward pass is over: stop recording (backward recomputation is not the user's forward)."""
        self._paused = True

    @_guarded()
    def after_backward(self, missed: Optional[Sequence[int]]) -> None:
        """Explain the trainable parameters this backward pass gave no gradient (``missed``: registry indices)."""
        self._paused = False
        if not self._armed:
            return
        if missed is not None:
            self._analyze(missed)
        self._new_segment()

    @_guarded(dict)
    def explain(self, check: StepCheck) -> dict[int, tuple[Optional[str], Optional[str]]]:
        """The engine's explainer: ``{registry index: (cause, detail)}`` for the step's missing parameters."""
        engine = self.engine
        out: dict[int, tuple[Optional[str], Optional[str]]] = {}
        for index in list(check.missing) + list(check.intermittent):
            known = engine.state.causes.get(index)
            if known is not None and (known[0] is not None or (known[1] and index not in check.leftover)):
                continue  # the first explanation wins (a leftover .grad's note still needs its cause)
            reason = self._reason(index)
            if reason is None:
                if index not in self._attempted and not self._armed:
                    # gone missing outside a window: watch the next steps to find out why
                    self._attempted.add(index)
                    self._awaiting.add(index)
                    self._open_pending = True
                continue
            cause, detail = self._render(index, reason)
            if index in check.leftover:
                detail = f"{detail} {LEFTOVER_NOTE}" if detail else LEFTOVER_NOTE
            out[index] = (cause, detail)
            self._awaiting.discard(index)
        return out

    @_guarded()
    def after_check(self, check: StepCheck) -> None:
        """A step was checked: its reasons are used up; count the window down and open a scheduled one."""
        if self._reasons:  # empty in the steady state: no per-parameter work there
            for index in check.checked:
                self._reasons.pop(index, None)
        if self.active:
            self._steps_left -= 1
            if self._steps_left <= 0:
                self.close()
        if self._armed and self._micro_batches_left < 0 and not _in_backward():
            self._disarm()  # the micro-batch budget ran out inside a backward pass (plain loops): disarm here
        if self._open_pending and not _in_backward():
            self._open_pending = False
            self.open()

    # ------------------------------------------------------------------ instruments
    def _arm(self) -> None:
        if self._armed:
            return
        if _in_backward():  # hooks and modes belong to the training thread, not autograd's: arm after backward
            self._arm_pending = True
            return
        self._arm_pending = False
        self._tables()
        for module in self._owner_modules:
            self._handles.append(module.register_forward_hook(self._on_forward))
        if self._trace_cuts:
            self._mode = _CutRecorder(self)
            torch._C._push_on_torch_function_stack(self._mode)
        self._armed = True
        self._paused = False
        self._new_segment()

    def _disarm(self) -> None:
        self._arm_pending = False
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._mode is not None:
            mode, self._mode = self._mode, None
            mode.off = True
            if not _remove_mode(mode):  # pushed on another thread's stack: retry from there later
                self._stale_modes.append(mode)
        self._armed = False
        self._new_segment()

    def _retry_stale_modes(self) -> None:
        if self._stale_modes:
            try:
                self._stale_modes = [mode for mode in self._stale_modes if not _remove_mode(mode)]
            except Exception:  # noqa: BLE001 - a mode marked off only passes calls through; try again later
                pass

    def _tables(self) -> None:
        """Parameter and module lookups for the bound model (rebuilt when the registry grew)."""
        registry = self.engine.registry
        root = self.engine.module
        if self._tables_size == len(registry) and self._root is root:
            return
        self._tables_size = len(registry)
        self._root = root
        self._param_index = {id(p): i for i, p in enumerate(registry.params)}
        self._owners = {}
        self._owner_modules = []
        if root is None:
            return
        opaque: set[int] = set()
        if getattr(root, "_compiler_ctx", None):  # a LightningModule passed to fit() as torch.compile(model)
            opaque.update(id(m) for m in root.modules())
        for module in root.modules():
            if _is_compiled(module):
                opaque.update(id(m) for m in module.modules())
        self._trace_cuts = not opaque
        for name, module in root.named_modules():
            owns = False
            for _, param in module.named_parameters(recurse=False):
                index = self._param_index.get(id(param))
                if index is None:
                    continue
                owns = True
                self._owners.setdefault(index, []).append(_Owner(clean_name(name), module, id(module) in opaque))
            if owns and id(module) not in opaque:  # a hook inside compiled code sees nothing, and costs a recompile
                self._owner_modules.append(module)

    def _new_segment(self) -> None:
        self._events = {}
        self._runs = {}
        self._used = set()

    def _training(self) -> bool:
        root = self._root
        return root is None or root.training

    # ------------------------------------------------------------------ recording (called by the instruments)
    def _on_forward(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if torch.compiler.is_compiling() or self._paused or not self._training():
            return
        try:
            self._count_run(module, sys._getframe(1))
        except Exception as err:  # noqa: BLE001 - the guard never breaks the user's forward pass
            self._fail(err)

    def _count_run(self, module: torch.nn.Module, caller: FrameType) -> None:
        runs = self._runs.get(id(module))
        if runs is None:
            runs = self._runs[id(module)] = [0, 0, None]
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

    def _note_use(self, args: Sequence[Any], kwargs: dict[str, Any]) -> None:
        index = self._param_index
        used = self._used
        for a in args:
            if id(a) in index:
                used.add(id(a))
            elif type(a) is list or type(a) is tuple:  # an RNN's flat weights
                for b in a:
                    if id(b) in index:
                        used.add(id(b))
        for a in kwargs.values():
            if id(a) in index:
                used.add(id(a))

    def _record(
        self,
        kind: str,
        op: str,
        args: Sequence[Any],
        kwargs: dict[str, Any],
        caller: FrameType,
        extra: Optional[tuple] = None,
    ) -> None:
        """Record a cut at the user's frames around ``caller`` (the frame that called the torch function)."""
        if not self._training():  # an evaluation loop between training steps
            return
        found = user_frames(caller, find_checkpoint=kind == _NO_GRAD)
        if found is None:  # the framework's or an optimizer's own call
            return
        if found is IN_FUNCTION:  # autograd is off inside a custom Function's forward, by design: a use, not a cut
            if kind == _NO_GRAD:
                self._note_use(args, kwargs)
            return
        frames, checkpoint = found
        key = (kind, frames[0][0], frames[0][1]) if frames else (kind, op)
        event = self._events.get(key)
        if event is None:
            if len(self._events) >= _MAX_EVENTS:
                return
            event = self._events[key] = _Event(kind, op, frames, checkpoint, torch.is_inference_mode_enabled())
        if extra is not None:  # detach_(): the node read before the call
            node, source = extra
            if node is None:
                event.leaves.add(id(source))
            else:
                event.roots.append(node)
        _add_inputs(event, args, kwargs)

    # ------------------------------------------------------------------ analysis
    def _analyze(self, missed: Sequence[int]) -> None:
        registry = self.engine.registry
        params = registry.params
        allowed = registry.allowed
        self._tables()
        targets = [i for i in missed if i < len(params) and params[i].requires_grad and not allowed[i]]
        missed_set = set(targets)
        self._mb_missed = missed_set if self._mb_missed is None else self._mb_missed & missed_set
        if not targets:
            return
        labels: dict[int, _Event] = {}
        seen: set[Any] = set()
        index = self._param_index
        for event in self._events.values():  # program order: the first cut a parameter sits behind wins
            for i in reachable(event.roots, seen, index):
                labels.setdefault(i, event)
            for leaf in event.leaves:
                i = index.get(leaf)
                if i is not None:
                    labels.setdefault(i, event)
            event.roots, event.leaves = [], set()  # never keep the graph alive past the analysis
        for i in targets:
            event = labels.get(i)
            used = id(params[i]) in self._used
            if event is not None and event.kind == _NO_GRAD and event.checkpoint is None and used:
                # also used with autograd on, and no with-no_grad block of the user's around the no-grad use: the
                # library turned autograd off for a side computation (nn.Embedding(max_norm=...) renormalizing)
                if grad_disabling_statement(event.frames) is None:
                    event = None
            if event is not None:
                self._mb_reasons[i] = (_EVENT, event)
            elif self._trace_cuts and id(params[i]) in self._used:
                self._mb_reasons[i] = (_USED, None)
            else:
                self._mb_reasons[i] = (_MODULE, self._runs)

    def _flush_micro_batch(self) -> None:
        missed = self._mb_missed
        if missed:
            for i, reason in self._mb_reasons.items():
                if i in missed:
                    self._reasons[i] = reason  # the latest micro-batch that missed it
        self._mb_missed = None
        self._mb_reasons = {}

    def _reason(self, index: int) -> Optional[tuple[int, Any]]:
        if self._mb_missed is not None and index in self._mb_missed:
            reason = self._mb_reasons.get(index)
            if reason is not None:
                return reason
        return self._reasons.get(index)

    def _finish_awaiting(self) -> None:
        state = self.engine.state
        for index in self._awaiting:
            cause, detail = state.causes.get(index, (None, None))
            if cause is None and (detail is None or _UNDIAGNOSED not in detail):
                state.explain(index, None, f"{detail} {_UNDIAGNOSED}." if detail else f"{_UNDIAGNOSED}.")
        self._awaiting.clear()

    # ------------------------------------------------------------------ rendering
    def _render(self, index: int, reason: tuple[int, Any]) -> tuple[Optional[str], str]:
        name = self.engine.registry.names[index]
        tag, payload = reason
        if tag == _EVENT:
            return _render_event(payload, self.checkpoint_fix)
        owners = self._owners.get(index, [])
        where = " and ".join(str(o) for o in owners) if owners else "the model"
        if tag == _USED:
            return UNUSED, (
                f"{where} used it with autograd on, but that result never reached the loss (it was computed, "
                "then left out). Fix: use that output in the loss, or remove the computation."
            )
        runs: dict[int, list[Any]] = payload
        ran = [o for o in owners if runs.get(o.module_id, (0, 0))[0]]
        ran_without_grad = [o for o in owners if runs.get(o.module_id, (0, 0))[1]]
        if ran:
            if self._trace_cuts:
                return UNUSED, (
                    f"{ran[0]} ran, but its forward never used `{name}`{self._defined(name)}. Fix: use it in "
                    "forward, or remove it."
                )
            return None, (
                f"{ran[0]} ran with autograd on, but `{name}` never reached the loss; inside a torch.compile'd "
                "model GradGuard cannot tell a result left out of the loss from a detached one. Run a few steps "
                "without torch.compile to see the cause and the line."
            )
        if ran_without_grad:
            owner = ran_without_grad[0]
            found, inference = runs[owner.module_id][2] or (None, False)
            frames, checkpoint = found if found is not None else ([], None)
            return NO_GRAD, _no_grad_text(f"{owner} ran with autograd off", frames, checkpoint, inference,
                                          self.checkpoint_fix)
        if owners and all(o.opaque for o in owners):
            return None, (
                f"{where} is inside torch.compile'd code, where GradGuard cannot see whether it ran or what became "
                "of its output. Run a few steps without torch.compile to see the cause."
            )
        named = [o for o in owners if o.name]
        if not named:
            return UNUSED, (
                f"nothing in the forward pass used it (a parameter of the model itself{self._defined(name)}). Fix: "
                f"use it in forward, remove it, or add {name!r} to allow_none if it is optional."
            )
        owner = named[0]
        return UNUSED, (
            f"{owner}{self._defined(owner.name, ',')} was never called in the forward pass: it is registered, but "
            f"no code path of this step ran it. Fix: call it in forward, remove it, or add '{owner.name}.*' to "
            "allow_none if it is optional."
        )

    def _defined(self, dotted_name: str, separator: str = "") -> str:
        """`` (defined at model.py:12 in __init__: `...`)``, or an empty string when the source is not known."""
        site = definition_site(self._root, dotted_name) if self._root is not None else None
        if site is None:
            return ""
        return f", defined at {site}{separator}"


def _render_event(event: _Event, checkpoint_fix: str = CHECKPOINT_FIX) -> tuple[str, str]:
    where = str(location(event.frames[0])) if event.frames else "a call outside your code"
    if event.kind == _NO_GRAD:
        return NO_GRAD, _no_grad_text("it was used with autograd off", event.frames, event.checkpoint, event.inference,
                                      checkpoint_fix)
    cut = f"it was used with autograd on, but its path to the loss was cut at {where}: "
    if event.kind == _DETACH:
        return DETACHED, cut + (
            ".detach() returns a tensor without autograd history. Fix: drop the .detach() on the way to the loss "
            "(detach only what you log or carry across batches)."
        )
    if event.kind == _DATA:
        return DETACHED, cut + ".data returns the values without autograd history. Fix: use the tensor, not .data."
    if event.kind == _NUMBER:
        return DETACHED, cut + (
            f"{_NUMBER_TEXT.get(event.op, 'it became a Python value')}, which carries no gradient, and a tensor "
            "rebuilt from it (torch.tensor(...)) starts a new graph. Fix: keep it a tensor all the way to the loss."
        )
    if event.kind == _INTEGER:
        return DETACHED, cut + (
            f"`{event.op}` returns an integer or boolean tensor, which carries no gradient. Fix: use a "
            "differentiable stand-in (softmax weights instead of argmax, a float mask instead of a comparison, "
            ".float() instead of .long())."
        )
    return DETACHED, cut + (
        f"`{event.op}` returns a result without autograd history. Fix: reach the loss through differentiable "
        "operations."
    )


def _no_grad_text(
    what: str, frames: list[Frame], checkpoint: Optional[int], inference: bool, checkpoint_fix: str = CHECKPOINT_FIX
) -> str:
    if checkpoint is not None:
        return (
            f"{what} inside a reentrant torch.utils.checkpoint segment, called at {location(frames[checkpoint])}: "
            "none of the segment's inputs required grad, so it ran without autograd and its output carries no "
            f"gradient. Fix: {checkpoint_fix}."
        )
    block = "torch.inference_mode()" if inference else "torch.no_grad()"
    statement = grad_disabling_statement(frames)
    if statement is not None:
        used = location(frames[0]) if frames else None
        at = f" (used at {used})" if used is not None and used.lineno != statement.lineno else ""
        return (
            f"{what}, inside {statement}{at}. Fix: move the code that needs a gradient out of that block (or wrap "
            "it in torch.enable_grad())."
        )
    used_at = f" at {location(frames[0])}" if frames else ""
    return (
        f"{what}{used_at} (inside {block} or another autograd-disabling context). Fix: run that code with autograd "
        "on."
    )
