"""Signals reach the run however it was started."""

from __future__ import annotations

import signal

from alignctl.runs.interrupt import answer_ctrl_c


def test_ctrl_c_raises_even_when_inherited_ignored():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # what `cmd &` in a script hands down
    try:
        answer_ctrl_c()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
