"""Reward model: a scalar head trained on preference pairs with the Bradley-Terry loss.

Trains: a one-label sequence classifier (full weights, or LoRA with the head trained in full).
Needs: prompt/chosen/rejected rows (standard or conversational); an optional ``margin`` column.
Starts from: ``inputs.init=<run dir>`` (an SFT run: the backbone then already knows the task, and
a fresh scalar head is added) or ``model``.
Writes: checkpoint/ (loads as transformers.AutoModelForSequenceClassification), metrics.jsonl,
eval.json (pair accuracy and mean margin on the eval pairs), lineage.json.
Scores: each side of a pair is the text alignctl/rl/scored_text.py builds and is read where it says
(transformers' pooling: the rightmost token that is not the pad id), the same text and position as
PPO/GRPO rollout scoring uses.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from omegaconf import DictConfig
from transformers import AutoConfig

from alignctl.config.schema import RewardConfig, RunConfig
from alignctl.core import distributed
from alignctl.core.errors import ConfigError
from alignctl.data import loading as data_lib
from alignctl.data.batching import BatchStream, column_lengths, split_micro
from alignctl.data.encode import IGNORE, encode_rows, preference_example
from alignctl.models.adapters import apply_adapter, parameter_counts
from alignctl.models.loading import (
    add_decoder_layers,
    backbone,
    base_dir_of,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    model_path,
)
from alignctl.nn.losses import reward_model_loss, sft_loss
from alignctl.nn.model_parts import unwrapped
from alignctl.rl.scored_text import (
    completion_turn,
    has_score_head,
    packed,
    packed_scores,
    packed_scoring_pays,
    padded,
    sequence_scores,
)
from alignctl.train.session import (
    start_process,
    start_training,
    sum_over_batches,
)
from alignctl.train.stage_spec import BatchShape, HeldModel, PlanData, Stage, longest


def encode_pairs(dataset: Dataset, tokenizer, recipe: RewardConfig, cfg: RunConfig, where: str) -> Dataset:
    has_margin = "margin" in dataset.column_names

    def encode(row: dict, index: int) -> dict | None:
        # A string answer to a conversational prompt is an assistant turn, as rollout scoring renders it.
        sides = {side: completion_turn(row.get("prompt"), row[side]) for side in ("chosen", "rejected")}
        # turn_tail: the score is read after the turn's closing text, as rollout scoring reads it.
        example = preference_example(tokenizer, row | sides, recipe.max_length, cfg.data.overlong.value, f"{where}: row {index}", turn_tail=True)
        if example is None:
            return None
        prompt = example["prompt_ids"]
        margin = float(row["margin"]) if has_margin else 0.0
        return {"chosen": prompt + example["chosen_ids"], "rejected": prompt + example["rejected_ids"], "margin": margin, "prompt_len": len(prompt)}

    empty = {"chosen": [], "rejected": [], "margin": 0.0, "prompt_len": 0}
    return encode_rows(dataset, encode, empty, cfg.data.num_proc, where, recipe.max_length)


def pair_batch(rows: dict[str, list], pad_id: int, device: torch.device, padding_free: bool = False) -> dict:
    """Chosen sequences then rejected ones, scored in one forward: right-padded, or with `padding_free`
    end to end in one row (alignctl.rl.scored_text.packed; no next-token targets then)."""
    sequences = rows["chosen"] + rows["rejected"]
    if padding_free:
        return {key: value.to(device) for key, value in packed(sequences, pad_id).items()} | {
            "margin": torch.tensor(rows["margin"], dtype=torch.float32, device=device),
            "num_items": len(rows["chosen"]),
            "num_tokens": sum(map(len, sequences)),
        }
    input_ids, attention_mask = padded(sequences, pad_id)
    width = input_ids.size(1)
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": attention_mask.to(device),
        "margin": torch.tensor(rows["margin"], dtype=torch.float32, device=device),
        "num_items": len(rows["chosen"]),
        "num_tokens": int(attention_mask.sum()),
        # Next-token targets of the chosen responses (prompt and padding ignored), for recipe.lm_loss_coef.
        "lm_labels": torch.tensor([[IGNORE] * n + ids[n:] + [IGNORE] * (width - len(ids)) for ids, n in zip(rows["chosen"], rows["prompt_len"])], device=device),
    }


def lm_head_weight(model: torch.nn.Module, path: str, cfg: RunConfig) -> torch.Tensor:
    """The language-model head the auxiliary loss scores with: the input embeddings when tied (they
    train with the body, as in the initial model), else a frozen copy of the initial model's head."""
    adapter = Path(path) / "adapter_config.json"
    if adapter.exists():  # a LoRA run's checkpoint: its task type says what the base was trained as
        architectures = ["ForCausalLM"] if json.loads(adapter.read_text()).get("task_type") == "CAUSAL_LM" else ["a sequence classifier adapter"]
    else:
        architectures = getattr(AutoConfig.from_pretrained(path), "architectures", None) or []
    if not any(a.endswith("ForCausalLM") for a in architectures):
        raise ConfigError("recipe.lm_loss_coef", f"needs an init with a language-model head (a causal LM or an SFT run); {path} is {', '.join(architectures) or 'not one'}: set recipe.lm_loss_coef=0")
    if getattr(model.config, "tie_word_embeddings", False):
        return model.get_input_embeddings().weight
    head = load_causal_lm(path, cfg.model, cfg.hardware).get_output_embeddings().weight.detach()
    return head.to(next(model.parameters()).device)


def top_of_initial_body(model: torch.nn.Module, hidden_states: tuple[torch.Tensor, ...], extra_layers: int) -> torch.Tensor:
    """Final-normed hidden states as the initial backbone computed them, below any extra layers.

    hidden_states[-1] is already normed by the model; earlier entries are raw layer outputs."""
    if extra_layers == 0:
        return hidden_states[-1]
    return backbone(model).norm(hidden_states[-1 - extra_layers])


