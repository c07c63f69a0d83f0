"""Safe interruption: SIGINT (Ctrl-C) and SIGTERM (Slurm preemption, `kill`) stop a run at a step
boundary with a checkpoint, never in the middle of an update or a save.

Inside the training loop the first signal only raises a flag: the loop finishes the current step,
saves, and raises `Interrupted`; the CLI prints the command that resumes and exits 128 + the signal
number (130 for SIGINT, 143 for SIGTERM), as shells and Slurm expect. A second signal stops at once
(the previous checkpoint is intact: saves are atomic). Outside the loop (loading models and data)
there is nothing to save, and a signal stops the run straight away.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from alignctl.runs.runfiles import latest_checkpoint

HANDLED = (signal.SIGINT, signal.SIGTERM)
# The signals this process's handlers have taken and no training loop has acted on yet. A handler
# raises where the program is, and a library's bare `except` (or a C++ callback turning it into an
# error that an `except Exception` takes) can swallow what it raised: twice a run sent SIGINT while it
# loaded trained to the end with exit 0. The loop checks this before its first step, so a stop request
# that reached the process is acted on whatever happened to its exception.
_received: list[int] = []


class Interrupted(BaseException):
    """A run stopped by a signal. A BaseException, like KeyboardInterrupt, so no `except Exception`
    in a stage or a library swallows it."""

    def __init__(self, signum: int, step: int | None = None):
        super().__init__(f"{signal.Signals(signum).name} at step {step}")
        self.signum, self.step = signum, step
        self.checkpoint: str | None = None  # filled in by whoever knows the run directory
        self.run_dir: str | None = None

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


def answer_ctrl_c() -> None:
    """Make SIGINT raise KeyboardInterrupt even if this process inherited it ignored.

    A shell without job control starts background commands (`cmd &` in a script, some CI runners
    and batch wrappers) with SIGINT ignored, and Python then leaves it ignored: `kill -INT` would be
    lost until the stage installs its own handlers, and a run told to stop would train to the end.
    The handler is Python's own (KeyboardInterrupt), remembering the request (`_received`)."""
    _received.clear()  # a command starts with no request pending (tests run several in one process)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _keyboard_interrupt)


def _keyboard_interrupt(signum: int, frame: FrameType | None) -> None:
    _received.append(signum)
    signal.default_int_handler(signum, frame)


def _raise_now(signum: int, frame: FrameType | None) -> None:
    _received.append(signum)
    raise Interrupted(signum)


def stop_on_signals() -> None:
    """Outside the loop: SIGINT and SIGTERM raise `Interrupted` where the program is (main thread only)."""
    if threading.current_thread() is threading.main_thread():
        for signum in HANDLED:
            signal.signal(signum, _raise_now)


def ignore_signals() -> None:
    """Once a run is stopping and its line is being printed: further SIGINT/SIGTERM change nothing."""
    if threading.current_thread() is threading.main_thread():
        for signum in HANDLED:
            signal.signal(signum, signal.SIG_IGN)


class StopRequests:
    """Within the loop: the first signal is recorded in `signum` for the loop to act on at the end of
    the step; a second one raises at once. Restores the previous handlers on exit."""

    def __init__(self, on_request=None):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        self._on_request = on_request

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            raise Interrupted(signum)
        self.signum = signum
        if self._on_request is not None:
            self._on_request(signum)

    def __enter__(self) -> StopRequests:
        if _received:  # a signal came before the loop and its exception was swallowed on the way out
            signum = _received[0]
            _received.clear()
            raise Interrupted(signum)
        if threading.current_thread() is threading.main_thread():
            for signum in HANDLED:
                self._previous[signum] = signal.signal(signum, self._record)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


@contextmanager
def naming_checkpoint(run_dir: Path) -> Iterator[None]:
    """Give an `Interrupted` raised anywhere in a run (loading, restoring, after the loop) the run
    directory and its newest checkpoint, when no one nearer the loop did: a run with checkpoints is
    never reported as having nothing to resume."""
    try:
        yield
    except Interrupted as err:
        if not err.checkpoint:
            checkpoint = latest_checkpoint(Path(run_dir))
            err.run_dir, err.checkpoint = str(run_dir), str(checkpoint) if checkpoint else None
        raise
