"""One process tree per run directory: `<run>/.alignctl.lock`.

Two trainings in one directory interleave metrics.jsonl and leave whichever config and checkpoint
finished last, so a run directory is owned by one process tree at a time. The owner holds an
exclusive `flock` on the lock file, which also records who it is (pid, host, start time, command)
for the message the next process prints. flock is released by the kernel when its holder dies, so a
run killed with SIGKILL leaves a file that no one holds: the next process takes it over. The holder
deletes the file when it releases it.

Under torchrun (hardware.nproc > 1) the alignctl process that starts torchrun holds the lock; its
descriptor is passed to torchrun (distributed.relaunch), so the lock lives as long as any process of
the tree, and the workers, which find their directory in ALIGNCTL_HELD_RUN_DIRS, do not lock it again.

Imported by the CLI before anything heavy: standard library only.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from alignctl.core.errors import UserError

LOCK_NAME = ".alignctl.lock"
# Run directories an ancestor process holds (os.pathsep-separated): a torchrun worker's own run.
HELD_ENV = "ALIGNCTL_HELD_RUN_DIRS"

try:
    import fcntl
except ImportError:  # not POSIX: fall back to the recorded pid (see _take_unlocked)
    fcntl = None  # type: ignore[assignment]


@dataclass(frozen=True)
class Holder:
    pid: int
    host: str
    started_at: str
    command: str

    def describe(self) -> str:
        where = "" if self.host == socket.gethostname() else f" on {self.host}"
        return f"pid {self.pid}{where}, since {self.started_at}: {self.command}"


class RunDirBusy(UserError):
    """Another live process owns the run directory."""


_HELD: dict[Path, int] = {}  # run dir (absolute) -> descriptor of its locked lock file
_INHERITED = [d for d in os.environ.get(HELD_ENV, "").split(os.pathsep) if d]  # held by the process that started this one


def _key(run_dir: Path) -> Path:
    return Path(os.path.abspath(os.path.expanduser(run_dir)))


def holds(run_dir: Path) -> bool:
    """This process, or the process that started it (torchrun's parent), owns `run_dir`."""
    key = _key(run_dir)
    return key in _HELD or str(key) in _INHERITED


def held_descriptors() -> tuple[int, ...]:
    """The lock descriptors a child process should inherit to keep the runs locked while it lives."""
    return tuple(_HELD.values())


def acquire(run_dir: Path, command: str, key_name: str = "hydra.run.dir") -> None:
    """Lock `run_dir` (created if missing) for this process, or raise RunDirBusy naming the holder."""
    key = _key(run_dir)
    if key in _HELD:
        return
    key.mkdir(parents=True, exist_ok=True)
    path = key / LOCK_NAME
    for _ in range(20):  # only a holder releasing (unlinking) at this moment makes us go round again
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            locked = _lock(fd, path)
        except BaseException:
            os.close(fd)
            raise
        if not locked:
            os.close(fd)
            holder = read_holder(key, wait=True)
            who = holder.describe() if holder else "another process"
            raise RunDirBusy(f"{key_name}={key}: in use by another alignctl run ({who}); wait for it to end or choose "
                             "another directory (nothing there was changed)")
        try:  # the file we locked must still be the one at `path`: a releasing holder unlinks it
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": command}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        os.fsync(fd)
        _HELD[key] = fd
        _export()
        return
    raise RunDirBusy(f"{key_name}={key}: its lock file {path} keeps changing; another process is starting there")


def _lock(fd: int, path: Path) -> bool:
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError:  # a file system without flock: judge by the recorded holder
            pass
    holder = read_holder(path.parent)
    return holder is None or not _alive(holder)


def _alive(holder: Holder) -> bool:
    """Whether the recorded holder still runs (a pid can only be checked on this host: assume it does elsewhere)."""
    if holder.host != socket.gethostname():
        return True
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return holder.pid != os.getpid()


def read_holder(run_dir: Path, wait: bool = False) -> Holder | None:
    """Who the lock file names (its holder writes it just after locking: `wait` gives it a moment)."""
    path = _key(run_dir) / LOCK_NAME
    for _ in range(20 if wait else 1):
        try:
            data = json.loads(path.read_text())
            return Holder(int(data["pid"]), str(data["host"]), str(data["started_at"]), str(data["command"]))
        except (OSError, ValueError, KeyError, TypeError):
            if wait:
                time.sleep(0.05)
    return None


def live_holder(run_dir: Path) -> Holder | None:
    """The process that owns `run_dir` now, or None when no live process holds its lock."""
    key = _key(run_dir)
    path = key / LOCK_NAME
    if holds(key) or not path.exists():
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        if fcntl is None:
            holder = read_holder(key)
            return holder if holder is not None and _alive(holder) else None
        try:  # a shared lock conflicts only with an owner's exclusive one
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return read_holder(key, wait=True) or Holder(0, socket.gethostname(), "?", "unknown command")
        except OSError:
            holder = read_holder(key)
            return holder if holder is not None and _alive(holder) else None
        return None
    finally:
        os.close(fd)


def release(run_dir: Path) -> None:
    """Give `run_dir` up: delete the lock file (while still holding it), then unlock."""
    key = _key(run_dir)
    fd = _HELD.pop(key, None)
    if fd is None:
        return
    try:
        if os.fstat(fd).st_ino == os.stat(key / LOCK_NAME).st_ino:
            (key / LOCK_NAME).unlink()
    except OSError:
        pass
    os.close(fd)
    _export()


def _export() -> None:
    held = list(dict.fromkeys([*_INHERITED, *(str(k) for k in _HELD)]))
    if held:
        os.environ[HELD_ENV] = os.pathsep.join(held)
    else:
        os.environ.pop(HELD_ENV, None)


@atexit.register
def _release_all() -> None:
    for run_dir in list(_HELD):
        release(run_dir)
