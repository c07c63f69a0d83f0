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


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_gpus_with_nccl(alignctl, tmp_path, strategy):
    """hardware=ddp|fsdp on 2 GPUs (nccl, bf16 autocast): one process per GPU, rank 0 writes."""
    run_dir = tmp_path / strategy
    result = alignctl("train", f"hardware={strategy}", "hardware.autocast=bf16", "recipe.max_steps=5", "data.eval_limit=32",
                      f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.describe()
    state = torch.load(run_dir / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert len(state["rng_per_rank"]) == 2
