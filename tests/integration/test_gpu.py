"""CUDA paths: bf16 autocast and TF32 on one GPU. Skipped on machines without a CUDA device."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (make test-gpu on a GPU machine)"),
]


@pytest.mark.parametrize("adapter", ["none", "lora"])
def test_sft_trains_on_gpu_with_bf16_autocast(alignctl, tmp_path, adapter):
    run_dir = tmp_path / adapter
    result = alignctl(
        "train", "hardware=gpu", f"adapter={adapter}", "recipe.max_steps=5", "data.eval_limit=32", f"hydra.run.dir={run_dir}"
    )
    assert result.returncode == 0, result.describe()
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [line["loss"] for line in lines if "loss" in line]
    assert len(losses) == 5 and all(loss == loss for loss in losses)  # finite, not NaN


def test_qlora_on_gpu_uses_bf16_compute_and_paged_adamw(alignctl, tmp_path):
    """QLoRA as it is meant to run: NF4 base on the GPU, bf16 compute, bitsandbytes' paged 8-bit AdamW."""
    run_dir = tmp_path / "qlora"
    result = alignctl("train", "hardware=gpu", "adapter=qlora", "adapter.compute_dtype=bfloat16", "recipe.max_steps=5",
                      "data.eval_limit=32", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.describe()
    assert "paged 8-bit AdamW needs CUDA" not in result.output
    state = torch.load(run_dir / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert state["optimizer"]["state"], "the optimiser kept state"
