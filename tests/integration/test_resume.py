"""Exact resume through the real CLI: a run continued from a checkpoint trains the same steps, to
1e-6 on CPU, as the run that was never stopped.

Two ways to stop a run: `rewind` turns a finished run's copy into what a kill right after an earlier
save leaves (later checkpoints gone, the link on the earlier one, the lineage not finished), and the
signal tests stop a real process with SIGTERM or SIGKILL.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.conftest import run_cli
from tests.integration.stage_runs import StageRun

TOLERANCE = 1e-6


def train_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def rewind(finished: Path, copy: Path, step: int) -> None:
    """`copy` = `finished` as a kill right after its step-`step` save would have left it."""
    shutil.copytree(finished, copy, symlinks=True)
    for checkpoint in (copy / "checkpoints").glob("step-*"):
        if int(checkpoint.name.split("-")[1]) > step:
            shutil.rmtree(checkpoint)
    (copy / "checkpoint").unlink()
    (copy / "checkpoint").symlink_to(Path("checkpoints") / f"step-{step:06d}")
    lineage = json.loads((copy / "lineage.json").read_text())
    lineage.update(status="running", run_dir=str(copy))
    (copy / "lineage.json").write_text(json.dumps(lineage))
    for name in ("eval.json",):
        (copy / name).unlink(missing_ok=True)


def assert_same_trajectory(reference: Path, resumed: Path, from_step: int) -> None:
    expected, got = train_losses(reference), train_losses(resumed)
    assert sorted(got) == sorted(expected), "the resumed run must log every step exactly once"
    later = [s for s in expected if s > from_step]
    assert later, "nothing was trained after the resume point"
    for step in expected:
        assert abs(got[step] - expected[step]) <= TOLERANCE, f"step {step}: {got[step]} != {expected[step]}"


# An untrained model never solves the task: reward length instead, so samples differ in reward and
# a resume that sampled other completions would show in the losses.
GRADED_REWARD = "recipe.reward_funcs=[{_target_: alignctl.rewards.length_penalty, max_chars: 1}]"
# 1 when a completion holds two digits in a row: the untrained model's groups are often all 0 (see test_grpo_stage).
TWO_DIGITS_REWARD = "recipe.reward_funcs=[{_target_: alignctl.rewards.format_check, pattern: '.*[0-9][0-9].*'}]"

# Each case: overrides of a short run that saves mid-way, and the step to resume from.
CASES = {
    # 24 rows at batch 8: 3 steps an epoch, so steps 5..9 cross two epoch boundaries.
    "sft across epochs": (["recipe=sft", "recipe.max_steps=9", "recipe.save_every=4", "recipe.batch_size=4", "recipe.grad_accum=2",
                           "data=hf", "data.path={small_sft}", "data.eval_split=null"], 4),
    "sft lora": (["recipe=sft", "adapter=lora", "recipe.max_steps=8", "recipe.save_every=3", "recipe.lr=1e-2", "data.eval_limit=20"], 3),
    "dpo lora, adapter-disabled reference": (["recipe=dpo", "adapter=lora", "recipe.reference=adapter_disabled", "recipe.max_steps=6",
                                              "recipe.save_every=2", "recipe.lr=1e-2", "data.eval_limit=20"], 4),
    "dpo full, precomputed reference": (["recipe=dpo", "recipe.reference=precomputed", "recipe.max_steps=6", "recipe.save_every=3",
                                         "recipe.batch_size=4", "data.eval_limit=20"], 3),
    "reward": (["recipe=reward", "recipe.max_steps=6", "recipe.save_every=3", "recipe.batch_size=8", "data.eval_limit=20"], 3),
    # One rollout feeds 2 passes x 2 steps: the step-3 checkpoint holds the rollout's last step.
    "grpo mid-rollout": (["recipe=grpo", "recipe.max_steps=8", "recipe.save_every=3", "recipe.steps_per_generation=2", "recipe.num_iterations=2",
                          "recipe.batch_size=8", "recipe.num_generations=4", "recipe.beta=0.1", "recipe.lr=1e-3", "data.eval_limit=20",
                          GRADED_REWARD], 3),
    # Multi-turn episodes (an environment replying twice): the queued steps carry the environment's token mask.
    "grpo mid-rollout, environment": (["recipe=grpo", "recipe.max_steps=6", "recipe.save_every=3", "recipe.steps_per_generation=2",
                                       "recipe.num_iterations=2", "recipe.batch_size=8", "recipe.num_generations=4", "recipe.beta=0.1",
                                       "recipe.lr=1e-3", "data.eval_limit=20", "recipe.environment=tests.integration.test_environment_runs.Countdown",
                                       "+recipe.environment_kwargs.turns=3", "recipe.max_new_tokens=6", "recipe.max_length=80", GRADED_REWARD], 3),
    # recipe.guard=stop on a KL ceiling any KL crosses, over a 3-step window (step 1's KL is 0): the run stops
    # at step 3 only if the resumed guard remembers steps 1 and 2 (a fresh window would fill at step 5).
    "grpo guard across the resume": (["recipe=grpo", "recipe.max_steps=6", "recipe.save_every=2", "recipe.batch_size=8",
                                      "recipe.num_generations=4", "recipe.beta=0.1", "recipe.lr=1e-2", "data.eval_limit=16",
                                      "recipe.guard=stop", "recipe.guard_kl_max=1e-6", "recipe.guard_window=3", GRADED_REWARD], 2),
    # DAPO's dynamic sampling: many groups of the untrained model are constant, so rollouts draw more
    # prompts (the stream moves on unevenly) before they are full or at their bound.
    "grpo dynamic sampling": (["recipe=grpo", "recipe.max_steps=4", "recipe.save_every=2", "recipe.batch_size=8", "recipe.num_generations=4",
                               "recipe.dynamic_sampling=true", "recipe.max_draws=3", "recipe.lr=1e-3", "data.eval_limit=20",
                               TWO_DIGITS_REWARD], 2),
    # LoRA policy with the value model as a second adapter on the same base, adaptive KL coefficient.
    "ppo lora, adaptive beta": (["recipe=ppo", "adapter=lora", "recipe.max_steps=6", "recipe.save_every=3", "recipe.batch_size=8",
                                 "recipe.steps_per_generation=2", "recipe.num_ppo_epochs=1", "recipe.kl_target=0.01", "recipe.kl_horizon=100",
                                 GRADED_REWARD, "recipe.lr=1e-3", "data.eval_limit=20"], 3),
}


@pytest.fixture(scope="module")
def small_sft(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("resume_data") / "small.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{i}+{i}=", "completion": str(2 * i)}) + "\n" for i in range(24)))
    return path


# The required cases (sft across epochs, dpo, grpo mid-rollout) run by default; the other
# stages' cases go with the slow tier (make test-slow) to keep the default suite near 20 minutes.
SLOW_CASES = {"sft lora", "dpo full, precomputed reference", "reward", "ppo lora, adaptive beta"}


@pytest.mark.parametrize("overrides, from_step", [pytest.param(*CASES[name], id=name, marks=[pytest.mark.slow] if name in SLOW_CASES else [])
                                                  for name in CASES])
def test_resume_equals_uninterrupted(alignctl, tmp_path, small_sft, overrides, from_step):
    overrides = [o.replace("{small_sft}", str(small_sft)) for o in overrides] + ["recipe.keep_last=10", "recipe.eval_every=0"]
    whole = StageRun("whole", tmp_path / "whole", alignctl("train", *overrides, f"hydra.run.dir={tmp_path / 'whole'}"))
    whole.assert_finished()
    stopped = tmp_path / "stopped"
    rewind(whole.dir, stopped, from_step)

    resumed = StageRun("resumed", stopped, alignctl("train", f"resume={stopped}"))
    resumed.assert_finished()
    assert "resumed from" in resumed.flat_output and f"(step {from_step} of" in resumed.flat_output
    assert_same_trajectory(whole.dir, stopped, from_step)
    lineage = json.loads((stopped / "lineage.json").read_text())
    assert [r["from_step"] for r in lineage["resumes"]] == [from_step]
    assert json.loads((stopped / "eval.json").read_text())["step"] == json.loads((whole.dir / "eval.json").read_text())["step"]


def test_resume_true_in_the_run_directory(alignctl, tmp_path):
    """`resume=true` with the same command line (hydra.run.dir given) continues that directory."""
    args = ["train", "recipe=sft", "recipe.max_steps=6", "recipe.save_every=2", "recipe.keep_last=5", "data.eval_limit=20"]
    whole = tmp_path / "whole"
    assert alignctl(*args, f"hydra.run.dir={whole}").returncode == 0
    rewind(whole, tmp_path / "again", 2)
    result = alignctl(*args, f"hydra.run.dir={tmp_path / 'again'}", "resume=true")
    assert result.returncode == 0, result.describe()
    assert_same_trajectory(whole, tmp_path / "again", 2)


def test_resume_to_more_steps(alignctl, tmp_path):
    """A finished run refuses a plain resume and continues when max_steps is raised."""
    run_dir = tmp_path / "run"
    assert alignctl("train", "recipe=sft", "recipe.max_steps=3", "data.eval_limit=20", f"hydra.run.dir={run_dir}").returncode == 0
    refused = alignctl("train", f"resume={run_dir}")
    assert refused.returncode == 2 and "already finished" in refused.stderr and "recipe.max_steps" in refused.stderr, refused.describe()
    more = alignctl("train", f"resume={run_dir}", "recipe.max_steps=5")
    assert more.returncode == 0, more.describe()
    assert sorted(train_losses(run_dir)) == [1, 2, 3, 4, 5]


# ------------------------------------------------------------------------------ real signals
SIGNAL_RUN = ["recipe=sft", "recipe.max_steps=80", "recipe.batch_size=4", "data.eval_limit=20", "recipe.keep_last=2"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("signals") / "whole"
    done = run_cli(["train", *SIGNAL_RUN, f"hydra.run.dir={run_dir}"], cwd=run_dir.parent)
    assert done.returncode == 0, done.stderr
    return run_dir


def start(run_dir: Path, *extra: str, sigint_ignored: bool = False) -> subprocess.Popen:
    """The signal run in a process of its own; `sigint_ignored` starts it the way a shell without job
    control starts a background command (SIGINT inherited ignored)."""
    ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None
    return subprocess.Popen([sys.executable, "-m", "alignctl", "train", *SIGNAL_RUN, *extra, f"hydra.run.dir={run_dir}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=run_dir.parent, preexec_fn=ignore)


def wait_for(condition, process: subprocess.Popen, timeout: float = 300, every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the run ended (exit {process.returncode}) before the condition held:\n{process.stderr.read()}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("timed out")
        time.sleep(every)


def steps_logged(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    return len(train_losses(run_dir)) if metrics.exists() else 0


def test_sigterm_saves_prints_resume_command_and_resume_matches(alignctl, tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    process = start(run_dir)
    wait_for(lambda: steps_logged(run_dir) >= 5, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 143, stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "interrupted by SIGTERM after step" in lines[0], stderr
    command = lines[0].split("resume with: ", 1)[1]
    assert command == f"alignctl train resume={run_dir}"
    stopped_at = int(json.loads((run_dir / "checkpoint" / "alignctl.json").read_text())["step"])
    assert stopped_at == max(train_losses(run_dir)), "the checkpoint must be the last finished step"
    lineage = json.loads((run_dir / "lineage.json").read_text())
    assert lineage["status"] == "interrupted" and lineage["resume_command"] == command

    resumed = alignctl(*command.split()[1:])
    assert resumed.returncode == 0, resumed.describe()
    assert_same_trajectory(uninterrupted, run_dir, stopped_at)


def test_kill_during_a_save_leaves_the_previous_checkpoint(alignctl, tmp_path, uninterrupted):
    """SIGKILL while a checkpoint is being written: `checkpoint` still names a complete, loadable one."""
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "run"
    process = start(run_dir, "recipe.save_every=1")
    folder = run_dir / "checkpoints"
    # A save is in progress while its temporary directory exists (and an earlier save is complete).
    wait_for(lambda: folder.is_dir() and any(p.name.startswith(".tmp-") for p in folder.iterdir())
             and any(p.name.startswith("step-") for p in folder.iterdir()), process, every=0.001)
    os.kill(process.pid, signal.SIGKILL)
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    checkpoint = (run_dir / "checkpoint").resolve()
    assert checkpoint.name.startswith("step-") and (checkpoint / "trainer_state.pt").exists()
    AutoModelForCausalLM.from_pretrained(run_dir / "checkpoint")  # plain transformers loads it
    resumed = alignctl("train", f"resume={run_dir}")
    assert resumed.returncode == 0, resumed.describe()
    assert not any(p.name.startswith(".tmp-") for p in folder.iterdir()), "the interrupted save's leftovers are cleared"
    assert_same_trajectory(uninterrupted, run_dir, int(checkpoint.name.split("-")[1]))


@pytest.mark.parametrize("sigint_ignored", [False, True], ids=["sigint default", "sigint inherited ignored"])
def test_sigint_before_training_exits_130_without_traceback(tmp_path, sigint_ignored):
    """Ctrl-C while data and models load: one line, exit 130, nothing to resume; also when the run
    was started in the background by a script (a CI run lost a SIGINT sent that way)."""
    run_dir = tmp_path / "run"
    process = start(run_dir, sigint_ignored=sigint_ignored)
    wait_for(lambda: (run_dir / ".hydra").is_dir(), process, every=0.01)  # Hydra has started the job
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr, stderr
    assert "interrupted by SIGINT" in stderr
    assert not (run_dir / "checkpoints").exists()
