"""Run directories through the real CLI: who may write into one, and what may be written where.

A resume that would change the run (another recipe, model, adapter or input) is refused before
anything is written; a second training into a directory in use is refused naming the first, which
finishes untouched; a SIGKILLed run's lock does not block its resume; an export or a run placed in a
run's managed folders is refused; a parent run that is still training is refused, and lineage.json
records which checkpoint of each parent a run started from.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import run_cli
from tests.integration.test_cli_errors import assert_one_line_error
from tests.integration.test_resume import wait_for

QUICK = ["recipe.max_steps=2", "recipe.eval_every=0", "data.eval_limit=8"]
# Long enough that a second command starts and is answered while it trains (it is stopped or waited for).
LONG = ["recipe=sft", "recipe.max_steps=300", "recipe.batch_size=4", "recipe.save_every=2", "recipe.keep_last=2",
        "recipe.eval_every=0", "data.eval_limit=8"]


def snapshot(run_dir: Path) -> dict[str, bytes | str]:
    """Every file (hidden ones included) and link of a directory: its bytes, or where the link points."""
    found: dict[str, bytes | str] = {}
    for path in sorted(run_dir.rglob("*")):
        key = str(path.relative_to(run_dir))
        if path.is_symlink():
            found[key] = f"-> {os.readlink(path)}"
        elif path.is_file():
            found[key] = path.read_bytes()
    return found


def weights_sha256(checkpoint: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(checkpoint.glob("*.safetensors")):
        digest.update(file.name.encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory) -> Path:
    """A finished 2-step SFT run; the tests that use it only read it (or are refused)."""
    run_dir = tmp_path_factory.mktemp("ownership") / "sft"
    done = run_cli(["train", "recipe=sft", *QUICK, f"hydra.run.dir={run_dir}"], cwd=run_dir.parent)
    assert done.returncode == 0, done.describe()
    return run_dir


def start(run_dir: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "alignctl", "train", *overrides, f"hydra.run.dir={run_dir}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=run_dir.parent)


def steps_logged(run_dir: Path) -> list[int]:
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    return [json.loads(line)["step"] for line in lines if line.strip() and '"loss"' in line]


def training(run_dir: Path) -> bool:
    return (run_dir / "checkpoint").exists() and len(steps_logged(run_dir)) >= 3


# ------------------------------------------------------------------------------------ resume
# Each case: the command (after `train`), what the one line must name (key, the run's value, the given one).
CHANGED_IDENTITY = {
    "another recipe": (["resume={run}", "recipe=dpo", "recipe.max_steps=4"], ("recipe", "recipe=sft", "recipe=dpo")),
    "resume=true, another recipe": (["recipe=dpo", "recipe.max_steps=4", "resume=true", "hydra.run.dir={run}"],
                                    ("recipe", "recipe=sft", "recipe=dpo")),
    "another adapter": (["resume={run}", "adapter=lora", "recipe.max_steps=4"], ("adapter", "adapter=none", "adapter=lora")),
    "another model": (["resume={run}", "model=hf", "model.name_or_path={run}/checkpoint", "recipe.max_steps=4"],
                      ("model", "model=tiny", "model=hf")),
    "another starting policy": (["resume={run}", "inputs.policy={run}", "recipe.max_steps=4"],
                                ("inputs.policy", "inputs.policy=null", "inputs.policy={run}")),
}


@pytest.mark.parametrize("command, culprits", list(CHANGED_IDENTITY.values()), ids=list(CHANGED_IDENTITY))
def test_resume_that_changes_the_run_is_refused_and_writes_nothing(alignctl, sft_run, command, culprits):
    before = snapshot(sft_run)
    result = alignctl("train", *(a.replace("{run}", str(sft_run)) for a in command))
    assert_one_line_error(result, *(c.replace("{run}", str(sft_run)) for c in culprits))
    assert snapshot(sft_run) == before, "a refused resume must leave every file of the run as it was"


# ------------------------------------------------------------------------------- one owner
def test_second_training_into_a_directory_in_use_is_refused(alignctl, tmp_path):
    run_dir = tmp_path / "run"
    first = start(run_dir, *LONG)
    wait_for(lambda: training(run_dir), first)
    second = alignctl("train", *LONG, f"hydra.run.dir={run_dir}")
    line = assert_one_line_error(second, f"pid {first.pid}", "alignctl train", str(run_dir))
    assert "in use" in line
    _, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr
    assert steps_logged(run_dir) == list(range(1, 301)), "the first run logs each of its steps once, alone"
    assert json.loads((run_dir / "lineage.json").read_text())["status"] == "finished"
    assert not (run_dir / ".alignctl.lock").exists(), "the lock is released at exit"
    again = alignctl("train", *LONG, f"hydra.run.dir={run_dir}")  # free again: refused now only as a finished run
    assert again.returncode == 2 and "in use" not in again.stderr, again.describe()


def test_sigkilled_run_does_not_block_its_resume(alignctl, tmp_path):
    run_dir = tmp_path / "run"
    process = start(run_dir, *LONG)
    wait_for(lambda: training(run_dir), process)
    os.kill(process.pid, signal.SIGKILL)
    process.communicate(timeout=60)
    holder = json.loads((run_dir / ".alignctl.lock").read_text())
    assert holder["pid"] == process.pid, "the killed run's lock file is left behind, naming it"
    # Its lineage still says running: as a parent it is refused (it never finished) ...
    child = alignctl("train", "recipe=dpo", f"inputs.policy={run_dir}", *QUICK, f"hydra.run.dir={tmp_path / 'child'}")
    assert_one_line_error(child, "inputs.policy", "inputs.allow_running=true")
    assert not (tmp_path / "child").exists()
    # ... and its own resume takes the stale lock over.
    saved = json.loads((run_dir / "checkpoint" / "alignctl.json").read_text())["step"]
    resumed = alignctl("train", f"resume={run_dir}", f"recipe.max_steps={saved + 2}")
    assert resumed.returncode == 0, resumed.describe()
    assert json.loads((run_dir / "lineage.json").read_text())["status"] == "finished"
    assert not (run_dir / ".alignctl.lock").exists()


# ------------------------------------------------------------------------ managed folders
@pytest.mark.parametrize("where", ["checkpoints/step-999999", "checkpoint/merged", ".hydra/export", "eval/export"])
def test_export_into_a_runs_managed_folder_is_refused(alignctl, sft_run, where):
    before = snapshot(sft_run)
    out = sft_run / where
    result = alignctl("export", f"run={sft_run}", f"out={out}")
    assert_one_line_error(result, f"out={out}", where.split("/")[0])
    assert snapshot(sft_run) == before


def test_run_into_a_runs_checkpoints_is_refused(alignctl, sft_run):
    before = snapshot(sft_run)
    result = alignctl("train", "recipe=sft", *QUICK, f"hydra.run.dir={sft_run / 'checkpoints' / 'step-999999'}")
    assert_one_line_error(result, "hydra.run.dir", "checkpoints")
    assert snapshot(sft_run) == before


# ------------------------------------------------------------------------------- parents
def test_running_parent_is_refused_and_lineage_records_the_parents_checkpoint(alignctl, tmp_path):
    parent = tmp_path / "parent"
    process = start(parent, *LONG)
    wait_for(lambda: training(parent), process)
    child_args = ["recipe=dpo", f"inputs.policy={parent}", *QUICK]
    refused = alignctl("train", *child_args, f"hydra.run.dir={tmp_path / 'refused'}")
    assert_one_line_error(refused, "inputs.policy", "still training", f"pid {process.pid}", "inputs.allow_running=true")
    assert not (tmp_path / "refused").exists()
    allowed = alignctl("train", *child_args, "inputs.allow_running=true", f"hydra.run.dir={tmp_path / 'allowed'}")
    assert allowed.returncode == 0, allowed.describe()
    used = json.loads((tmp_path / "allowed" / "lineage.json").read_text())["parents"]["policy"]
    assert used["checkpoint"] == f"step-{used['step']:06d}" and used["step"] >= 2
    process.send_signal(signal.SIGTERM)  # stops after a step and saves: an interrupted run, no longer running
    process.communicate(timeout=300)
    assert process.returncode == 143

    child = alignctl("train", *child_args, f"hydra.run.dir={tmp_path / 'child'}")
    assert child.returncode == 0, child.describe()
    record = json.loads((tmp_path / "child" / "lineage.json").read_text())["parents"]["policy"]
    checkpoint = (parent / "checkpoint").resolve()
    assert record["run_dir"] == str(parent.resolve()) and record["stage"] == "sft"
    assert record["checkpoint"] == checkpoint.name
    assert record["step"] == json.loads((checkpoint / "alignctl.json").read_text())["step"]
    assert record["weights_sha256"] == weights_sha256(checkpoint)
