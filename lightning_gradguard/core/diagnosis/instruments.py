"""The instruments that watch a forward pass, and their installation and removal.

* **Forward hooks** on the modules that own trainable parameters count whether each module ran and whether
  autograd was on (``torch.is_grad_enabled()``; hooks never read ``grad_fn``, which would break ``torch.compile``
  graphs).
* A **TorchFunctionMode** (:class:`_CutRecorder`) sees every torch call. It notes which parameters were used with
  autograd on, and records every call that cuts the graph: ``.detach()``/``.detach_()``, ``.data``,
  ``.item()``/``.tolist()``/``.numpy()``/``float()``, integer or boolean results (``argmax``, comparisons,
  ``.long()``) of inputs that carry a graph, and any use of such an input while autograd is off.

Both write into a :class:`~lightning_gradguard.core.diagnosis.recording.Recording`. Neither ever breaks the
user's forward pass: an internal error is handed to ``fail`` and the call's result is returned unchanged.

A torch-function mode lives on the mode stack of the thread that pushed it, and only that thread can pop it
(autograd's worker threads run with a copy of the stack). A mode that must come out where it cannot be popped is
switched off, so that it only passes calls through, and kept as *stale*: the next micro-batch pops it.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Sequence
from typing import Any, Callable, Optional

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from lightning_gradguard.core.diagnosis.model_map import ModelMap
from lightning_gradguard.core.diagnosis.recording import CUT, DATA, DETACH, INTEGER, NO_GRAD, NUMBER, Recording
from lightning_gradguard.hooks import user_hook

_METHOD_WRAPPER = type(Tensor.data.__get__)
_DATA_GETTER = Tensor.data.__get__
_DETACH_INPLACE = Tensor.detach_
_AUTOGRAD_GRAD = torch.autograd.grad
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


def in_backward() -> bool:
    """Whether a backward pass is running (its hooks run on autograd's threads, not the training thread)."""
    return torch._C._current_graph_task_id() != -1


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


class _CutRecorder(TorchFunctionMode):
    """Sees every torch call of a watched forward pass; records parameter uses and graph cuts (see module doc)."""

    def __init__(self, recording: Recording, fail: Callable[[Exception], None]) -> None:
        super().__init__()
        self.recording = recording
        self.fail = fail
        self.off = False  # set when the mode could not be popped from this thread: it then only passes through
        self.thread = threading.get_ident()  # the thread whose mode stack holds it

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Optional[dict] = None):
        if kwargs is None:
            kwargs = {}
        recording = self.recording
        if self.off or recording.paused:
            return func(*args, **kwargs)
        if func is _DETACH_INPLACE:  # the input loses its graph in place: look before the call
            source = args[0] if args else None
            cuts = isinstance(source, Tensor) and source.requires_grad and torch.is_grad_enabled()
            node = source.grad_fn if cuts else None
            out = func(*args, **kwargs)
            if cuts:
                try:
                    recording.record(DETACH, "detach_", (), {}, sys._getframe(1), extra=(node, source))
                except Exception as err:  # noqa: BLE001 - the guard never breaks the user's forward pass
                    self.fail(err)
            return out
        out = func(*args, **kwargs)  # the user's own errors propagate from here, untouched
        try:
            self._inspect(func, args, kwargs, out)
        except Exception as err:  # noqa: BLE001 - the guard never breaks the user's forward pass
            self.fail(err)
        return out

    def _inspect(self, func: Any, args: Sequence[Any], kwargs: dict[str, Any], out: Any) -> None:
        recording = self.recording
        if func is _AUTOGRAD_GRAD:  # differentiating (a MAML inner step, a penalty) neither uses nor cuts its inputs
            return
        if torch.is_grad_enabled():
            if isinstance(out, Tensor):
                if out.requires_grad:
                    recording.note_use(args, kwargs)
                    return
                if type(func) is _METHOD_WRAPPER:  # property getters: only .data cuts
                    if func != _DATA_GETTER:
                        return
                    kind, op = DATA, "data"
                else:
                    op = getattr(func, "__name__", "")
                    if op == "new_tensor":  # the tensor it is called on gives only dtype and device; `data` is copied
                        data = [*args[1:2], *(v for k, v in kwargs.items() if k == "data")]
                        if _any_graph(data, {}):
                            recording.record(CUT, op, data, {}, sys._getframe(2))
                        return
                    if op in _NOT_A_CUT:
                        return
                    if op == "detach":
                        kind = DETACH
                    else:
                        kind = CUT if out.is_floating_point() or out.is_complex() else INTEGER
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
                    recording.note_use(args, kwargs)
                if without is None:
                    return
                op = getattr(func, "__name__", "")
                kind = CUT if without.is_floating_point() or without.is_complex() else INTEGER
            else:
                op = _TO_NUMBER.get(func) if type(func) is not _METHOD_WRAPPER else None
                if op is None:
                    return
                kind = NUMBER
            if _any_graph(args, kwargs):
                recording.record(kind, op, args, kwargs, sys._getframe(2))
        elif _any_graph(args, kwargs):
            recording.record(NO_GRAD, getattr(func, "__name__", ""), args, kwargs, sys._getframe(2))


def _remove_mode(mode: _CutRecorder) -> bool:
    """Pop ``mode`` from its thread's torch-function mode stack, wherever it sits; False if not possible from here.

    Only the thread that pushed it may pop it, and not during a backward pass: autograd's worker threads run with a
    copy of the mode stack, and so do the training thread's hooks while autograd runs them.
    """
    if threading.get_ident() != mode.thread or in_backward():
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


