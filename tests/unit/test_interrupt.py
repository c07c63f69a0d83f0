"""Signals reach the run however it was started."""

from __future__ import annotations

import os
import signal
import time

import pytest

from alignctl.runs.interrupt import Interrupted, StopRequests, answer_ctrl_c, stop_on_signals


def test_ctrl_c_raises_even_when_inherited_ignored():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # what `cmd &` in a script hands down
    try:
        answer_ctrl_c()
        assert signal.getsignal(signal.SIGINT) not in (signal.SIG_IGN, signal.SIG_DFL)
        with pytest.raises(KeyboardInterrupt):  # Python's own Ctrl-C
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1.0)
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_stop_request_whose_exception_was_swallowed_still_stops_the_loop_before_its_first_step():
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        answer_ctrl_c()
        stop_on_signals()
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1.0)  # the handler raises here
            raise AssertionError("the signal's handler did not run")
        except Interrupted:  # a library's bare except, taking what the handler raised
            pass
        with pytest.raises(Interrupted) as stopped, StopRequests():
            raise AssertionError("the loop ran a step")
        assert stopped.value.signum == signal.SIGTERM and stopped.value.step is None
        with StopRequests() as requests:  # acted on once: the next loop runs
            pass
        assert requests.signum is None
        answer_ctrl_c()
        stop_on_signals()
        with StopRequests() as requests:  # and a command starts with none pending
            pass
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def test_ctrl_c_before_a_command_installs_its_handlers_is_remembered_too():
    previous = signal.getsignal(signal.SIGINT)
    try:
        answer_ctrl_c()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1.0)
        with pytest.raises(Interrupted), StopRequests():
            pass
    finally:
        signal.signal(signal.SIGINT, previous)