def held_models(cfg: RunConfig) -> list[HeldModel]:
    path = model_path(cfg.model, cfg.inputs.get("init"))
    return [HeldModel("reward model (trained)", path, trained=True, scalar_head=True, extra_layers=cfg.recipe.extra_layers)]


def side_lengths(cfg: RunConfig, data: PlanData) -> list[int]:
    encoded = encode_pairs(data.raw, data.tokenizer, cfg.recipe, cfg, data.where)
    return [len(ids) for side in ("chosen", "rejected") for ids in encoded[side]]


def planned_batch(cfg: RunConfig, data: PlanData, rows: int) -> BatchShape:
    sides = longest(data.once("reward: sequence lengths", lambda: side_lengths(cfg, data)), rows)
    # Chosen and rejected sequences right-padded together; one score is read per sequence.
    return BatchShape(len(sides), sides[0], len(sides), data.source)


def run(cfg: RunConfig, raw: DictConfig, run_dir: Path) -> dict[str, float]:
    recipe: RewardConfig = cfg.recipe
    device = start_process(cfg)

    train_raw = data_lib.load_split(cfg.data, "preference", cfg.data.train_split)
    eval_raw = data_lib.load_eval_split(cfg.data, "preference")
    use_margin = "margin" in train_raw.column_names
    path = model_path(cfg.model, cfg.inputs.get("init"))
    tokenizer = load_tokenizer(path, cfg.model)
    train_set = encode_pairs(train_raw, tokenizer, recipe, cfg, f"{cfg.data.path} [{cfg.data.train_split}]")
    eval_set = encode_pairs(eval_raw, tokenizer, recipe, cfg, f"{cfg.data.path} [{cfg.data.eval_split}]") if eval_raw else None

    model = load_reward_model(path, cfg.model, cfg.hardware, tokenizer.pad_token_id, cfg.adapter, base_dir=base_dir_of(cfg, run_dir))
    if recipe.extra_layers:
        add_decoder_layers(model, recipe.extra_layers)
    model = apply_adapter(model, cfg.adapter, "SEQ_CLS")
    lm_weight = lm_head_weight(model, path, cfg) if recipe.lm_loss_coef else None
    # Padding-free rows where they pay; the LM loss reads padded rows (the config refuses both at once).
    padding_free = recipe.padding_free if recipe.padding_free is not None else (lm_weight is None and packed_scoring_pays(model))
    if padding_free and not has_score_head(model):
        raise ConfigError("recipe.padding_free", f"scores packed rows with a decoder classifier's `score` head; {type(unwrapped(model)).__name__} "
                                                 "has none: set recipe.padding_free=false")
    trainable, total = parameter_counts(model)
    stream = BatchStream(np.maximum(column_lengths(train_set, "chosen"), column_lengths(train_set, "rejected")).tolist(),
                         recipe.batch_size * recipe.grad_accum, cfg.seed, **distributed.current().shard)
    session = start_training(model, tokenizer, stream, cfg, raw, run_dir, "reward", train_raw._fingerprint)
    logger = session.logger
    logger.note(f"reward: {len(train_set)} pairs{' with margins' if use_margin else ''}, from {path}, "
                f"{trainable:,} of {total:,} parameters train ({100 * trainable / total:.2f}%)"
                f"{', padding-free batches' if padding_free else ''}")

    def score_pairs(batch: dict, num_items: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with_lm = lm_weight is not None and "step_lm_tokens" in batch  # training steps only, not eval
        # The LM loss without extra layers reads the top layer's output at every position.
        trim = recipe.trim_top_layer and not (with_lm and recipe.extra_layers == 0)
        if "read_at" in batch:
            scores = packed_scores(model, batch, trim)
        else:
            scores, out = sequence_scores(model, batch["input_ids"], batch["attention_mask"], tokenizer.pad_token_id, trim, output_hidden_states=with_lm)
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
        loss = losses.sum() / num_items
        if with_lm:
            # Keep the initial model's next-token predictions alive where the extra layers read them:
            # without this, the scalar head alone never learns exact checks (see docs/results.md, reward model).
            hidden = top_of_initial_body(model, out.hidden_states, recipe.extra_layers)[:pairs]
            lm_loss = sft_loss(torch.nn.functional.linear(hidden, lm_weight), batch["lm_labels"], batch["step_lm_tokens"])[0]
            loss = loss + recipe.lm_loss_coef * lm_loss
            metrics["lm_loss"] = lm_loss.detach()
        return loss, metrics

    def next_step() -> list[dict]:
        micro = [pair_batch(train_set[rows], tokenizer.pad_token_id, device, padding_free) for rows in split_micro(next(stream), recipe.grad_accum)]
        lm_tokens = sum(int((mb["lm_labels"][:, 1:] != IGNORE).sum()) for mb in micro if "lm_labels" in mb)
        return [mb | {"step_lm_tokens": lm_tokens} for mb in micro]

    @torch.no_grad()
    def evaluate(step: int) -> dict[str, float]:
        if eval_set is None:
            return {}
        model.eval()
        result = sum_over_batches(eval_set, recipe.eval_batch_size, lambda rows: pair_batch(rows, tokenizer.pad_token_id, device, padding_free), score_pairs)
        logger.note(f"step {step}: " + "  ".join(f"{k}={result[k]:.4f}" for k in ("eval_loss", "eval_accuracy", "eval_margin")))
        return result

    return session.train(evaluate, next_step, score_pairs, shown=("loss", "accuracy", "margin"))


STAGE = Stage("reward", run, held_models, data_format="preference", planned_batch=planned_batch, sequences_per_row=2)
