"""Every recipe with every adapter kind trains under bf16 autocast on CPU.

CPU autocast runs the same dtype paths as a GPU's (bf16 activations over float32 or bf16 weights,
float32 adapters), so a dtype bug in any of them shows on any machine: each pair takes two steps
through the real CLI and must finish with finite losses.
"""

from __future__ import annotations

import math

import pytest

from tests.integration.stage_runs import StageRun

QUICK = ["recipe.max_steps=2", "data.eval_limit=8", "recipe.eval_every=0", "hardware.autocast=bf16"]
# An untrained model never solves the task: a graded reward (length) gives the policy a gradient.
RL = ["recipe.reward_funcs=[{_target_: alignctl.rewards.length_penalty, max_chars: 1}]", "recipe.batch_size=8"]
RECIPES = {
    "sft": [],
    "reward": [],
    "dpo": [],
    "kto": [],
    "grpo": [*RL, "recipe.num_generations=4"],
    "ppo": RL,
}
ADAPTERS = ["none", "lora", "dora", "qlora"]


@pytest.mark.parametrize("adapter", ADAPTERS)
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_every_recipe_and_adapter_trains_under_bf16_autocast(alignctl, tmp_path, recipe, adapter):
    run_dir = tmp_path / f"{recipe}-{adapter}"
    # A reward model's extra layers are full weights: an adapter run scores from the base's top layer.
    extra = ["recipe.extra_layers=0"] if recipe == "reward" and adapter != "none" else []
    result = alignctl("train", f"recipe={recipe}", f"adapter={adapter}", *RECIPES[recipe], *extra, *QUICK, f"hydra.run.dir={run_dir}")
    run = StageRun(f"{recipe}-{adapter}", run_dir, result)
    run.assert_finished()
    losses = [record["loss"] for record in run.train_records()]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses), losses


def test_an_adapter_trained_over_a_bf16_base_loads_in_float32_with_plain_peft(alignctl, tmp_path):
    """Under bf16 autocast the frozen base is stored in bf16 (hardware.dtype=auto) and the adapter
    trains in float32; the checkpoint is a plain float32 adapter that peft loads without alignctl."""
    import torch
    from peft import AutoPeftModelForCausalLM
    from safetensors.torch import load_file

    run_dir = tmp_path / "sft-lora"
    result = alignctl("train", "recipe=sft", "adapter=lora", *QUICK, f"hydra.run.dir={run_dir}")
    StageRun("sft-lora", run_dir, result).assert_finished()
    assert "bfloat16 base, float32 adapters" in " ".join(result.output.split())
    weights = load_file(str(run_dir / "checkpoint" / "adapter_model.safetensors"))
    assert weights and all(w.dtype == torch.float32 for w in weights.values())
    assert any(float(w.abs().sum()) > 0 for key, w in weights.items() if "lora_B" in key), "B starts at zero: it trained"
    model = AutoPeftModelForCausalLM.from_pretrained(str(run_dir / "checkpoint"), dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all()
