"""When the instruments are in: the diagnosis windows of a run.

Watching the forward pass costs time, so it happens only in windows: the first optimizer steps of a run, and the
steps right after a parameter first goes missing without a known cause (once per parameter and run). Outside a
window nothing is installed. A window lasts a number of optimizer steps and keeps its instruments for at most a
number of micro-batches (a window whose optimizer never steps still ends). A run opens a bounded number of
windows, so a model whose parameters keep going missing (a mixture of experts without ``allow_none``) does not
pay for diagnosis at every step.
"""

from __future__ import annotations


class WindowSchedule:
    """Counts a run's diagnosis windows down; says when one opens, ends, or is due.

    Args:
        steps: optimizer steps a window watches.
        micro_batches: the most micro-batches a window keeps its instruments for.
        max_windows: windows per run, the first one included.

    Example::

        schedule = WindowSchedule(steps=2, micro_batches=32, max_windows=8)
        schedule.open()             # the first window of the run
        schedule.count_step()       # False: one step left (call it only while schedule.active)
        schedule.count_step()       # True: the window's last step was checked

    """

    def __init__(self, steps: int, micro_batches: int, max_windows: int) -> None:
        self.steps = steps
        self.micro_batches = micro_batches
        self.max_windows = max_windows
        self.opened = 0  # windows opened in this run
        self.steps_left = 0
        self.micro_batches_left = 0
        self.open_pending = False  # a window is due at the next point where instruments can go in
        self.awaiting: set[int] = set()  # parameters a reopened window is looking at
        self._attempted: set[int] = set()  # parameters a window was reopened for in this run

    @property
    def active(self) -> bool:
        return self.steps_left > 0

    @property
    def out_of_micro_batches(self) -> bool:
        return self.micro_batches_left < 0

    def start_run(self) -> None:
        self.opened = 0
        self._attempted.clear()
        self.awaiting.clear()

    def open(self) -> bool:
        """Open a window, or start the open one's count again; False when the run has used up its windows."""
        if self.opened >= self.max_windows:
            return False
        if not self.active:
            self.opened += 1
        self.steps_left = self.steps
        self.micro_batches_left = self.micro_batches
        return True

    def close(self) -> None:
        self.steps_left = 0
        self.open_pending = False

    def count_micro_batch(self) -> bool:
        """A micro-batch of the open window started; True once the window has used up its micro-batches."""
        self.micro_batches_left -= 1
        return self.micro_batches_left < 0

    def count_step(self) -> bool:
        """A step of the open window was checked; True when it was the window's last."""
        self.steps_left -= 1
        return self.steps_left <= 0

    def await_cause(self, index: int) -> None:
        """Parameter ``index`` went missing without a known cause: reopen a window for it, once per run."""
        if index not in self._attempted:
            self._attempted.add(index)
            self.awaiting.add(index)
            self.open_pending = True
