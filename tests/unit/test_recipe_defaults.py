"""Which defaults a run gets: a real chat model (model=smollm2, model=hf) gets conf/recipe/*.yaml's, an
adapter ten times full fine-tuning's learning rate (conf/tuned/adapter), and model=tiny the settings the
built-in task was tuned with (conf/tuned/model). The command line wins over all of them."""

from __future__ import annotations

import pytest

from alignctl.cli.app import compose_config
from alignctl.config.validation import validate

REAL = [["model=smollm2"], ["model=hf", "model.name_or_path=some-org/some-model"]]


def recipe(*overrides: str):
    return validate(compose_config(list(overrides))).recipe


@pytest.mark.parametrize("model", REAL, ids=["smollm2", "hf"])
def test_a_real_model_gets_chat_model_defaults(model):
    sft = recipe("recipe=sft", *model)
    assert (sft.max_length, sft.lr, sft.batch_size, sft.grad_accum) == (1024, 2e-5, 8, 2)
    assert recipe("recipe=sft", "adapter=lora", *model).lr == 2e-4
    assert recipe("recipe=sft", "adapter=qlora", *model).lr == 2e-4
    dpo = recipe("recipe=dpo", *model)
    assert (dpo.lr, dpo.beta, dpo.max_length, dpo.nll_weight) == (1e-6, 0.1, 1024, 0.0)
    assert recipe("recipe=dpo", "adapter=dora", *model).lr == 1e-5
    grpo = recipe("recipe=grpo", *model)
    assert (grpo.max_new_tokens, grpo.max_length, grpo.num_generations, grpo.lr) == (256, 768, 8, 1e-6)
    assert recipe("recipe=ppo", *model).max_new_tokens == 256
    distill = recipe("recipe=distill", *model)
    assert (distill.max_new_tokens, distill.lr, distill.beta_jsd, distill.beta) == (256, 1e-6, 1.0, 0.0)
    reward = recipe("recipe=reward", "adapter=lora", *model)  # a plain reward model: an adapter is allowed
    assert (reward.extra_layers, reward.lm_loss_coef, reward.max_length) == (0, 0.0, 1024)


def test_the_tiny_model_keeps_the_built_in_task_settings():
    sft = recipe("recipe=sft")
    assert (sft.max_length, sft.lr, sft.batch_size, sft.grad_accum, sft.max_steps) == (16, 3e-3, 64, 1, 600)
    assert recipe("recipe=sft", "adapter=lora").lr == 3e-3  # the tuned value, not the adapter default
    reward = recipe("recipe=reward")
    assert (reward.extra_layers, reward.lm_loss_coef, reward.batch_size) == (2, 1.0, 128)
    dpo = recipe("recipe=dpo")  # the NLL term that makes DPO hold across SFT seeds on the built-in task
    assert (dpo.nll_weight, dpo.max_steps, dpo.max_length) == (1.0, 200, 16)
    grpo = recipe("recipe=grpo", "model=tiny")
    assert (grpo.max_length, grpo.max_new_tokens, grpo.batch_size, grpo.eval_max_new_tokens) == (24, 8, 64, 8)
    distill = recipe("recipe=distill")
    assert (distill.max_length, distill.max_new_tokens, distill.batch_size, distill.lr) == (24, 8, 64, 1e-4)


@pytest.mark.parametrize("model", [["model=tiny"], *REAL], ids=["tiny", "smollm2", "hf"])
def test_the_command_line_wins_over_every_profile(model):
    assert recipe("recipe=sft", "adapter=lora", "recipe.lr=5e-5", "recipe.max_length=48", *model).lr == 5e-5
    assert recipe("recipe=sft", "recipe.max_length=48", *model).max_length == 48
    assert recipe("recipe=reward", "recipe.extra_layers=1", *model).extra_layers == 1
