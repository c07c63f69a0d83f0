"""The performance switches change speed and memory, not the training: a run with each switch on
follows the plain run's losses step for step (recipe.lm_head_chunk against 0, recipe.padding_free (SFT, DPO,
reward, GRPO, PPO) against padded batches, recipe.share_prompt against two rows a pair, recipe.fused_mlp and
recipe.fused_rms_norm against the model's own MLP and norms), recipe.trim_top_layer against the full top layer), through the real CLI on the
built-in task."""

from __future__ import annotations

import pytest
from stage_runs import StageRun

from tests.integration.conftest import run_cli

STEPS = ["recipe.max_steps=4", "recipe.eval_every=0", "data.eval_limit=8", "recipe.batch_size=16"]


def train(tmp_path, name: str, *overrides: str) -> list[dict]:
    run_dir = tmp_path / name
    result = run_cli(["train", *STEPS, *overrides, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    run = StageRun(name, run_dir, result)
    run.assert_finished()
    return run.train_records()


def assert_same_training(plain: list[dict], switched: list[dict], keys: tuple[str, ...]) -> None:
    assert len(plain) == len(switched) == 4
    for a, b in zip(plain, switched):
        for key in keys:
            # 1e-5 absolute, or 1e-6 relative for the summed log-probs (about -20 here): float32 rounding.
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-5), (key, a, b)
    assert plain[-1]["loss"] != pytest.approx(plain[0]["loss"], abs=1e-3)  # it trained: the comparison is not of constants


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_the_chunked_output_layer_trains_like_the_plain_logits(tmp_path, stage):
    plain = train(tmp_path, "plain", f"recipe={stage}", "recipe.lm_head_chunk=0")
    chunked = train(tmp_path, "chunked", f"recipe={stage}", "recipe.lm_head_chunk=5")
    assert_same_training(plain, chunked, ("loss", "grad_norm", "mean_token_accuracy") if stage == "sft" else ("loss", "grad_norm", "rewards/margins"))


def test_padding_free_batches_train_like_padded_ones(tmp_path):
    # Loss on every token: a row's first token is then labelled, and must not become the target of the
    # previous row's last position once the rows are end to end.
    padded = train(tmp_path, "padded", "recipe=sft", "recipe.completion_only_loss=false")
    packed = train(tmp_path, "packed", "recipe=sft", "recipe.completion_only_loss=false", "recipe.padding_free=true")
    assert_same_training(padded, packed, ("loss", "grad_norm", "mean_token_accuracy", "num_loss_tokens"))
    assert packed[-1]["num_tokens"] == padded[-1]["num_tokens"]  # the same real tokens, none of them padding


def test_padding_free_pairs_train_like_padded_ones(tmp_path):
    # LoRA, so the reference (the disabled adapter) also runs on the packed row.
    lora = ("recipe=dpo", "adapter=lora", "recipe.lr=3e-3")
    padded = train(tmp_path, "padded", *lora)
    packed = train(tmp_path, "packed", *lora, "recipe.padding_free=true")
    assert_same_training(padded, packed, ("loss", "grad_norm", "rewards/margins", "logps/chosen", "logps/rejected"))
    assert packed[-1]["num_tokens"] == padded[-1]["num_tokens"]  # the same real tokens, none of them padding


def test_padding_free_reward_pairs_train_like_padded_ones(tmp_path):
    # LoRA: the q|k|v and gate|up groups and the trimmed top layer run on the packed row too.
    lora = ("recipe=reward", "adapter=lora", "recipe.lr=3e-3", "recipe.extra_layers=0", "recipe.lm_loss_coef=0")
    padded = train(tmp_path, "padded", *lora, "recipe.padding_free=false")
    packed = train(tmp_path, "packed", *lora, "recipe.padding_free=true")
    assert_same_training(padded, packed, ("loss", "grad_norm", "accuracy", "margin"))
    assert packed[-1]["num_tokens"] == padded[-1]["num_tokens"]  # the same real tokens, none of them padding


@pytest.mark.parametrize("stage", ["grpo", "ppo"])
def test_padding_free_rl_batches_train_like_padded_rows(tmp_path, stage):
    # One rollout feeds the four steps, so both runs train on the same completions; beta > 0 with LoRA, so
    # the reference (the disabled adapter) runs on the packed row too. GRPO's micro-batches hold two
    # prompts x 8 completions: each prompt runs once for its 8.
    # An entropy bonus (GRPO): the untrained model's rewards are all 0, and the bonus gives the loss a gradient.
    # PPO: a reward that varies from the start (completion length), so that its advantages are not all 0.
    extra = ("recipe.entropy_coef=1.0",) if stage == "grpo" else ("recipe.reward_funcs=[{_target_:alignctl.rewards.length_penalty,max_chars:2}]",)
    rl = (f"recipe={stage}", "adapter=lora", "recipe.lr=3e-3", "recipe.beta=0.05", "recipe.steps_per_generation=4", *extra)
    padded = train(tmp_path, "padded", *rl, "recipe.padding_free=false")
    packed = train(tmp_path, "packed", *rl, "recipe.padding_free=true")
    keys = ("loss", "grad_norm", "objective/entropy", "policy/clipfrac") + (("objective/kl",) if stage == "grpo" else ("loss/policy",))
    assert_same_training(padded, packed, keys)
    assert packed[-1]["num_tokens"] == padded[-1]["num_tokens"]


def test_shared_prompts_train_like_two_rows_a_pair(tmp_path):
    # LoRA, so the reference is the disabled adapter on the same layout; the plain logits path, so the
    # first response token's log-prob comes from the prompt forward's own logits.
    lora = ("recipe=dpo", "adapter=lora", "recipe.lr=3e-3", "recipe.lm_head_chunk=0")  # a high rate: LoRA moves the loss within 4 steps
    rows = train(tmp_path, "rows", *lora, "recipe.share_prompt=false")
    shared = train(tmp_path, "shared", *lora, "recipe.share_prompt=true")
    assert_same_training(rows, shared, ("loss", "grad_norm", "rewards/margins", "logps/chosen", "logps/rejected"))
    assert shared[-1]["num_tokens"] == rows[-1]["num_tokens"]  # tokens are counted as the pairs' rows either way


def test_the_fused_mlp_trains_like_the_models_own(tmp_path):
    # LoRA DPO: gradients reach the adapters on gate, up and down through SiluMul's own backward.
    lora = ("recipe=dpo", "adapter=lora", "recipe.lr=3e-3")
    own = train(tmp_path, "own", *lora, "recipe.fused_mlp=false")
    fused = train(tmp_path, "fused", *lora, "recipe.fused_mlp=true")
    assert_same_training(own, fused, ("loss", "grad_norm", "rewards/margins", "logps/chosen"))


@pytest.mark.parametrize("adapter", ["lora", "none"])
def test_the_fused_rms_norm_trains_like_the_models_own(tmp_path, adapter):
    # LoRA: gradients flow through every norm to the adapters below it; none: the norms' weights train too.
    recipe = ("recipe=sft", f"adapter={adapter}", "recipe.lr=3e-3")
    own = train(tmp_path, "own", *recipe, "recipe.fused_rms_norm=false")
    fused = train(tmp_path, "fused", *recipe, "recipe.fused_rms_norm=true")
    assert_same_training(own, fused, ("loss", "grad_norm"))


@pytest.mark.parametrize("shape", ["plain", "extra_layers"])
def test_a_trimmed_top_layer_trains_the_reward_model_like_the_full_one(tmp_path, shape):
    # plain: the Bradley-Terry model alone (the top layer is the backbone's); SGD, because from a random
    # init Adam turns float32 rounding in near-zero gradients into whole steps. extra_layers: the
    # default recipe, whose LM loss reads below the two fresh layers, the top one trimmed.
    plain = ("recipe.extra_layers=0", "recipe.lm_loss_coef=0.0", "recipe.optimizer._target_=torch.optim.SGD",
             "~recipe.optimizer.betas", "~recipe.optimizer.eps", "recipe.lr=0.5")
    recipe = ("recipe=reward", *(plain if shape == "plain" else ()))
    full = train(tmp_path, "full", *recipe, "recipe.trim_top_layer=false")
    trimmed = train(tmp_path, "trimmed", *recipe, "recipe.trim_top_layer=true")
    assert_same_training(full, trimmed, ("loss", "grad_norm", "accuracy", "margin", "rewards/chosen"))
