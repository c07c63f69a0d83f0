"""Fixtures for the integration tests: the real `alignctl` CLI in subprocesses, offline, with one
tiny-model cache per test session (built by the first run that needs it, reused by the rest)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
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


@pytest.fixture(scope="session")
def run_cmd() -> Callable[..., CliResult]:
    """`run_cmd(args, cwd=None, timeout=..., env=None)`: run any command, capture its output and time."""
    return run_process


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture
def alignctl(tmp_path) -> Callable[..., CliResult]:
    """Run `python -m alignctl <args>` (the real CLI, in a fresh interpreter) from a scratch directory."""

    def run(*args: str, cwd: Path | None = None, timeout: float = TRAIN_TIMEOUT) -> CliResult:
        return run_process([sys.executable, "-m", "alignctl", *args], cwd=cwd or tmp_path, timeout=timeout)

    return run


SFT_STEPS = 600  # the recipe default


@pytest.fixture(scope="session")
def learned_sft_run(tmp_path_factory) -> tuple[Path, CliResult]:
    """One default SFT run on the built-in task (about a minute), shared by the tests that need a
    policy that already half-knows the task: the SFT learning test and the RL stages built on it."""
    run_dir = tmp_path_factory.mktemp("learned") / "sft"
    args = ["train", "recipe=sft", f"recipe.max_steps={SFT_STEPS}", "recipe.eval_every=0", "data.eval_limit=500", f"hydra.run.dir={run_dir}"]
    # This run is about learning, not about sharing the CPU: let torch use both cores.
    result = run_process([sys.executable, "-m", "alignctl", *args], cwd=run_dir.parent, env={"OMP_NUM_THREADS": "2"})
    return run_dir, result
