"""Several processes on CPU (gloo), through the real CLI: `hardware=ddp hardware.nproc=2` starts torchrun
itself. 2 processes x batch B (DDP, or FSDP2 with the parameters sharded) train exactly as 1 process x
batch 2B and as 1 process x B x 2 accumulation steps (to 1e-5 per step); DDP and FSDP checkpoints
resume in one process; sweeps run through submitit's local launcher; errors stay one line.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from tests.integration.conftest import run_cli, run_process
from tests.integration.stage_runs import StageRun
from tests.integration.test_cli_errors import assert_one_line_error

TOLERANCE = 1e-5  # float sums in another order (per-process shares, then the all-reduce)
QUICK = ["data.eval_limit=8", "recipe.eval_every=0"]
LAYOUTS = {
    "two_processes": ["hardware=ddp", "recipe.batch_size=4"],  # hardware=ddp: 2 processes by default
    "one_process": ["recipe.batch_size=8"],
    "accumulation": ["recipe.batch_size=4", "recipe.grad_accum=2"],
    "fsdp": ["hardware=fsdp", "recipe.batch_size=4"],  # parameters sharded over 2 processes
}


def metric(run_dir: Path, key: str) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r[key] for r in records if key in r and "loss" in r]


class Trajectories:
    """`trajectories[recipe, layout]`: that run, trained on first use (the DPO ones only by the slow tier).
    The command runs in the test process; a multi-process layout's torchrun and workers are processes."""

    STEPS = {"sft": 4, "dpo": 3}

    def __init__(self, root: Path):
        self.root, self.done = root, {}

    def __getitem__(self, key: tuple[str, str]) -> StageRun:
        if key not in self.done:
            recipe, layout = key
            run_dir = self.root / f"{recipe}_{layout}"
            cmd = ["train", f"recipe={recipe}", f"recipe.max_steps={self.STEPS[recipe]}", "recipe.save_every=2", "recipe.keep_last=5",
                   *LAYOUTS[layout], *QUICK, f"hydra.run.dir={run_dir}"]
            self.done[key] = StageRun(layout, run_dir, run_cli(cmd, cwd=self.root))
        return self.done[key]


@pytest.fixture(scope="module")
def trajectories(tmp_path_factory) -> Trajectories:
    return Trajectories(tmp_path_factory.mktemp("ddp"))


# One DDP and one FSDP equivalence by default (SFT); DPO's goes with the slow tier.
@pytest.mark.parametrize("recipe", ["sft", pytest.param("dpo", marks=pytest.mark.slow)])
def test_two_processes_train_as_one_process_with_the_whole_batch(trajectories, recipe):
    runs = {layout: trajectories[recipe, layout] for layout in LAYOUTS}
    for run in runs.values():
        run.assert_finished()
    keys = ["loss", "grad_norm"] + (["rewards/margins", "rewards/accuracies"] if recipe == "dpo" else ["mean_token_accuracy"])
    for key in keys:
        reference = metric(runs["one_process"].dir, key)
        assert len(reference) >= 3
        for layout in ("two_processes", "accumulation", "fsdp"):
            assert metric(runs[layout].dir, key) == pytest.approx(reference, abs=TOLERANCE), (layout, key)


