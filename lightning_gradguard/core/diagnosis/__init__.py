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
* a **TorchFunctionMode** sees every torch call of the forward pass. It notes which parameters were used with
  autograd on, and records, with the user's stack frame, every call that cuts the graph: ``.detach()``, ``.data``,
  ``.item()``/``.tolist()``/``.numpy()``/``float()``, integer or boolean results (``argmax``, comparisons,
  ``.long()``) of inputs that carry a graph, and any use of such an input while autograd is off
  (``torch.no_grad()``, ``torch.inference_mode()``, a reentrant ``torch.utils.checkpoint`` segment none of whose
  inputs required grad);
* after each backward pass, for the trainable parameters that pass gave no gradient, a **graph walk** from the
  inputs of the recorded cuts finds which cut each parameter sits behind.

A missing parameter then gets the first cause that fits, in this order: behind a recorded cut (``detached``, or
``no_grad`` when the cut was autograd being off; the user's line is named), used with autograd on but its result
never reached the loss (``unused``), its module ran but never used it (``unused``), its module ran only with
autograd off (``no_grad``), its module never ran (``unused``).

Instruments are removed when the window ends, when a step raises (:meth:`Diagnosis.close`, called by the
adapters' exception paths and by strict mode before it raises), and at the end of a run. The mode is not
installed for ``torch.compile``'d models (an active mode would make Dynamo recompile once it is gone); there,
modules inside compiled code are opaque and their causes are reported as unknown rather than guessed.

One module per step of that story: :mod:`.windows` (when), :mod:`.instruments` (the hooks and the mode),
:mod:`.recording` (what they record), :mod:`.analysis` (the graph walk: which cut or reason), :mod:`.rendering`
(the text of each cause), with :mod:`.model_map` (parameters and their modules), :mod:`.graph` and
:mod:`.locations` (the user's source lines). :class:`Diagnosis` composes them and is what the engine calls.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Callable, Optional, TypeVar

from torch import Tensor

from lightning_gradguard.core.diagnosis.analysis import Analysis
from lightning_gradguard.core.diagnosis.instruments import Instruments, in_backward
from lightning_gradguard.core.diagnosis.model_map import ModelMap
from lightning_gradguard.core.diagnosis.recording import Recording
from lightning_gradguard.core.diagnosis.rendering import (
    CHECKPOINT_FIX,
    LEFTOVER_NOTE,
    render,
    undiagnosed,
    with_leftover_note,
)
from lightning_gradguard.core.diagnosis.windows import WindowSchedule
from lightning_gradguard.isolation import internal_error

if TYPE_CHECKING:
    from lightning_gradguard.core.engine import GradGuardEngine
    from lightning_gradguard.core.observer import StepCheck

__all__ = ["Diagnosis", "LEFTOVER_NOTE"]

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
        self.failed = False  # an internal error turned diagnosis off for the rest of the run
        self.checkpoint_fix = CHECKPOINT_FIX  # the "Fix:" of a no_grad cause inside a reentrant checkpoint segment
        self.schedule = WindowSchedule(window_steps, window_micro_batches, max_windows)
        self.model_map = ModelMap(engine)
        self.recording = Recording(self.model_map)
        self.instruments = Instruments(self.model_map, self.recording, fail=self._fail)
        self.analysis = Analysis(self.model_map, self.recording)
        self._root: Any = None  # the grad_fn the running backward pass starts from, when the adapter knows it

    @property
    def active(self) -> bool:
        """Whether a diagnosis window is open (instruments installed or about to be)."""
        return self.schedule.active

    @property
    def windows(self) -> int:
        """Windows opened in this run."""
        return self.schedule.opened

    @property
    def window_steps(self) -> int:
        return self.schedule.steps

    @property
    def window_micro_batches(self) -> int:
        return self.schedule.micro_batches

    @property
    def max_windows(self) -> int:
        return self.schedule.max_windows

    # ------------------------------------------------------------------ windows
    def start_run(self) -> None:
        """A new run: open the first window (again, for a guard reused across runs)."""
        self.failed = False
        self._start_run()

    @_guarded()
    def _start_run(self) -> None:
        self.schedule.start_run()
        self.analysis.reasons.clear()
        self.open()

    @_guarded()
    def open(self) -> None:
        """Open a window: instruments go in now (or right after the backward pass in progress)."""
        if self.engine.module is None:
            return
        fresh = not self.schedule.active
        if not self.schedule.open():
            return
        if fresh:
            self.analysis.reasons.clear()
        self.instruments.arm()

    def close(self) -> None:
        """End the window now and remove every instrument (safe to call at any time, also twice)."""
        self.schedule.close()
        self.instruments.disarm()
        if not in_backward():
            self.instruments.retry_stale_modes()
        self._root = None
        if not self.failed:
            self._give_up_awaited()

    def _give_up_awaited(self) -> None:
        """Parameters a reopened window watched for in vain say so, rather than having no detail at all."""
        state = self.engine.state
        for index in self.schedule.awaiting:
            cause, detail = state.causes.get(index, (None, None))
            if cause is None:
                text = undiagnosed(detail)
                if text is not None:
                    state.explain(index, None, text)
        self.schedule.awaiting.clear()

    def _fail(self, err: Exception) -> None:
        """An internal error: remove the instruments, stop diagnosing for this run, say so once."""
        if self.failed:
            return
        self.failed = True
        self.schedule.close()
        try:
            self.instruments.disarm()
        except Exception:  # noqa: BLE001 - already failing; the stale-mode retry removes what is left
            pass
        self.engine.warn(internal_error(
            f"GradGuard: internal error in the diagnosis of missing gradients ({type(err).__name__}: {err}); causes "
            "are not diagnosed for the rest of this run, training continues. Please report this at the project's "
            "issue tracker."
        ))

    @property
    def idle(self) -> bool:
        """Outside every window, with nothing scheduled, installed or left to analyse: the engine's per-step calls
        would do nothing, so the engine skips them (a step outside a window costs no diagnosis at all)."""
        schedule = self.schedule
        return schedule.steps_left <= 0 and not schedule.open_pending and self.instruments.idle and self.analysis.empty

    # ------------------------------------------------------------------ engine events
    def evaluation(self, running: bool) -> None:
        """An evaluation loop starts (``running``) or ends: nothing of the diagnosis may change what it computes."""
        if running:
            self.instruments.suspend()
        else:
            self.instruments.resume()

    def start_micro_batch(self) -> None:
        self.instruments.retry_stale_modes()
        self._start_micro_batch()

    @_guarded()
    def _start_micro_batch(self) -> None:
        self.analysis.flush_micro_batch()
        schedule = self.schedule
        if schedule.open_pending and not in_backward():  # instruments go in on the training thread only
            schedule.open_pending = False
            self.open()
        if schedule.steps_left <= 0:  # no window open (the attribute, not .active: this runs at every step)
            return
        instruments = self.instruments
        if instruments.pending:
            instruments.arm()
        # a micro-batch that starts before its forward pass (Lightning): what ran since the last backward pass
        # (validation, logging, the optimizer step) is not part of it. Adapters that start it from inside the
        # backward pass (plain loops) already ran the forward pass: keep what it recorded.
        if instruments.armed and not self.recording.paused and not in_backward():
            self.recording.new_segment()
        if schedule.count_micro_batch() and not in_backward():
            instruments.disarm()

    def before_backward(self, loss: Any = None) -> None:
        """The forward pass is over: stop recording (backward recomputation is not the user's forward).

        ``loss``: the tensor the backward pass starts from, or its ``grad_fn``, when the adapter knows it: a
        parameter whose gradient came back None although the pass reached it is then told from one left out.
        """
        self.recording.paused = True
        self._root = loss.grad_fn if isinstance(loss, Tensor) else loss

    @_guarded()
    def after_backward(self, missed: Optional[Sequence[int]]) -> None:
        """Explain the trainable parameters this backward pass gave no gradient (``missed``: registry indices)."""
        recording = self.recording
        recording.paused = False
        root, self._root = self._root, None  # never keep the graph alive past its backward pass
        if not self.instruments.armed:
            return
        if missed is not None:
            self.analysis.analyze(missed, self.engine.registry, root)
        recording.new_segment()

    @_guarded(dict)
    def explain(self, check: StepCheck) -> dict[int, tuple[Optional[str], Optional[str]]]:
        """The engine's explainer: ``{registry index: (cause, detail)}`` for the step's missing parameters."""
        engine = self.engine
        out: dict[int, tuple[Optional[str], Optional[str]]] = {}
        for index in list(check.missing) + list(check.intermittent):
            known = engine.state.causes.get(index)
            if known is not None and (known[0] is not None or (known[1] and index not in check.leftover)):
                continue  # the first explanation wins (a leftover .grad's note still needs its cause)
            reason = self.analysis.reason(index)
            if reason is None:
                if not self.instruments.armed:  # gone missing outside a window: watch the next steps to find out why
                    self.schedule.await_cause(index)
                continue
            cause, detail = render(index, engine.registry.names[index], reason, self.model_map, self.checkpoint_fix)
            if index in check.leftover:
                detail = with_leftover_note(detail, stale=index in check.stale)
            out[index] = (cause, detail)
            self.schedule.awaiting.discard(index)
        return out

    @_guarded()
    def after_check(self, check: StepCheck) -> None:
        """A step was checked: its reasons are used up; count the window down and open a scheduled one."""
        analysis = self.analysis
        if analysis.reasons:  # empty in the steady state: no per-parameter work there
            analysis.forget(check.checked)
        schedule = self.schedule
        if schedule.steps_left > 0 and schedule.count_step():
            self.close()
        if self.instruments.armed and schedule.out_of_micro_batches and not in_backward():
            self.instruments.disarm()  # the micro-batch budget ran out inside a backward pass (plain loops): here
        if schedule.open_pending and not in_backward():
            schedule.open_pending = False
            self.open()
