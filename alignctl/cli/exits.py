"""How a command that stops early ends: one line on stderr and an exit code, never a traceback.

Bad input (and a full disk) exits 2 (hydra_app.fail), a non-finite loss 1, a signal 128 + its number, with the
command that resumes (alignctl/runs/interrupt.py).
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from alignctl.cli import app as hydra_app
from alignctl.core.errors import NonFiniteLoss, UserError


@contextmanager
def reported(resume_hint: str | None = None) -> Iterator[None]:
    """Turn the ways a command stops early into one line and an exit code. `resume_hint` is the
    command that continues after a signal (default: `alignctl train resume=<run dir>`)."""
    from alignctl.runs.interrupt import Interrupted, ignore_signals, stop_on_signals

    stop_on_signals()
    try:
        yield
    except UserError as err:
        hydra_app.fail(str(err))
    except Interrupted as err:
        ignore_signals()  # a third Ctrl-C while this line is printed would end in a traceback
        # What decides the message is whether a checkpoint exists, not whether a step was counted: a
        # second signal (or one while a resumed run restores) stops a run that has checkpoints too.
        if err.checkpoint:
            from alignctl.runs.resume import resume_command

            after = f" after step {err.step}" if err.step is not None else ""
            print(f"alignctl: interrupted by {err.signal_name}{after}; checkpoint {err.checkpoint}; "
                  f"resume with: {resume_hint or resume_command(err.run_dir)}", file=sys.stderr)
        elif err.step is None:
            print(f"alignctl: interrupted by {err.signal_name} before training started; nothing to resume", file=sys.stderr)
        else:
            print(f"alignctl: interrupted by {err.signal_name} after step {err.step}, before its first checkpoint was "
                  "complete; nothing to resume (start it again)", file=sys.stderr)
        raise SystemExit(err.exit_code) from None
    except BrokenPipeError:
        reader_gone()
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # A full disk outside a checkpoint save (metrics, lineage, eval.json): still one line; a save
        # itself says more (alignctl/train/checkpoint.py).
        hydra_app.fail(f"{err.filename or 'a file'}: {os.strerror(err.errno).lower()} while writing it; free space there "
                       "and run again (a run's checkpoints are kept: resume=<run dir> continues from the newest)")
    except NonFiniteLoss as err:
        print(f"alignctl: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None


def reader_gone() -> None:
    """The reader of stdout went away (`alignctl runs | head`): stop quietly, as `cat` does, with
    stdout pointed at /dev/null so the interpreter's last flush has nowhere to fail."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    raise SystemExit(128 + 13)  # SIGPIPE's exit status in a shell
