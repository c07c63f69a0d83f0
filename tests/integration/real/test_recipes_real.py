"""Every recipe trains the real chat model end to end (a few steps on the built-in chat task) and
writes a checkpoint that plain transformers/peft load without alignctl."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.integration.conftest import run_process
from tests.integration.stage_runs import StageRun

# Small enough for two CPU cores; conversational rows, so the chat template and the ChatML masks run.
COMMON = ["model=smollm2", "data.path=builtin:chat_arithmetic", "data.eval_limit=4", "hardware=cpu",
          "recipe.max_length=64", "recipe.batch_size=2", "recipe.eval_every=0", "recipe.eval_batch_size=4"]
ONLINE = ["recipe.max_new_tokens=6", "recipe.eval_max_new_tokens=6", "recipe.max_steps=2"]


def train(tmp_path_factory, name: str, *overrides: str, **process) -> StageRun:
    """`process`: run_process's timeout and env, for the longer runs."""
    run_dir = tmp_path_factory.mktemp("real") / name
    args = [sys.executable, "-m", "alignctl", "train", *COMMON, *overrides, f"hydra.run.dir={run_dir}"]
    run = StageRun(name, run_dir, run_process(args, cwd=run_dir.parent, **process))
    run.assert_finished()
    return run


def lora_b_norm(checkpoint) -> float:
    """B starts at zero in LoRA: any norm above zero means the adapter trained."""
    weights = load_file(str(checkpoint / "adapter_model.safetensors"))
    return sum(float(w.norm()) for k, w in weights.items() if "lora_B" in k)


def load_with_peft(checkpoint, auto_class: str = "AutoPeftModelForCausalLM", **kwargs):
    import peft

    return getattr(peft, auto_class).from_pretrained(str(checkpoint), **kwargs)


@pytest.mark.slow
def test_sft_with_lora_learns_the_answers(tmp_path_factory, smollm2_dir):
    run = train(tmp_path_factory, "sft", "recipe=sft", "adapter=lora", "recipe.lr=1e-3", "recipe.max_steps=6",
                "recipe.warmup_ratio=0", "recipe.batch_size=4")
    evals = [r["eval_loss"] for r in run.records() if "eval_loss" in r]
    assert evals[-1] < evals[0] - 0.3, evals
    assert lora_b_norm(run.dir / "checkpoint") > 0
    model = load_with_peft(run.dir / "checkpoint")
    assert type(model.base_model.model).__name__ == "LlamaForCausalLM"


@pytest.mark.slow
def test_full_sft_and_full_dpo_write_plain_transformers_checkpoints(tmp_path_factory, smollm2_dir):
    from transformers import AutoModelForCausalLM

    base = load_file(str(smollm2_dir / "model.safetensors"))["model.layers.0.mlp.down_proj.weight"]
    for recipe, lr in (("sft", "1e-5"), ("dpo", "1e-6")):
        run = train(tmp_path_factory, f"full-{recipe}", f"recipe={recipe}", "adapter=none", f"recipe.lr={lr}", "recipe.max_steps=2")
        model = AutoModelForCausalLM.from_pretrained(str(run.dir / "checkpoint"))
        assert not torch.equal(model.model.layers[0].mlp.down_proj.weight, base), f"{recipe}: weights unchanged"


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["dpo", "kto"])
def test_preference_recipes_with_lora(tmp_path_factory, smollm2_dir, recipe):
    run = train(tmp_path_factory, recipe, f"recipe={recipe}", "adapter=lora", "recipe.max_steps=3", "recipe.lr=5e-4")
    assert lora_b_norm(run.dir / "checkpoint") > 0
    losses = [r["loss"] for r in run.train_records()]
    assert all(loss == loss for loss in losses) and losses, losses  # finite, logged
    load_with_peft(run.dir / "checkpoint")


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory, smollm2_dir) -> StageRun:
    return train(tmp_path_factory, "reward", "recipe=reward", "adapter=lora", "recipe.extra_layers=0", "recipe.max_steps=2", "recipe.lr=5e-4")


@pytest.mark.slow
def test_reward_model_with_lora_loads_as_a_sequence_classifier(reward_run):
    model = load_with_peft(reward_run.dir / "checkpoint", "AutoPeftModelForSequenceClassification", num_labels=1)
    assert model.base_model.model.score.out_features == 1


@pytest.mark.slow
def test_grpo_with_lora_rolls_out_until_im_end(tmp_path_factory, smollm2_dir):
    # Out of the box the model scores 0 on every sum (it explains instead of answering), so the task
    # verifier alone gives equal rewards and no advantage; a length reward differs between samples.
    run = train(tmp_path_factory, "grpo", "recipe=grpo", "adapter=lora", "recipe.num_generations=2", *ONLINE,
                "recipe.reward_funcs=[alignctl.rewards.task_verifier,alignctl.rewards.length_penalty]")
    assert lora_b_norm(run.dir / "checkpoint") > 0
    assert all("reward" in r for r in run.train_records())


@pytest.mark.slow
def test_ppo_with_lora_against_a_lora_reward_model(tmp_path_factory, reward_run):
    run = train(tmp_path_factory, "ppo", "recipe=ppo", "adapter=lora", f"inputs.reward={reward_run.dir}", *ONLINE)
    assert lora_b_norm(run.dir / "checkpoint") > 0
    lineage = json.loads((run.dir / "lineage.json").read_text())
    assert str(reward_run.dir) in json.dumps(lineage)
