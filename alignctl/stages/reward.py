"""Reward model: a scalar head trained on preference pairs with the Bradley-Terry loss.

Trains: a one-label sequence classifier (full weights, or LoRA with the head trained in full).
Needs: prompt/chosen/rejected rows (standard or conversational); an optional ``margin`` column.
Starts from: ``inputs.init=<run dir>`` (an SFT run: the backbone then already knows the task, and
a fresh scalar head is added) or ``model``.
Writes: checkpoint/ (loads as transformers.AutoModelForSequenceClassification), metrics.jsonl,
eval.json (pair accuracy and mean margin on the eval pairs), lineage.json.
Assumes: the score of a sequence is read at its last non-padding token (the pad id must differ
from the tokens that end a sequence, or the score is read one token earlier, consistently).
"""

from __future__ import annotations

from pathlib import Path

import torch
from datasets import Dataset
from omegaconf import DictConfig

from alignctl import data as data_lib
from alignctl.adapters import apply_adapter, parameter_counts
from alignctl.batching import BatchStream, pad, split_micro
from alignctl.config import RewardConfig, RunConfig
from alignctl.encode import encode_rows, preference_example
from alignctl.losses import reward_model_loss
from alignctl.metrics import MetricsLogger
from alignctl.models import device_of, load_reward_model, load_tokenizer, model_path
from alignctl.registry import register_stage
from alignctl.rundir import RunDir
from alignctl.training import (
    build_optimizer,
    build_scheduler,
    configure_torch,
    seed_everything,
    sum_over_batches,
    train_and_finish,
)


def encode_pairs(dataset: Dataset, tokenizer, recipe: RewardConfig, cfg: RunConfig, where: str) -> Dataset:
    has_margin = "margin" in dataset.column_names

    def encode(row: dict, index: int) -> dict | None:
        example = preference_example(tokenizer, row, recipe.max_length, cfg.data.overlong.value, f"{where}: row {index}")
        if example is None:
            return None
        prompt = example["prompt_ids"]
        margin = float(row["margin"]) if has_margin else 0.0
        return {"chosen": prompt + example["chosen_ids"], "rejected": prompt + example["rejected_ids"], "margin": margin}

    return encode_rows(dataset, encode, {"chosen": [], "rejected": [], "margin": 0.0}, cfg.data.num_proc, where, recipe.max_length)


def pair_batch(rows: dict[str, list], pad_id: int, device: torch.device) -> dict:
    """Chosen sequences then rejected ones, right-padded, scored in one forward."""
    sequences = rows["chosen"] + rows["rejected"]
    input_ids = pad(sequences, pad_id)
    attention_mask = pad([[1] * len(s) for s in sequences], 0)
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": attention_mask.to(device),
        "margin": torch.tensor(rows["margin"], dtype=torch.float32, device=device),
        "num_items": len(rows["chosen"]),
        "num_tokens": int(attention_mask.sum()),
    }


@register_stage("reward")
def run(cfg: RunConfig, raw: DictConfig, run_dir: Path) -> dict[str, float]:
    recipe: RewardConfig = cfg.recipe
    configure_torch(cfg.hardware)
    seed_everything(cfg.seed)
    device = device_of(cfg.hardware)

    train_raw = data_lib.load_split(cfg.data, "preference", cfg.data.train_split)
    eval_raw = data_lib.load_eval_split(cfg.data, "preference")
    use_margin = "margin" in train_raw.column_names
    path = model_path(cfg.model, cfg.inputs.get("init"))
    tokenizer = load_tokenizer(path, cfg.model)
    train_set = encode_pairs(train_raw, tokenizer, recipe, cfg, f"{cfg.data.path} [{cfg.data.train_split}]")
    eval_set = encode_pairs(eval_raw, tokenizer, recipe, cfg, f"{cfg.data.path} [{cfg.data.eval_split}]") if eval_raw else None

    model = apply_adapter(load_reward_model(path, cfg.model, cfg.hardware, tokenizer.pad_token_id), cfg.adapter, "SEQ_CLS")
    trainable, total = parameter_counts(model)
    stream = BatchStream([max(len(c), len(r)) for c, r in zip(train_set["chosen"], train_set["rejected"])],
                         recipe.batch_size * recipe.grad_accum, cfg.seed)
    optimizer = build_optimizer(model, recipe)
    scheduler = build_scheduler(optimizer, recipe)
    parents = {"init": cfg.inputs["init"]} if cfg.inputs.get("init") else {}
    run = RunDir(run_dir, raw, "reward", parents, data_fingerprint=train_raw._fingerprint)
    logger = MetricsLogger(run_dir, recipe.max_steps, 0, cfg.logger.tensorboard, cfg.logger.log_every)
    logger.note(f"reward: {len(train_set)} pairs{' with margins' if use_margin else ''}, from {path}, "
                f"{trainable:,} of {total:,} parameters train ({100 * trainable / total:.2f}%)")

    def score_pairs(batch: dict, num_items: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1).float()
        pairs = batch["num_items"]
        chosen, rejected = scores[:pairs], scores[pairs:]
        losses = reward_model_loss(chosen, rejected, batch["margin"] if use_margin else None, recipe.center_rewards_coefficient)
        gap = (chosen - rejected).detach()
        metrics = {
            "accuracy": (gap > 0).float().sum() / num_items,
            "margin": gap.sum() / num_items,
            "rewards/chosen": chosen.detach().sum() / num_items,
            "rewards/rejected": rejected.detach().sum() / num_items,
        }
        return losses.sum() / num_items, metrics

    def next_step() -> list[dict]:
        return [pair_batch(train_set[rows], tokenizer.pad_token_id, device) for rows in split_micro(next(stream), recipe.grad_accum)]

    @torch.no_grad()
    def evaluate(step: int) -> dict[str, float]:
        if eval_set is None:
            return {}
        model.eval()
        result = sum_over_batches(eval_set, recipe.eval_batch_size, lambda rows: pair_batch(rows, tokenizer.pad_token_id, device), score_pairs)
        logger.note(f"step {step}: " + "  ".join(f"{k}={result[k]:.4f}" for k in ("eval_loss", "eval_accuracy", "eval_margin")))
        return result

    return train_and_finish(run, recipe, model, tokenizer, optimizer, scheduler, logger, stream, evaluate, next_step, score_pairs,
                            cfg.hardware, shown=("loss", "accuracy", "margin"))