class Instruments:
    """Installs and removes the forward hooks and the TorchFunctionMode of a diagnosis window.

    Args:
        model_map: which modules get a hook, and whether the mode may be installed.
        recording: where the instruments write.
        fail: called with an internal error of an instrument (diagnosis then turns itself off).

    Example::

        instruments = Instruments(model_map, recording, fail=print)
        instruments.arm()      # hooks and mode in (or right after the backward pass in progress)
        model(x)               # recorded into `recording`
        instruments.disarm()   # everything out

    """

    def __init__(self, model_map: ModelMap, recording: Recording, fail: Callable[[Exception], None]) -> None:
        self.model_map = model_map
        self.recording = recording
        self.fail = fail
        self.armed = False  # hooks (and the mode) are installed
        self.pending = False  # arm() was asked for during a backward pass: arm once it is over
        self._handles: list[Any] = []
        self._mode: Optional[_CutRecorder] = None
        self._stale_modes: list[_CutRecorder] = []
        self._retry_handle: Any = None  # a forward pre-hook on the root that retries them on the training thread
        self._suspended: Optional[_CutRecorder] = None  # the mode, taken off the stack for an evaluation pass

    @property
    def idle(self) -> bool:
        """Nothing installed, nothing to install, nothing left to remove."""
        return not (self.armed or self.pending or self._stale_modes)

    def arm(self) -> None:
        if self.armed:
            return
        if in_backward():  # hooks and modes belong to the training thread, not autograd's: arm after backward
            self.pending = True
            return
        self.pending = False
        model_map = self.model_map
        model_map.refresh()
        for module in model_map.owner_modules:
            self._handles.append(module.register_forward_hook(user_hook(self._on_forward)))
        root = model_map.root
        if root is not None and model_map.trace_cuts:  # (no trace with any compiled or scripted part)
            self._handles.append(root.register_forward_pre_hook(user_hook(self._on_root_start)))
            self._handles.append(root.register_forward_hook(user_hook(self._on_root_end), always_call=True))
        if model_map.trace_cuts:
            self._mode = _CutRecorder(self.recording, self.fail)
            torch._C._push_on_torch_function_stack(self._mode)
        self.armed = True
        self.recording.paused = False
        self.recording.new_segment()

    def disarm(self) -> None:
        self.pending = False
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._mode is not None:
            mode, self._mode = self._mode, None
            mode.off = True
            if self._suspended is mode:  # off the stack already
                self._suspended = None
            elif not _remove_mode(mode):  # pushed on another thread's stack, or out of it during backward: retry
                self._stale_modes.append(mode)
                root = self.model_map.root
                if self._retry_handle is None and root is not None:
                    # a loop that steps from inside backward (gradient hooks) starts no micro-batch outside it:
                    # the next forward call is on the training thread
                    self._retry_handle = root.register_forward_pre_hook(user_hook(self._retry_on_forward))
        self.armed = False
        self.model_map.grad_forward = False
        self.recording.new_segment()

    def suspend(self) -> None:
        """Take the mode off the stack for an evaluation pass, which is not recorded: with a torch-function mode on
        the stack, modules that look for one take another path (``nn.TransformerEncoder`` skips its inference fast
        path, whose padded positions are zeros), and the pass would compute something else than without the guard.
        """
        mode = self._mode
        if mode is not None and self._suspended is None and _remove_mode(mode):
            self._suspended = mode

    def resume(self) -> None:
        """Put the mode back after :meth:`suspend`."""
        mode, self._suspended = self._suspended, None
        if mode is None or mode is not self._mode:
            return
        if threading.get_ident() == mode.thread and not in_backward():
            torch._C._push_on_torch_function_stack(mode)
        else:  # not on the stack it belongs to: recording of cuts ends for this window
            mode.off = True
            self._mode = None

    def retry_stale_modes(self) -> None:
        if self._stale_modes:
            try:
                self._stale_modes = [mode for mode in self._stale_modes if not _remove_mode(mode)]
            except Exception:  # noqa: BLE001 - a mode marked off only passes calls through; try again later
                pass
        if not self._stale_modes and self._retry_handle is not None:
            self._retry_handle.remove()
            self._retry_handle = None

    def _retry_on_forward(self, module: torch.nn.Module, args: Any) -> None:
        self.retry_stale_modes()

    def _on_root_start(self, module: torch.nn.Module, args: Any) -> None:
        # a forward call that begins with autograd on is a training pass, whatever the model's mode (a call whose
        # end never comes, because it raised, is superseded by the next call's start)
        if torch.compiler.is_compiling():  # a compiled graph runs no mode, and records nothing
            return
        self.model_map.grad_forward = torch.is_grad_enabled()
        if self.model_map.evaluating():
            self.suspend()

    def _on_root_end(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        # (also when the forward call raised)
        if torch.compiler.is_compiling():
            return
        self.model_map.grad_forward = False
        self.resume()

    def _on_forward(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        recording = self.recording
        if torch.compiler.is_compiling() or recording.paused or self.model_map.evaluating():
            return
        try:
            recording.count_run(module, sys._getframe(1))
        except Exception as err:  # noqa: BLE001 - the guard never breaks the user's forward pass
            self.fail(err)
