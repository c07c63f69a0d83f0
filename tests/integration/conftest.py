"""Fixtures for the integration tests: the real `alignctl` CLI, offline, with one tiny-model cache per
test session (built by the first run that needs it, reused by the rest).

The CLI runs either in a subprocess (`python -m alignctl`, the real process: exit codes, signals,
torchrun, stderr as a user sees it) or in this process (`run_inprocess`): the same entry point and
arguments, without the ~8 s a fresh interpreter spends importing torch, transformers and peft.
Tests about a stage's behaviour (losses, checkpoints, lineage, metrics) run in-process; tests about
the process itself keep the subprocess."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# A CLI training run of a few steps takes seconds; this only stops a hung run from hanging the suite.
TRAIN_TIMEOUT = 600


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def stderr_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]

    def describe(self) -> str:
        return f"exit {self.returncode} after {self.seconds:.1f}s\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"


@pytest.fixture(scope="session", autouse=True)
def offline_env(tmp_path_factory) -> dict[str, str]:
    """Environment shared by the session: its own ALIGNCTL_CACHE and datasets cache, hubs offline."""
    root = tmp_path_factory.mktemp("session_env")
    values = {
        "ALIGNCTL_CACHE": str(root / "alignctl_cache"),
        "HF_DATASETS_CACHE": str(root / "hf_datasets"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
        # One torch thread per process: on a small, shared CPU box (tests, other jobs) torch's default
        # of one thread per core oversubscribes the cores and a tiny-model step takes seconds, not 0.1 s.
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    with pytest.MonkeyPatch.context() as patch:
        for key, value in values.items():
            patch.setenv(key, value)
        patch.delenv("HYDRA_FULL_ERROR", raising=False)  # the tests check that no traceback is printed
        yield values


def run_process(args: list[str], cwd: Path | None = None, timeout: float = TRAIN_TIMEOUT, env: dict | None = None) -> CliResult:
    start = time.monotonic()
    done = subprocess.run(
        args,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    return CliResult(done.returncode, done.stdout, done.stderr, time.monotonic() - start)


# What a fresh interpreter starts with (before pytest wraps each test in its own warning capture).
_WARNING_FILTERS = list(warnings.filters)


def _alignctl_command(args: list[str]) -> list[str] | None:
    """The CLI arguments of `args` when it is `python -m alignctl ...`, else None."""
    if len(args) >= 3 and args[0] == sys.executable and args[1:3] == ["-m", "alignctl"]:
        return list(args[3:])
    return None


@contextlib.contextmanager
def _captured_fds() -> Iterator[list[str]]:
    """Capture file descriptors 1 and 2 (Python's prints and anything C code writes), as a
    subprocess's pipes would; yields a list that holds [stdout, stderr] afterwards."""
    out: list[str] = []
    sys.stdout.flush()
    sys.stderr.flush()
    saved_fds = [os.dup(1), os.dup(2)]
    saved_streams = sys.stdout, sys.stderr
    files = [tempfile.TemporaryFile(mode="w+b"), tempfile.TemporaryFile(mode="w+b")]
    try:
        for fd, file in zip((1, 2), files):
            os.dup2(file.fileno(), fd)
        sys.stdout = open(1, "w", encoding="utf-8", errors="replace", closefd=False, buffering=1)  # noqa: SIM115
        sys.stderr = open(2, "w", encoding="utf-8", errors="backslashreplace", closefd=False, buffering=1)  # noqa: SIM115
        yield out
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        sys.stdout, sys.stderr = saved_streams
        for fd, saved in zip((1, 2), saved_fds):
            os.dup2(saved, fd)
            os.close(saved)
        for file in files:
            file.seek(0)
            out.append(file.read().decode("utf-8", errors="replace"))
            file.close()


@contextlib.contextmanager
def _process_state(cwd: Path, env: dict[str, str]) -> Iterator[None]:
    """What a CLI run changes in its process, put back afterwards: working directory, environment,
    argv, sys.path and the modules imported from the working directory (a user's reward functions),
    signal handlers, torch threads, warning filters, logging, Hydra's global state and the
    bitsandbytes gate."""
    from hydra.core.global_hydra import GlobalHydra

    saved_cwd, saved_env, saved_argv, saved_path = os.getcwd(), dict(os.environ), list(sys.argv), list(sys.path)
    cwd = Path(cwd).resolve()
    modules_before = set(sys.modules)
    saved_signals = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    saved_bnb = sys.modules.get("bitsandbytes", KeyError)
    torch = sys.modules.get("torch")
    saved_threads = torch.get_num_threads() if torch is not None else None
    root = logging.getLogger()
    saved_root = root.handlers[:], root.level
    saved_loggers = {name: (lg.level, lg.disabled) for name, lg in logging.root.manager.loggerDict.items() if isinstance(lg, logging.Logger)}
    GlobalHydra.instance().clear()
    try:
        os.chdir(cwd)
        sys.path.insert(0, str(cwd))  # as `python -m` puts the working directory first
        os.environ.update(env)
        # The in-process run stays in this interpreter: no re-exec under another allocator.
        os.environ["ALIGNCTL_ALLOCATOR_SET"] = "1"
        if torch is not None:  # a fresh process would read OMP_NUM_THREADS when torch starts
            torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or saved_threads))
        root.handlers = []  # as in a fresh process: warnings go to stderr (logging's last resort)
        with warnings.catch_warnings():
            warnings.filters[:] = _WARNING_FILTERS
            warnings.showwarning = warnings._showwarning_orig  # pytest records them; a process prints them
            warnings.onceregistry.clear()
            warnings._filters_mutated()  # forget which warnings were already shown once
            yield
    finally:
        GlobalHydra.instance().clear()
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        sys.argv[:] = saved_argv
        sys.path[:] = saved_path
        if not {REPO, Path(sys.prefix).resolve()} & {cwd, *cwd.parents}:  # a scratch directory, not the code's
            for name in set(sys.modules) - modules_before:  # a fresh process would import them again
                if cwd in Path(getattr(sys.modules[name], "__file__", None) or "/").resolve().parents:
                    del sys.modules[name]
        for signum, handler in saved_signals.items():
            signal.signal(signum, handler)
        if saved_bnb is KeyError and sys.modules.get("bitsandbytes", KeyError) is None:
            _unblock_bitsandbytes()  # held back by the run; one that imported it keeps it (it cannot be unimported)
        if torch is not None:
            torch.set_num_threads(saved_threads)
        root.handlers, root.level = saved_root
        for name, (level, disabled) in saved_loggers.items():
            logger = logging.root.manager.loggerDict.get(name)
            if isinstance(logger, logging.Logger):
                logger.level, logger.disabled = level, disabled


