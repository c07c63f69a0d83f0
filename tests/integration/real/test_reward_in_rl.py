"""End to end on SmolLM2: a reward model trained by recipe=reward (LoRA, a few steps) gives GRPO, for
each sampled completion, the score that reward training computes for that (prompt, completion)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from peft import AutoPeftModelForSequenceClassification
from stage_runs import StageRun
from transformers import AutoTokenizer

from alignctl.rl.scored_text import sequence_scores
from alignctl.stages.reward import encode_pairs, pair_batch

QUESTIONS = ["What is the capital of France?", "Name a primary colour.", "How many legs has a spider?", "What is 2+2?"]
PAIRS = [{"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": good}],
          "rejected": [{"role": "assistant", "content": bad}]}
         for q, good, bad in zip(QUESTIONS, ["Paris.", "Red.", "Eight.", "4."], ["I am not sure, maybe Lyon?", "Hmm.", "Six, I think.", "22"])]


@pytest.mark.slow
def test_grpo_rewards_are_the_reward_models_training_scores(alignctl, smollm2_dir, tmp_path):
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in PAIRS))
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": row["prompt"]}) + "\n" for row in PAIRS))
    reward_dir, grpo_dir = tmp_path / "reward", tmp_path / "grpo"
    # float32 throughout (no bf16 base or autocast), so the two scores can agree to float32 rounding.
    common = ["model=smollm2", "adapter=lora", "data=hf", "data.eval_split=null", "recipe.eval_every=0", "hardware.dtype=float32",
              "hardware.autocast=null"]
    reward = alignctl("train", "recipe=reward", *common, f"data.path={tmp_path / 'pairs.jsonl'}", "recipe.extra_layers=0",
                      "recipe.lm_loss_coef=0", "recipe.max_steps=2", "recipe.batch_size=4", "recipe.max_length=128", "recipe.lr=1e-3",
                      f"hydra.run.dir={reward_dir}")
    StageRun("reward", reward_dir, reward).assert_finished()
    grpo = alignctl("train", "recipe=grpo", *common, f"data.path={tmp_path / 'prompts.jsonl'}", f"inputs.reward={reward_dir}",
                    "recipe.reward_funcs=[]", "recipe.max_steps=1", "recipe.batch_size=4", "recipe.grad_accum=1", "recipe.num_generations=2",
                    "recipe.max_length=128", "recipe.max_new_tokens=12", "logger.samples_every=1", f"hydra.run.dir={grpo_dir}")
    StageRun("grpo", grpo_dir, grpo).assert_finished()
    samples = [json.loads(line) for line in (grpo_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4

    # Each sampled (prompt, completion) scored as reward training scores a pair's chosen side.
    tok = AutoTokenizer.from_pretrained(reward_dir / "checkpoint")
    model = AutoPeftModelForSequenceClassification.from_pretrained(reward_dir / "checkpoint", num_labels=1, dtype=torch.float32)
    model = model.merge_and_unload().eval()
    model.config.pad_token_id = tok.pad_token_id
    rows = [{"prompt": s["prompt"], "chosen": [{"role": "assistant", "content": s["completion"]}],
             "rejected": [{"role": "assistant", "content": s["completion"] + " (not this)"}]} for s in samples]
    recipe = SimpleNamespace(max_length=512)
    cfg = SimpleNamespace(data=SimpleNamespace(overlong=SimpleNamespace(value="error"), num_proc=None))
    batch = pair_batch(encode_pairs(Dataset.from_list(rows), tok, recipe, cfg, "samples")[:], tok.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        trained = sequence_scores(model, batch["input_ids"], batch["attention_mask"], tok.pad_token_id)[0][: len(rows)]
    torch.testing.assert_close(torch.tensor([s["rewards"]["reward_model"] for s in samples]), trained, atol=1e-3, rtol=1e-3)