def test_only_rank_zero_writes_and_logs(trajectories):
    run = trajectories["sft", "two_processes"]
    assert run.flat_output.count("sft finished") == 1
    assert len(metric(run.dir, "loss")) == 4  # one line per step, not one per process
    state = torch.load(run.dir / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert len(state["rng_per_rank"]) == 2  # each process's RNG, for an exact resume


@pytest.mark.parametrize("layout", ["two_processes", "fsdp"])
def test_a_multi_process_checkpoint_resumes_in_one_process(trajectories, tmp_path, alignctl, layout):
    """The step-2 checkpoint of a 2-process run, continued by one process with the whole batch."""
    from tests.integration.test_resume import rewind

    ddp = trajectories["sft", layout]
    stopped = tmp_path / "stopped"
    rewind(ddp.dir, stopped, 2)
    result = alignctl("train", f"resume={stopped}", "hardware=cpu", "recipe.batch_size=8")
    assert result.returncode == 0, result.describe()
    assert metric(stopped, "loss") == pytest.approx(metric(ddp.dir, "loss"), abs=TOLERANCE)


def test_more_processes_than_cores_is_one_line(alignctl, tmp_path):
    run_dir = tmp_path / "run"
    result = alignctl("train", "hardware=ddp", "hardware.nproc=4096", "recipe.max_steps=1", f"hydra.run.dir={run_dir}")
    assert_one_line_error(result, "hardware.nproc", "4096", "CPU cores")
    assert not (run_dir / "lineage.json").exists()


def test_several_processes_need_a_strategy(alignctl, tmp_path):
    assert_one_line_error(alignctl("train", "hardware.nproc=2", "recipe.max_steps=1", f"hydra.run.dir={tmp_path / 'r'}"),
                          "hardware.nproc", "hardware=ddp")


def test_a_data_error_in_the_processes_is_one_line(alignctl, tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps({"question": "1+1=", "answer": "2"}) + "\n")
    result = alignctl("train", "hardware=ddp", "data=hf", f"data.path={data}", "recipe.max_steps=1", f"hydra.run.dir={tmp_path / 'r'}")
    assert_one_line_error(result, str(data), "prompt/completion")
    shutil.rmtree(tmp_path / "r", ignore_errors=True)


# ------------------------------------------------------------------------------------------ sweeps
def test_a_sweep_through_submitits_local_launcher_is_listed_and_ranked(alignctl, tmp_path):
    """Two jobs as parallel processes (hydra/launcher=local), then `alignctl runs --sort` ranks them."""
    sweep = tmp_path / "sweep"
    result = alignctl("train", "-m", "recipe.lr=1e-4,1e-3", "hydra/launcher=local", "recipe.max_steps=3", *QUICK, f"hydra.sweep.dir={sweep}")
    assert result.returncode == 0, result.describe()
    jobs = sorted(p.parent for p in sweep.glob("*/lineage.json"))
    assert len(jobs) == 2 and all(json.loads((j / "lineage.json").read_text())["status"] == "finished" for j in jobs)
    losses = {j.name: json.loads((j / "eval.json").read_text())["eval_loss"] for j in jobs}
    ranked = run_process([sys.executable, "-m", "alignctl", "runs", str(sweep), "--sort", "eval_loss", "--ascending"], cwd=tmp_path,
                         env={"COLUMNS": "250"})
    assert ranked.returncode == 0, ranked.describe()
    rows = [line for line in ranked.stdout.splitlines() if "finished" in line]
    order = [row.split("│")[1].strip() for row in rows]
    assert order == sorted(losses, key=losses.get), (order, losses)
    assert "recipe.lr=0.001" in ranked.stdout and "recipe.lr=0.0001" in ranked.stdout


def test_slurm_preset_needs_its_partition_and_a_cluster(alignctl, tmp_path):
    args = ["train", "-m", "recipe.lr=1e-4,2e-4", "hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path / 's'}"]
    assert_one_line_error(alignctl(*args), "hydra.launcher.partition", "required")
    if shutil.which("srun") is None:
        assert_one_line_error(alignctl(*args, "hydra.launcher.partition=gpu"), "no srun", "hydra/launcher=local")
    assert not (tmp_path / "s").exists()


def test_runs_sort_by_an_unknown_metric_is_one_line(alignctl, tmp_path, trajectories):
    root = trajectories["sft", "one_process"].dir.parent
    assert_one_line_error(alignctl("runs", str(root), "--sort", "no_such_metric"), "no_such_metric")


@pytest.mark.slow
def test_under_an_outer_torchrun_the_processes_join_directly(trajectories, tmp_path):
    """`torchrun ... -m alignctl train hardware=ddp hydra.run.dir=...` trains as alignctl's own launch."""
    run_dir = tmp_path / "outer"
    args = ["recipe=sft", "recipe.max_steps=4", "recipe.save_every=2", "recipe.keep_last=5", *LAYOUTS["two_processes"], *QUICK]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "alignctl", "train", *args]
    result = run_process([*torchrun, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 0, result.describe()
    assert metric(run_dir, "loss") == pytest.approx(metric(trajectories["sft", "one_process"].dir, "loss"), abs=TOLERANCE)
    # Without a directory of their own, each process would date its own: refused in one line.
    unnamed = run_process(torchrun, cwd=tmp_path)
    assert unnamed.returncode != 0 and "hydra.run.dir" in unnamed.stderr


@pytest.mark.slow
def test_ppo_with_lora_trains_the_same_under_fsdp_and_ddp(tmp_path):
    """PPO holds a policy and a value adapter on one base and samples with generate(): sharded, it must
    give DDP's trajectory and DDP's checkpoint files."""
    from safetensors.torch import load_file

    common = ["recipe=ppo", "adapter=lora", "recipe.max_steps=3", "recipe.batch_size=8", "recipe.num_ppo_epochs=2", "recipe.lr=1e-3",
              "recipe.reward_funcs=[{_target_: alignctl.rewards.length_penalty, max_chars: 1}]", "data.eval_limit=8"]
    for strategy in ("ddp", "fsdp"):
        result = run_process([sys.executable, "-m", "alignctl", "train", *common, f"hardware={strategy}", f"hydra.run.dir={tmp_path / strategy}"],
                             cwd=tmp_path)
        assert result.returncode == 0, result.describe()
    assert metric(tmp_path / "fsdp", "loss") == pytest.approx(metric(tmp_path / "ddp", "loss"), abs=TOLERANCE)
    for name in ("adapter_model.safetensors", "value_model/value/adapter_model.safetensors", "value_model/value_head.safetensors"):
        sharded, plain = (load_file(str(tmp_path / s / "checkpoint" / name)) for s in ("fsdp", "ddp"))
        assert sharded.keys() == plain.keys()
        for key in plain:
            assert (sharded[key] - plain[key]).abs().max() <= TOLERANCE, (name, key)
