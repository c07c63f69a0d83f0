"""Eval and export on SmolLM2-135M-Instruct: `alignctl eval run=` reproduces a LoRA DPO run's own final
evaluation (against the run's reference, not against itself), and `export merge=true` writes the
model the adapter checkpoint is (LoRA, DoRA, and QLoRA over its 4-bit base), accepted at the default
tolerance, while a wrong merge is refused in one line."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from tests.integration.conftest import run_process
from tests.integration.stage_runs import merge_at_twice_the_scale

pytestmark = pytest.mark.slow

SMALL = ["model=smollm2", "recipe.max_steps=3", "recipe.batch_size=4", "recipe.max_length=96", "recipe.lr=1e-3",
         "recipe.eval_every=0", "recipe.eval_batch_size=4", "data.eval_limit=8", "recipe.eval_max_new_tokens=8"]
RUNS = {"dpo_lora": ["recipe=dpo", "adapter=lora"], "sft_qlora": ["recipe=sft", "adapter=qlora"], "sft_dora": ["recipe=sft", "adapter=dora"]}
DPO_METRICS = ("eval_loss", "eval_rewards/chosen", "eval_rewards/rejected", "eval_rewards/margins", "eval_logps/chosen", "eval_logps/rejected")


def alignctl(*args: str, cwd: Path):
    return run_process([sys.executable, "-m", "alignctl", *args], cwd=cwd)


@pytest.fixture(scope="module")
def runs(smollm2_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("real_eval_export")
    for name, args in RUNS.items():
        done = alignctl("train", *args, *SMALL, f"hydra.run.dir={root / name}", cwd=root)
        assert done.returncode == 0, done.describe()
    return root


def test_eval_reproduces_a_lora_dpo_runs_final_evaluation(runs):
    run = runs / "dpo_lora"
    final = json.loads((run / "eval.json").read_text())
    assert abs(final["eval_loss"] - math.log(2)) > 1e-3, "the run moved away from its reference"
    done = alignctl("eval", f"run={run}", cwd=runs)
    assert done.returncode == 0, done.describe()
    [eval_dir] = (run / "eval").iterdir()
    again = json.loads((eval_dir / "eval.json").read_text())
    for key in DPO_METRICS:
        assert again[key] == pytest.approx(final[key], abs=1e-4), key
    assert again["eval_rewards/accuracies"] == final["eval_rewards/accuracies"]
    assert sum(f.stat().st_size for f in eval_dir.rglob("*") if f.is_file()) < 1_000_000, "no merged base is written"


def chat_ids(tokenizer) -> torch.Tensor:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is 12+7?"}], add_generation_prompt=True, return_tensors="pt")
    return ids["input_ids"] if hasattr(ids, "keys") else ids


@pytest.mark.parametrize("name", list(RUNS))
def test_the_merged_export_is_the_adapter_model(runs, tmp_path, name):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignctl.models.loading import keep_4bit_trainable

    out = tmp_path / "merged"
    done = alignctl("export", f"run={runs / name}", f"out={out}", "merge=true", cwd=tmp_path)  # at the default tolerance
    assert done.returncode == 0, done.describe()
    record = json.loads((out / "alignctl_export.json").read_text())
    assert record["relative_difference"] <= record["tolerance"] == 1e-4

    tokenizer = AutoTokenizer.from_pretrained(out)
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    adapter_model = AutoPeftModelForCausalLM.from_pretrained(runs / name / "checkpoint").eval()  # plain peft, as a user loads it
    ids = chat_ids(tokenizer)
    greedy = [m.generate(input_ids=ids, max_new_tokens=12, do_sample=False)[0].tolist() for m in (merged, adapter_model)]
    assert greedy[0] == greedy[1], [tokenizer.decode(g) for g in greedy]
    if "qlora" in name:  # trained on NF4: plain peft loads that 4-bit base, not the full-precision original
        assert "quantization_config" in json.loads((Path(record["base"]) / "config.json").read_text())
        # Loaded again, kept off bitsandbytes' bf16 CPU inference kernel (which rounds the logits by up
        # to ~1 and, once used, has repacked the weights) to compare in float32.
        adapter_model = keep_4bit_trainable(AutoPeftModelForCausalLM.from_pretrained(runs / name / "checkpoint")).eval()
    with torch.no_grad():
        expected, got = adapter_model(input_ids=ids).logits, merged(input_ids=ids).logits
    assert torch.equal(expected.argmax(-1), got.argmax(-1))
    assert float((expected - got).abs().max()) < 1e-4 * float(expected.abs().max())


def test_a_wrong_merge_of_the_real_model_is_refused(runs, tmp_path, monkeypatch):
    from alignctl.cli import export
    from alignctl.core.errors import UserError

    monkeypatch.setattr(export, "merge", merge_at_twice_the_scale)
    with pytest.raises(UserError) as refused:
        export.export_command([f"run={runs / 'dpo_lora'}", f"out={tmp_path / 'merged'}", "merge=true"])
    assert "\n" not in str(refused.value) and "of the largest logit" in str(refused.value)
    assert not (tmp_path / "merged").exists()
