"""The sampler is not the trainer: `alignctl probe` before training, and rollout/logprob_diff with
recipe.rollout_is during a GRPO run (issue 22)."""

from __future__ import annotations

import json

import pytest
from stage_runs import StageRun

SHORT = ("recipe=grpo", "recipe.max_new_tokens=12", "probe.prompts=4")


def test_probe_prints_the_gap_table_and_writes_no_run(alignctl, tmp_path):
    result = alignctl("probe", *SHORT)
    assert result.returncode == 0, result.describe()
    assert "sampler vs trainer: 4 prompts" in result.stdout
    assert "native" in result.stdout and "verdict: no correction needed" in result.stdout
    assert not (tmp_path / "runs").exists()


def test_probe_json_native_is_the_trainer_and_bf16_generate_is_not(alignctl):
    native = alignctl("probe", *SHORT, "--json")
    assert native.returncode == 0, native.describe()
    record = json.loads(native.stdout)
    assert {"engine", "autocast", "dtype", "tokens", "logprob_diff", "logprob_diff_max", "over_cap_frac", "verdict"} <= record.keys()
    assert record["engine"] == "native" and record["autocast"] == "float32" and record["prompts"] == 4
    assert record["tokens"] > 0 and record["logprob_diff"] < 1e-5 and record["over_cap_frac"] == 0.0
    bf16 = json.loads(alignctl("probe", *SHORT, "recipe.rollout_engine=hf", "hardware.autocast=bf16", "--json").stdout)
    assert bf16["engine"] == "hf" and bf16["autocast"] == "bf16"
    assert bf16["logprob_diff"] > 10 * record["logprob_diff"]  # bf16 sampling drifts from the trainer's forward
    assert bf16["logprob_diff_max"] >= bf16["logprob_diff"]


@pytest.mark.parametrize("args, message", [
    (("recipe=sft",), "recipe: probe measures an online RL recipe"),
    (("recipe=grpo", "probe.prompts=0"), "probe.prompts"),
    (("recipe=grpo", "--bogus"), "probe: unknown flag --bogus"),
    (("recipe=grpo", "recipe.rollout_is=sometimes"), "recipe.rollout_is"),
])
def test_bad_probe_input_is_one_line_exit_2(alignctl, tmp_path, args, message):
    result = alignctl("probe", *args)
    assert result.returncode == 2, result.describe()
    assert len(result.stderr_lines()) == 1 and message in result.stderr, result.describe()
    assert not (tmp_path / "runs").exists()


GRPO = ("train", "recipe=grpo", "recipe.batch_size=8", "recipe.num_generations=4", "recipe.max_new_tokens=8", "recipe.max_steps=2",
        "recipe.lr=1e-3", "recipe.eval_every=0", "data.eval_limit=8", "recipe.reward_funcs=[{_target_: alignctl.rewards.length_penalty, max_chars: 2}]")


def test_grpo_logs_the_mismatch_and_truncated_is_is_the_identity_on_the_native_engine(alignctl, tmp_path):
    run_dir = tmp_path / "tis"
    run = StageRun("tis", run_dir, alignctl(*GRPO, "recipe.rollout_is=truncate", "recipe.num_iterations=2", f"hydra.run.dir={run_dir}"))
    run.assert_finished()
    for record in run.train_records():
        assert {"rollout/logprob_diff", "rollout/logprob_diff_max", "rollout/is_weight_mean", "rollout/is_masked_frac"} <= record.keys()
        assert record["rollout/logprob_diff"] <= record["rollout/logprob_diff_max"] < 1e-4  # fp32 native sampler = trainer
        assert record["rollout/is_weight_mean"] == pytest.approx(1.0, abs=1e-4)
        assert record["rollout/is_masked_frac"] == 0.0


def test_masked_is_drops_the_tokens_of_a_bf16_sampler(alignctl, tmp_path):
    """cap 1 keeps only tokens whose sampler and trainer log-probs agree exactly: under bf16 `generate` few do."""
    run_dir = tmp_path / "mis"
    run = StageRun("mis", run_dir, alignctl(*GRPO, "recipe.rollout_is=mask", "recipe.rollout_is_cap=1", "recipe.rollout_engine=hf",
                                            "hardware.autocast=bf16", f"hydra.run.dir={run_dir}"))
    run.assert_finished()
    train = run.train_records()
    assert all(r["rollout/logprob_diff_max"] > 0 for r in train)
    assert any(r["rollout/is_masked_frac"] > 0.5 for r in train)


def test_ppo_logs_the_mismatch_and_takes_the_correction(alignctl, tmp_path):
    run_dir = tmp_path / "ppo"
    run = StageRun("ppo", run_dir, alignctl("train", "recipe=ppo", "recipe.batch_size=8", "recipe.max_new_tokens=8", "recipe.max_steps=2",
                                            "recipe.eval_every=0", "data.eval_limit=8", "recipe.rollout_is=truncate", "recipe.rollout_is_level=sequence",
                                            "recipe.reward_funcs=[{_target_: alignctl.rewards.length_penalty, max_chars: 2}]", f"hydra.run.dir={run_dir}"))
    run.assert_finished()
    for record in run.train_records():
        assert record["rollout/logprob_diff"] <= record["rollout/logprob_diff_max"] < 1e-4
        assert record["rollout/is_weight_mean"] == pytest.approx(1.0, abs=1e-3)
