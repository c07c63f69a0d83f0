"""recipe=ppo through the real CLI: policy + value model, reward model or verifier, KL penalty, GAE.

Mechanics run from a short SFT run (conftest.quick_sft_run) on a reward model trained a few steps from
it; the learning test (make test-slow) starts from the shared ~65 % SFT run, uses the task verifier as
the reward (cheap and exact) and must raise held-out greedy accuracy.
"""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
from stage_runs import StageRun

from tests.integration.conftest import run_cli


def _train(run_dir, *overrides):
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    result = run_cli(["train", *overrides, f"hydra.run.dir={run_dir}"], cwd=run_dir.parent)
    return StageRun(run_dir.name, run_dir, result)


class Trained(dict):
    """name -> StageRun; a name in `later` is trained on first use only (a -k selection trains what it needs)."""

    def __init__(self, runs: dict, later: dict):
        super().__init__(runs)
        self.later = later

    def __missing__(self, name: str) -> StageRun:
        self[name] = self.later.pop(name)()
        return self[name]


@pytest.fixture(scope="module")
def runs(quick_sft_run, tmp_path_factory):
    sft_dir, sft_result = quick_sft_run
    assert sft_result.returncode == 0, sft_result.describe()
    root = tmp_path_factory.mktemp("ppo")
    reward = _train(root / "reward", "recipe=reward", f"inputs.init={sft_dir}", "recipe.max_steps=20", "recipe.batch_size=32",
                    "recipe.eval_every=0", "data.eval_limit=32")
    reward.assert_finished()
    small = ["recipe.batch_size=16", "recipe.eval_every=0", "data.eval_limit=32"]
    out = {
        "rlhf": lambda: _train(root / "rlhf", "recipe=ppo", f"inputs.policy={sft_dir}", f"inputs.reward={reward.dir}",
                       "recipe.max_steps=4", "recipe.steps_per_generation=2", "recipe.num_ppo_epochs=2", *small),
        "adaptive": lambda: _train(root / "adaptive", "recipe=ppo", f"inputs.policy={sft_dir}", f"inputs.reward={reward.dir}",
                           "recipe.max_steps=4", "recipe.num_ppo_epochs=1", "recipe.beta=0.05", "recipe.kl_target=0.001", "recipe.kl_horizon=100",
                           "recipe.lr=1e-3", *small),
        # A graded reward (length): a short SFT run solves no sum, and all-zero verifier rewards over a
        # value head that starts at zero leave no advantage to train the policy's adapter.
        "shared": lambda: _train(root / "shared", "recipe=ppo", "adapter=lora", f"inputs.policy={sft_dir}",
                         "recipe.reward_funcs=[{_target_: alignctl.rewards.length_penalty, max_chars: 1}]", "recipe.max_steps=2", "recipe.num_ppo_epochs=2",
                         "recipe.lr=1e-2", *small),
    }
    return Trained({}, out), reward


@pytest.mark.slow
def test_ppo_with_the_verifier_raises_held_out_exact_match(learned_sft_run, tmp_path_factory):
    sft_dir, sft_result = learned_sft_run
    assert sft_result.returncode == 0, sft_result.describe()
    # 50 rollouts of 64, two epochs each: +6.5 to +7.5 points over seeds 0-2 here, where 30 steps at
    # the recipe's rate (8 rollouts) gained +1.5 on one machine's float rounding and +5 on another's.
    run = _train(tmp_path_factory.mktemp("ppo_learn") / "learn", "recipe=ppo", f"inputs.policy={sft_dir}",
                 "recipe.reward_funcs=[alignctl.rewards.task_verifier]", "recipe.max_steps=100", "recipe.num_ppo_epochs=2",
                 "recipe.lr=1e-4", "recipe.eval_every=0", "data.eval_limit=400")
    run.assert_finished()
    evals = [r for r in run.records() if "eval_exact_match" in r]
    assert (evals[0]["step"], evals[-1]["step"]) == (0, 100)
    # Counted in prompts (400 of them), so that +5 points is not lost to float rounding (0.665 + 0.05 > 0.715).
    assert round(400 * evals[-1]["eval_exact_match"]) >= round(400 * evals[0]["eval_exact_match"]) + 20, evals


