"""Claiming a run directory before anything is written into it.

Every way a training starts (`alignctl train`, a -m sweep's job, a pipeline's stage) claims its run
directory first, in this order, and refuses in one line (exit 2) with nothing changed:

1. the directory is not inside a folder another run manages (alignctl/runs/outputs.py);
2. a resume keeps the run's identity: recipe, model, adapter, inputs, data (resume.check_same_run);
3. no parent run is still training, unless inputs.allow_running=true (alignctl/runs/parents.py);
4. the directory's lock: one process tree at a time (alignctl/runs/runlock.py);
5. then, as its owner: a resume has a checkpoint to start from, a fresh run finds none to overwrite.

`alignctl train` claims before Hydra starts its job (Hydra writes .hydra/ into the directory, and that
is the command line a resume replays), and pins hydra.run.dir to the directory it claimed, so a
`${now:...}` default cannot name another second. The lock is held until the process exits; a sweep's
jobs and a pipeline's stages, which run one after another in one process, release theirs as each ends.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alignctl.runs import runlock
from alignctl.runs.outputs import check_output, evaluated_runs
from alignctl.runs.parents import check_not_running


def command_line() -> str:
    return shlex.join(["alignctl", *sys.argv[1:]])


def claim(run_config: Any, cfg: Any, run_dir: Path, command: str | None = None) -> None:
    """Check and lock `run_dir` for this process (see the module's docstring); UserError if refused."""
    from alignctl.runs.resume import check_run_dir, check_same_run
    from alignctl.runs.runfiles import check_run_files

    check_output(run_dir, "hydra.run.dir", evaluating=evaluated_runs(run_config))
    if run_config.resume:
        check_run_files(run_dir)  # a damaged lineage, record or checkpoint: one line naming the file
        check_same_run(cfg, run_dir)
    check_not_running(run_config)
    existed = run_dir.exists()
    runlock.acquire(run_dir, command or command_line())
    try:
        check_run_dir(run_config, run_dir)
    except BaseException:
        runlock.release(run_dir)
        if not existed:  # leave no trace of a refused run
            try:
                run_dir.rmdir()
            except OSError:
                pass
        raise


@contextmanager
def owned(run_config: Any, cfg: Any, run_dir: Path, command: str | None = None) -> Iterator[None]:
    """Claim `run_dir` for the block, unless this process (or the one that started it, torchrun's
    parent) owns it already; release what was claimed here at the end."""
    if runlock.holds(run_dir):
        yield
        return
    claim(run_config, cfg, run_dir, command)
    try:
        yield
    finally:
        runlock.release(run_dir)


def outer_rank() -> int | None:
    """This process's rank when an outer launcher (torchrun, srun) started several, else None."""
    env = os.environ
    if "WORLD_SIZE" in env and "RANK" in env and int(env["WORLD_SIZE"]) > 1:
        return int(env["RANK"])
    if "SLURM_NTASKS" in env and "SLURM_PROCID" in env and int(env["SLURM_NTASKS"]) > 1:
        return int(env["SLURM_PROCID"])
    return None


def preflight(cfg: Any, args: list[str]) -> list[str]:
    """Claim the directory of a single `alignctl train` job before Hydra starts it; its arguments
    with hydra.run.dir pinned to that directory."""
    from omegaconf import OmegaConf

    from alignctl.config.validation import validate

    given = [a for a in args if a.startswith("hydra.run.dir=")]
    run_dir = Path(str(OmegaConf.select(cfg, "hydra.run.dir")))
    rank = outer_rank()
    if runlock.holds(run_dir) or (rank is not None and not given):
        return args  # a worker of a claimed run; or processes that need one directory (distributed.run_stage says so)
    run_config = validate(cfg)
    if rank is None or rank == 0:
        claim(run_config, cfg, run_dir)
    else:  # the other processes of an outer launch: rank 0 owns the directory for them
        check_output(run_dir, "hydra.run.dir", evaluating=evaluated_runs(run_config))
    if given and given[-1] == f"hydra.run.dir={run_dir}":
        return args
    return [*args, f"hydra.run.dir={_quoted(str(run_dir))}"]


def _quoted(value: str) -> str:
    """A path as a Hydra override value: bare when it can be, else single-quoted."""
    if re.fullmatch(r"[\w./+@%:-]+", value):
        return value
    return "'" + value.replace("'", "\\'") + "'"  # Hydra: a backslash is literal unless it precedes a quote
