"""The Hugging Face Trainer's logging as a destination of GradGuard's metrics (see :mod:`.hf`).

A ``TrainerCallback`` cannot add values to the Trainer's own logs before the reporting callbacks see them: the
Trainer puts its logs in ``state.log_history`` before any callback runs, and calls the callbacks in the order of its
list, the integrations of ``report_to`` first. So :class:`TrainerLogs` makes GradGuard's metrics a log event of their
own, at the step the Trainer logs its loss at:

* an entry in ``trainer.state.log_history`` (``{"gradguard/total_norm": ..., "epoch": ..., "step": ...}``);
* ``on_log`` of every reporting callback of the Trainer (W&B, MLflow, Comet, ... whatever ``report_to`` named),
  with these metrics as the logs;
* TensorBoard (when the Trainer has its TensorBoard callback): a ``SummaryWriter`` of GradGuard's own in that
  callback's run directory, so that the tags are GradGuard's (``gradguard/norm/...``, the dashboard's layout and
  report; the Trainer's callback would write them under ``train/``) and the writer outlives the callback's, which the
  Trainer closes before GradGuard writes its final report.

The reporter's logger sink calls :meth:`TrainerLogs.log_metrics` (as with a Lightning logger) once a logging step's
values have reached the host; the adapter calls :meth:`TrainerLogs.publish` from the Trainer's next event.
"""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Mapping
from typing import Any, Optional

from torch.utils.tensorboard import SummaryWriter

from lightning_gradguard.output.sinks.tensorboard import writer_log_dir

_TENSORBOARD = "TensorBoardCallback"


class TrainerLogs:
    """GradGuard's logging steps, handed to the Trainer's log history, reporting callbacks and TensorBoard.

    Args:
        handler: the Trainer's ``CallbackHandler`` (None when it was not found: the log history only).
        args: the ``TrainingArguments``.
        writes: this process writes (the world process zero).

    Example::

        logs = TrainerLogs(calling_handler(callback), args, writes=state.is_world_process_zero)
        logs.log_metrics({"gradguard/total_norm": 1.5}, step=9)     # the reporter's logger sink
        logs.publish(args, state, control, kwargs)                   # at the Trainer's next event

    """

    def __init__(self, handler: Any, args: Any, writes: bool) -> None:
        callbacks = _reporting_callbacks(handler) if handler is not None else []
        tensorboard = [cb for cb in callbacks if type(cb).__name__ == _TENSORBOARD]
        self.callbacks = [cb for cb in callbacks if type(cb).__name__ != _TENSORBOARD]
        self.writer: Optional[SummaryWriter] = None
        if tensorboard and writes:
            self.writer = StepAfterWriter(_tensorboard_dir(tensorboard[0], args))
        self.pending: list[tuple[int, dict[str, float]]] = []

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """A logging step's metrics, by GradGuard's step number: kept for :meth:`publish` at the Trainer's (its logs
        carry the ``global_step`` after the step)."""
        self.pending.append((step + 1, dict(metrics)))

    def publish(self, args: Any, state: Any, control: Any, kwargs: Mapping[str, Any]) -> None:
        """Hand the metrics kept so far to the log history and the reporting callbacks (``kwargs``: the event's)."""
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        others = {key: value for key, value in kwargs.items() if key != "logs"}
        for step, metrics in pending:
            entry = {**metrics, "epoch": state.epoch} if state.epoch is not None else dict(metrics)
            state.log_history.append({**entry, "step": step})
            at_step = state
            if step != state.global_step:  # a step whose values landed late (an accelerator's copy)
                at_step = copy.copy(state)
                at_step.global_step = step
            for callback in self.callbacks:
                callback.on_log(args, at_step, control, logs=dict(metrics), **others)
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class StepAfterWriter(SummaryWriter):
    """A ``SummaryWriter`` that numbers entries as the Trainer numbers its logs: a step's entries at the
    ``global_step`` after it, next to the Trainer's own ``train/loss`` and ``train/grad_norm``."""

    def add_scalar(self, tag: str, value: Any, global_step: Optional[int] = None, *args: Any, **kwargs: Any) -> None:
        super().add_scalar(tag, value, _after(global_step), *args, **kwargs)

    def add_text(self, tag: str, text: str, global_step: Optional[int] = None, *args: Any, **kwargs: Any) -> None:
        super().add_text(tag, text, _after(global_step), *args, **kwargs)

    def add_image(self, tag: str, image: Any, global_step: Optional[int] = None, *args: Any, **kwargs: Any) -> None:
        super().add_image(tag, image, _after(global_step), *args, **kwargs)

    def add_histogram_raw(self, tag: str, *args: Any, **kwargs: Any) -> None:
        if "global_step" in kwargs:
            kwargs["global_step"] = _after(kwargs["global_step"])
        elif len(args) >= 8:  # min, max, num, sum, sum_squares, bucket_limits, bucket_counts, global_step
            args = (*args[:7], _after(args[7]), *args[8:])
        super().add_histogram_raw(tag, *args, **kwargs)


def _after(step: Optional[int]) -> Optional[int]:
    return None if step is None else step + 1


def calling_handler(callback: Any) -> Any:
    """The Trainer's ``CallbackHandler`` that is calling ``callback``'s event method now, or None.

    The Trainer gives callbacks no reference to itself or to the other callbacks (huggingface/transformers#38181);
    the handler that calls an event is the caller of the callback's method, so it is looked for there.
    """
    frame = sys._getframe(2)
    for _ in range(4):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if type(owner).__name__ == "CallbackHandler" and any(c is callback for c in getattr(owner, "callbacks", ())):
            return owner
        frame = frame.f_back
    return None


def calling_trainer() -> Any:
    """The ``Trainer`` whose ``train()`` is calling a callback's event now (found as the handler's caller), or None."""
    frame = sys._getframe(2)
    for _ in range(8):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if hasattr(owner, "callback_handler") and hasattr(owner, "model_wrapped"):
            return owner
        frame = frame.f_back
    return None


def compiled_wrapper(trainer: Any, model: Any) -> Any:
    """``trainer.model_wrapped`` when it is ``torch.compile(model)`` (``TrainingArguments(torch_compile=True)``),
    else None: the guard then watches the compiled module, whose hooks run outside the compiled code."""
    wrapped = getattr(trainer, "model_wrapped", None)
    if type(wrapped).__name__ == "OptimizedModule" and getattr(wrapped, "_orig_mod", None) is model:
        return wrapped
    return None


def _reporting_callbacks(handler: Any) -> list[Any]:
    """The callbacks that send logs somewhere (the integrations of ``report_to``, or added by hand)."""
    try:
        from transformers.integrations import INTEGRATION_TO_CALLBACK
    except ImportError:  # pragma: no cover - a transformers without it
        return []
    kinds = tuple(set(INTEGRATION_TO_CALLBACK.values()))
    return [callback for callback in handler.callbacks if isinstance(callback, kinds)]


def _tensorboard_dir(callback: Any, args: Any) -> str:
    """The run directory of the Trainer's TensorBoard callback (its writer exists once its on_train_begin ran)."""
    writer = getattr(callback, "tb_writer", None)
    directory = writer_log_dir(writer) if writer is not None else None
    directory = directory or getattr(callback, "logging_dir", None) or getattr(args, "logging_dir", None)
    return os.fspath(directory or os.path.join(args.output_dir, "runs"))


__all__ = ["TrainerLogs", "StepAfterWriter", "calling_handler"]