def test_ppo_from_a_reward_model_logs_trl_metrics_and_records_lineage(runs):
    out, reward = runs
    run = out["rlhf"]
    run.assert_finished()
    train = run.train_records()
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    # One rollout feeds 2 epochs x 2 minibatch steps: steps 1-4 share it, sampled once.
    assert [("time/generation" in r) for r in train] == [True, False, False, False]
    for record in train:
        for key in ("objective/kl", "objective/scores", "objective/rlhf_reward", "objective/entropy", "policy/clipfrac",
                    "policy/approxkl", "loss/policy", "loss/value", "val/clipfrac", "rewards/reward_model/mean"):
            assert key in record, (key, record)
    # The policy is the reference when the first rollout is sampled, so its KL is exactly zero; the first
    # optimiser step sees ratio 1 everywhere (nothing to clip), to float32 rounding: its minibatch pads
    # rows differently from the rollout's batches, and some CPUs' BLAS round a row by its batch's shape
    # (seen: approxkl 2.6e-13, log-ratios ~1e-6). The second epoch has moved away, far above that.
    assert train[0]["objective/kl"] == 0.0 and train[0]["policy/approxkl"] < 1e-10 and train[0]["policy/clipfrac"] == 0.0
    assert train[-1]["policy/approxkl"] > 1e-8
    lineage = json.loads((run.dir / "lineage.json").read_text())
    assert set(lineage["parents"]) == {"policy", "reward"} and lineage["parents"]["reward"]["stage"] == "reward"
    assert "value model: " + str(reward.dir / "checkpoint") in run.flat_output  # InstructGPT: value starts as the RM


def test_ppo_checkpoint_is_a_plain_policy_with_the_value_model_beside_it(runs, run_cmd):
    run = runs[0]["rlhf"]
    script = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
        path = {str(run.dir / "checkpoint")!r}
        policy, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
        out = policy.generate(**tok(["123+456="], return_tensors="pt"), max_new_tokens=5, do_sample=False)
        value = AutoModelForSequenceClassification.from_pretrained(path + "/value_model")
        assert value.config.num_labels == 1 and torch.isfinite(value(**tok(["123+456=0579</s>"], return_tensors="pt")).logits).all()
        assert "alignctl" not in sys.modules
        print(tok.decode(out[0], skip_special_tokens=True))
    """)
    result = run_cmd([sys.executable, "-c", script])
    assert result.returncode == 0 and "123+456=" in result.stdout, result.describe()


def test_the_value_model_trains_away_from_the_reward_model(runs):
    from safetensors.torch import load_file

    out, reward = runs
    before = load_file(str(reward.dir / "checkpoint" / "model.safetensors"))
    after = load_file(str(out["rlhf"].dir / "checkpoint" / "value_model" / "model.safetensors"))
    assert before.keys() == after.keys()
    assert any(not (before[k] == after[k]).all() for k in before)


def test_adaptive_kl_controller_moves_beta(runs):
    run = runs[0]["adaptive"]
    run.assert_finished()
    records = run.train_records()
    betas = [r["beta"] for r in records]  # the beta each rollout was scored with
    kls = [r["objective/kl"] for r in records]  # the KL that rollout measured
    assert betas[0] == 0.05
    # Rollout 1 is sampled from the reference itself (KL 0, below target): beta falls by the largest
    # step, 1 - 0.2 x 16 / 100. Then each rollout's KL moves the next beta (Ziegler et al.'s controller:
    # proportional error clipped to +-0.2, 16 rollout sequences over a horizon of 100), and once
    # training has moved the policy past the tiny target, beta rises.
    assert kls[0] == 0.0 and betas[1] == pytest.approx(0.05 * (1 - 0.2 * 16 / 100))
    for before, after, kl in zip(betas, betas[1:], kls):
        error = min(max(kl / 0.001 - 1, -0.2), 0.2)
        assert after == pytest.approx(before * (1 + error * 16 / 100)), (betas, kls)
    assert any(after > before for before, after in zip(betas, betas[1:])), (betas, kls)


def test_ppo_without_any_reward_is_one_line(alignctl, tmp_path):
    result = alignctl("train", "recipe=ppo", "recipe.max_steps=1", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2, result.describe()
    assert result.stderr_lines() == ["alignctl: error: no reward: set recipe.reward_funcs and/or inputs.reward=<reward run dir> (or recipe.environment)"]


def test_lora_value_model_starting_from_the_policy_shares_its_base(runs, run_cmd):
    from safetensors.torch import load_file

    run = runs[0]["shared"]
    run.assert_finished()
    assert "value model: a second adapter on the policy's base" in run.flat_output
    checkpoint = run.dir / "checkpoint"
    policy = load_file(str(checkpoint / "adapter_model.safetensors"))
    value = load_file(str(checkpoint / "value_model" / "value" / "adapter_model.safetensors"))
    head = load_file(str(checkpoint / "value_model" / "value_head.safetensors"))["weight"]
    assert not any(".value." in name for name in policy)  # the policy's files hold its own adapter only
    for weights in (policy, value):  # both adapters trained (B starts at zero), through one optimiser
        assert any(w.abs().sum() > 0 for name, w in weights.items() if "lora_B" in name)
    assert head.abs().sum() > 0  # the head starts at zero
    script = (
        "import sys; from peft import AutoPeftModelForCausalLM; "
        f"m = AutoPeftModelForCausalLM.from_pretrained({str(checkpoint)!r}); "
        "assert 'alignctl' not in sys.modules; print(type(m).__name__)"
    )
    result = run_cmd([sys.executable, "-c", script])
    assert result.returncode == 0 and "PeftModelForCausalLM" in result.stdout, result.describe()
