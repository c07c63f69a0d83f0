"""Starting a training run's processes: this one, or several under torchrun, then the stage.

`hardware.nproc` > 1 re-runs the same `alignctl train` command under torchrun (as `tune run
--nproc_per_node` does); a process torchrun or srun started joins the group (alignctl/core/distributed.py).
Before the stage loads any weights, the run is checked against the memory this machine has
(alignctl/cli/memory_check.py).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading

import torch

from alignctl.core import distributed
from alignctl.core.errors import ConfigError
from alignctl.runs import runlock


def relaunch(overrides: list[str], run_dir: str, nproc: int, device: str) -> int:
    """Run this training command again as `nproc` processes under torchrun; its exit code.

    The run directory is fixed for all of them (a `${now:...}` default would differ by a second
    between processes). A signal sent to this process is passed on to torchrun, which passes it on
    to every process: each saves after the same step (see alignctl/train/loop.py)."""
    available = torch.cuda.device_count() if device == "cuda" else (os.cpu_count() or 1)
    if nproc > available:
        what = f"{available} CUDA devices" if device == "cuda" else f"{available} CPU cores"
        raise ConfigError("hardware.nproc", f"{nproc} processes but this machine has {what}; set hardware.nproc<={available}")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "alignctl", "train", *overrides, f"hydra.run.dir={run_dir}"]
    # torchrun keeps the run directory's lock open too: the directory stays owned while any process
    # of the run lives, even if this one is killed (the workers know it from ALIGNCTL_HELD_RUN_DIRS).
    child = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, pass_fds=runlock.held_descriptors())
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(child.stderr), daemon=True)
    reader.start()
    forward = lambda signum, frame: child.send_signal(signum)  # noqa: E731
    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    reader.join()
    return _report(code, lines)


def _report(code: int, lines: list[str]) -> int:
    """What the processes said on stderr, without torchrun's own failure report when they explained
    themselves in alignctl's one line (said once, not once per process); the processes' exit code."""
    ours = list(dict.fromkeys(line for line in lines if line.startswith("alignctl:")))
    # A process that failed without explaining itself left a traceback of its own (torchrun adds one,
    # ending in ChildFailedError, whenever a process fails).
    tracebacks = sum(line.startswith("Traceback") for line in lines)
    crashed = tracebacks > any("ChildFailedError" in line for line in lines)
    if code and ours and not crashed:
        sys.stderr.write("".join(ours))
        codes = re.findall(r"exitcode\s*:\s*(-?\d+)", "".join(lines))
        return int(codes[-1]) if codes else code
    torchrun_log = re.compile(r"^[WIE]\d{4} \d\d:")  # torchrun's own glog-style lines (its OMP_NUM_THREADS notice)
    sys.stderr.write("".join(line for line in lines if code or not torchrun_log.match(line)))
    return code


def run_stage(run_config, cfg, run_dir, overrides: list[str], hydra_overrides: list[str]):
    """Run the configured stage: here, as one of several processes, or by starting them (torchrun)."""
    from alignctl.cli.memory_check import check_memory
    from alignctl.models.loading import device_type, model_path
    from alignctl.models.precision import settle
    from alignctl.stages.registry import get_stage

    hardware = run_config.hardware
    outer = distributed.launched_env()
    if outer is not None and outer.world_size > 1 and not any(o.startswith("hydra.run.dir=") for o in hydra_overrides):
        # Each process would date its own default directory, a second apart.
        raise ConfigError("hydra.run.dir", f"{outer.world_size} processes were started for this run: give them one directory, hydra.run.dir=<dir>")
    if hardware.nproc > 1 and distributed.launched_env() is None:
        code = relaunch(overrides, str(run_dir), hardware.nproc, device_type(hardware))
        if code:
            raise SystemExit(code)
        return None
    # Before the process group exists: transformers writes files on rank 0 only once it does, and
    # every process must be able to build the local tiny model into the cache (one does, under a lock).
    model_path(run_config.model, run_config.inputs.get("policy"))
    distributed.setup(device_type(hardware))
    try:
        settle(run_config, device_type(hardware))  # hardware.autocast/dtype=auto -> what they mean here
        check_memory(run_config)  # before any weights load: an adapter that cannot fit the model, a run that cannot fit the machine
        return get_stage(run_config.recipe.stage)(run_config, cfg, run_dir)
    finally:
        distributed.teardown()