def _unblock_bitsandbytes() -> None:
    """Undo the CLI's bitsandbytes gate (alignctl/core/bitsandbytes_gate.py) in this process, without
    importing bitsandbytes: drop the placeholder and the availability answers cached meanwhile."""
    from alignctl.core.bitsandbytes_gate import forget_cached_answers

    del sys.modules["bitsandbytes"]
    forget_cached_answers()


def _at_exit() -> None:
    """What alignctl leaves to the interpreter's exit (atexit): the run directories' locks it holds."""
    runlock = sys.modules.get("alignctl.runs.runlock")
    if runlock is not None:
        runlock._release_all()


def run_inprocess(args: list[str], cwd: Path | None = None, env: dict | None = None) -> CliResult:
    """`alignctl <args>` in this interpreter: cli.main() with this argv, its output captured at the
    file descriptors and its exit code taken from SystemExit, as `python -m alignctl` would give.
    An uncaught exception prints its traceback and exits 1, as the interpreter does."""
    from alignctl.cli import main as cli

    start = time.monotonic()
    code = 0
    with _process_state(cwd or Path.cwd(), {k: str(v) for k, v in (env or {}).items()}), _captured_fds() as out:
        sys.argv = [str(Path(cli.__file__).parents[1] / "__main__.py"), *args]
        try:
            cli.main()
        except SystemExit as done:
            if done.code is None:
                code = 0
            elif isinstance(done.code, int):
                code = done.code
            else:
                print(done.code, file=sys.stderr)
                code = 1
        except BaseException:  # noqa: BLE001 - what the interpreter does with an uncaught exception
            traceback.print_exc()
            code = 1
        finally:
            _at_exit()
    return CliResult(code, out[0], out[1], time.monotonic() - start)


def run_cli(args: list[str], cwd: Path | None = None, timeout: float = TRAIN_TIMEOUT, env: dict | None = None, inprocess: bool = True) -> CliResult:
    """`alignctl <args>`: in this process by default, in a fresh `python -m alignctl` with inprocess=False
    (`timeout` bounds a subprocess only: an in-process run cannot be stopped from outside)."""
    if inprocess:
        return run_inprocess(list(args), cwd=cwd, env=env)
    return run_process([sys.executable, "-m", "alignctl", *args], cwd=cwd, timeout=timeout, env=env)


@pytest.fixture(scope="session")
def run_cmd() -> Callable[..., CliResult]:
    """`run_cmd(args, cwd=None, timeout=..., env=None)`: run any command, capture its output and time."""
    return run_process


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture
def alignctl(tmp_path) -> Callable[..., CliResult]:
    """Run `alignctl <args>` from a scratch directory: in this process (`run_inprocess`), or with
    inprocess=False in a fresh `python -m alignctl` (where the process itself is under test)."""

    def run(*args: str, cwd: Path | None = None, timeout: float = TRAIN_TIMEOUT, env: dict | None = None, inprocess: bool = True) -> CliResult:
        return run_cli(list(args), cwd=cwd or tmp_path, timeout=timeout, env=env, inprocess=inprocess)

    return run


SFT_STEPS = 600  # the recipe default


@pytest.fixture(scope="session")
def learned_sft_run(tmp_path_factory) -> tuple[Path, CliResult]:
    """One default SFT run on the built-in task (about a minute), shared by the tests that need a
    policy that already half-knows the task: the SFT learning test and the RL stages built on it."""
    run_dir = tmp_path_factory.mktemp("learned") / "sft"
    args = ["train", "recipe=sft", f"recipe.max_steps={SFT_STEPS}", "recipe.eval_every=0", "data.eval_limit=500", f"hydra.run.dir={run_dir}"]
    # This run is about learning, not about sharing the CPU: let torch use both cores.
    result = run_cli(args, cwd=run_dir.parent, env={"OMP_NUM_THREADS": "2"})
    return run_dir, result


@pytest.fixture(scope="session")
def quick_sft_run(tmp_path_factory) -> tuple[Path, CliResult]:
    """A short SFT run (a few seconds), for the tests that need an SFT parent but not a policy that
    knows the task: stage mechanics, metrics, lineage, checkpoints. Learning tests use learned_sft_run."""
    run_dir = tmp_path_factory.mktemp("quick") / "sft"
    args = ["train", "recipe=sft", "recipe.max_steps=40", "recipe.eval_every=0", "data.eval_limit=16", f"hydra.run.dir={run_dir}"]
    return run_dir, run_cli(args, cwd=run_dir.parent)
