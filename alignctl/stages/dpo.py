"""DPO and its family: learn from preference pairs without a reward model or sampling.

Trains: a causal LM (full weights, or a LoRA adapter) with recipe.loss_type = sigmoid (DPO),
robust, hinge, ipo or simpo, optional label smoothing and an NLL term on the chosen response.
Needs: prompt/chosen/rejected rows (standard or conversational; or chosen/rejected conversations
with a shared prompt). Starts from: ``inputs.policy=<SFT run dir>`` or ``model``.
Reference: ``recipe.reference`` (auto, separate, adapter_disabled, precomputed, none; see
alignctl/train/reference.py); it is the starting policy.
Writes: checkpoint/, metrics.jsonl (TRL's rewards/* and logps/* names), eval.json, lineage.json.
Evaluates: the same metrics on the eval pairs and, on a built-in task, greedy exact-match accuracy.
Efficiency: chosen and rejected go through the model in one forward; only response positions
reach the vocabulary projection (alignctl/nn/logprobs.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from omegaconf import DictConfig

from alignctl.config.schema import DPOConfig, DPOLossType, Reference, RunConfig
from alignctl.core import distributed
from alignctl.data import loading as data_lib
from alignctl.data.batching import BatchStream, column_lengths, split_micro
from alignctl.data.encode import encode_rows, preference_example
from alignctl.models.adapters import apply_adapter, parameter_counts
from alignctl.models.loading import load_tokenizer, model_path
from alignctl.nn.logprobs import (
    left_padded_batch,
    packed_response_logps,
    response_logps,
)
from alignctl.nn.losses import dpo_loss
from alignctl.nn.prompt_groups import prompt_group_fields, rows_end_to_end
from alignctl.nn.shared_prompt import applies as shared_prompt_applies
from alignctl.nn.shared_prompt import shared_prompt_batch, shared_prompt_logps
from alignctl.nn.varlen_attention import applies as prompt_once_applies
from alignctl.nn.varlen_attention import pays as packed_layout_pays
from alignctl.train.evaluate import task_accuracy
from alignctl.train.reference import (
    cache_key,
    held_reference,
    load_policy_and_reference,
    model_identity,
    precompute,
    reference_for,
    reference_logps,
)
from alignctl.train.session import (
    start_process,
    start_training,
    sum_over_batches,
)
from alignctl.train.stage_spec import BatchShape, HeldModel, PlanData, Stage

LENGTH_NORMALISED = (DPOLossType.ipo, DPOLossType.simpo)  # these compare per-token log-probs (as TRL does)


def encode_pairs(dataset: Dataset, tokenizer, recipe: DPOConfig, cfg: RunConfig, where: str) -> Dataset:
    def encode(row: dict, index: int) -> dict | None:
        return preference_example(tokenizer, row, recipe.max_length, cfg.data.overlong.value, f"{where}: row {index}")

    return encode_rows(dataset, encode, {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}, cfg.data.num_proc, where, recipe.max_length)


def batch_layout(recipe: DPOConfig, policy: torch.nn.Module) -> tuple[bool, bool]:
    """(share_prompt, padding_free) as the batches are built. Prefix sharing needs the KV cache, which
    gradient checkpointing turns off (a padding-free batch computes each prompt once too, where alignctl's
    attention runs; share_prompt is the form that also runs under a flash kernel). padding_free=null: padding-free where it pays (no padding computed;
    on SmolLM2 LoRA DPO under bf16, 2 CPU cores, 1.00 s a step against 1.03 s padded, docs/performance.md),
    padded rows where it would not or where share_prompt runs."""
    share = recipe.share_prompt and shared_prompt_applies(policy)
    padding_free = recipe.padding_free if recipe.padding_free is not None else (not share and packed_layout_pays(policy))
    return share, padding_free


def pair_batch(rows: dict[str, list], pad_id: int, device: torch.device, share_prompt: bool = False, padding_free: bool = False,
               prompt_once: bool = False) -> dict:
    """Chosen rows then rejected rows, in one batch (one forward for both); with `share_prompt`, each
    prompt once for its two responses (alignctl/nn/shared_prompt.py); with `padding_free`, all of them end
    to end in one row (alignctl/nn/prompt_groups.py): with `prompt_once` (where alignctl's attention runs)
    each prompt once, followed by its two responses, else two rows a pair (as a flash kernel takes them)."""
    if padding_free:
        prompts, responses = rows["prompt_ids"] * 2, rows["chosen_ids"] + rows["rejected_ids"]
        padded = left_padded_batch(prompts, responses, pad_id)
        fields = prompt_group_fields(prompts, responses) if prompt_once else rows_end_to_end(padded, max(map(len, responses)))
        batch = fields or padded  # padded rows where a prompt is empty
        tokens = int(padded["attention_mask"].sum())  # counted as two rows a pair, whichever layout runs
    elif share_prompt:
        batch = shared_prompt_batch(rows["prompt_ids"], rows["chosen_ids"], rows["rejected_ids"], pad_id)
        tokens = 2 * int(batch["prompt_mask"].sum()) + int(batch["response_mask"].sum())  # counted as two rows a pair
    else:
        batch = left_padded_batch(rows["prompt_ids"] * 2, rows["chosen_ids"] + rows["rejected_ids"], pad_id)
        tokens = int(batch["attention_mask"].sum())
    out = {k: v.to(device) for k, v in batch.items()}
    if "ref_logps" in rows:  # precomputed reference: (B, 2) chosen, rejected
        out["ref_logps"] = torch.tensor(rows["ref_logps"], device=device).T.reshape(-1)
    return {**out, "num_items": len(rows["prompt_ids"]), "num_tokens": tokens}


def pair_logps(model: torch.nn.Module, batch: dict, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs and lengths of the chosen then the rejected responses, whichever layout `batch` has."""
    if "prompt_ids" in batch:
        return shared_prompt_logps(model, batch, chunk)
    if "packed_ids" in batch:
        return packed_response_logps(model, batch, chunk)
    return response_logps(model, batch, chunk)


def held_models(cfg: RunConfig) -> list[HeldModel]:
    return [HeldModel("policy (trained)", model_path(cfg.model, cfg.inputs.get("policy")), trained=True), *held_reference(cfg)]


def pair_lengths(cfg: RunConfig, data: PlanData) -> tuple[int, int, int]:
    """(pairs, longest prompt, longest response) of the encoded training split."""
    encoded = encode_pairs(data.raw, data.tokenizer, cfg.recipe, cfg, data.where)
    responses = [max(len(c), len(r)) for c, r in zip(encoded["chosen_ids"], encoded["rejected_ids"])]
    return len(responses), max(len(p) for p in encoded["prompt_ids"]), max(responses)


def planned_batch(cfg: RunConfig, data: PlanData, rows: int) -> BatchShape:
    count, prompt, response = data.once("dpo: pairs, longest prompt and response", lambda: pair_lengths(cfg, data))
    pairs = min(cfg.recipe.batch_size, count)
    # Left-padded prompts, right-padded responses: the width is the longest prompt plus the longest response.
    return BatchShape(2 * pairs, prompt + response, 2 * pairs * response, data.source)


def run(cfg: RunConfig, raw: DictConfig, run_dir: Path) -> dict[str, float]:
    recipe: DPOConfig = cfg.recipe
    device = start_process(cfg)
    mode = reference_for(cfg)

    train_raw = data_lib.load_split(cfg.data, "preference", cfg.data.train_split)
    eval_raw = data_lib.load_eval_split(cfg.data, "preference")
    task_rows = data_lib.task_eval_rows(cfg.data)
    path = model_path(cfg.model, cfg.inputs.get("policy"))
    tokenizer = load_tokenizer(path, cfg.model)
    train_set = encode_pairs(train_raw, tokenizer, recipe, cfg, f"{cfg.data.path} [{cfg.data.train_split}]")
    eval_set = encode_pairs(eval_raw, tokenizer, recipe, cfg, f"{cfg.data.path} [{cfg.data.eval_split}]") if eval_raw else None

    policy, reference, reference_path = load_policy_and_reference(cfg, mode, tokenizer, path, run_dir)
    share, padding_free = batch_layout(recipe, policy)
    prompt_once = padding_free and prompt_once_applies(policy)  # the reference loads as the policy does: the same attention

    def batch_of(rows: dict[str, list]) -> dict:
        return pair_batch(rows, tokenizer.pad_token_id, device, share, padding_free, prompt_once)

    def logps(model: torch.nn.Module, batch: dict) -> torch.Tensor:
        summed, lengths = pair_logps(model, batch, recipe.lm_head_chunk)
        return summed / lengths if recipe.loss_type in LENGTH_NORMALISED else summed

    def with_reference(dataset: Dataset, split: str) -> Dataset:
        key = cache_key(stage="dpo", model=model_identity(reference_path), data=dataset._fingerprint, split=split,
                        max_length=recipe.max_length, normalised=recipe.loss_type in LENGTH_NORMALISED)
        return precompute(dataset, reference, batch_of, logps,
                          recipe.eval_batch_size, key, split)

    if mode == Reference.precomputed:
        train_set = with_reference(train_set, "train")
        eval_set = with_reference(eval_set, "eval") if eval_set is not None else None
        reference = None  # freed: training holds one model

    policy = apply_adapter(policy, cfg.adapter)
    trainable, total = parameter_counts(policy)
    step_rows = recipe.batch_size * recipe.grad_accum
    stream = BatchStream((column_lengths(train_set, "prompt_ids") + np.maximum(column_lengths(train_set, "chosen_ids"), column_lengths(train_set, "rejected_ids"))).tolist(), step_rows, cfg.seed, **distributed.current().shard)
    session = start_training(policy, tokenizer, stream, cfg, raw, run_dir, "dpo", train_raw._fingerprint)
    logger = session.logger
    logger.note(f"dpo: {len(train_set)} pairs, {recipe.loss_type.value} loss, beta {recipe.beta}, reference {mode.value}, "
                f"{trainable:,} of {total:,} parameters train ({100 * trainable / total:.2f}%)")

    def pair_metrics(batch: dict, num_items: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # The reference first: its forward (no gradient) then runs before the policy's activations are held.
        ref = reference_logps(mode, policy, reference, batch, logps)
        policy_logps, lengths = pair_logps(policy, batch, recipe.lm_head_chunk)
        pairs = batch["num_items"]
        normalised = policy_logps / lengths if recipe.loss_type in LENGTH_NORMALISED else policy_logps
        losses, rewards = dpo_loss(normalised[:pairs], normalised[pairs:], ref[:pairs], ref[pairs:], recipe.beta,
                                   recipe.loss_type.value, recipe.label_smoothing, recipe.simpo_gamma)
        loss = losses.sum()
        metrics = {}
        if recipe.nll_weight:
            nll = -(policy_logps[:pairs] / lengths[:pairs]).sum()  # per-token NLL of the chosen responses
            loss = loss + recipe.nll_weight * nll
            metrics["nll_loss"] = nll.detach() / num_items
        chosen, rejected = rewards["chosen_rewards"], rewards["rejected_rewards"]
        metrics |= {
            "rewards/chosen": chosen.sum() / num_items,
            "rewards/rejected": rejected.sum() / num_items,
            "rewards/accuracies": (chosen > rejected).float().sum() / num_items,
            "rewards/margins": (chosen - rejected).sum() / num_items,
            # The log-probs the loss compares: per token for ipo and simpo (as TRL logs them), summed otherwise.
            "logps/chosen": normalised[:pairs].detach().sum() / num_items,
            "logps/rejected": normalised[pairs:].detach().sum() / num_items,
        }
        return loss / num_items, metrics

    def next_step() -> list[dict]:
        return [batch_of(train_set[rows]) for rows in split_micro(next(stream), recipe.grad_accum)]

    @torch.no_grad()
    def evaluate(step: int) -> dict[str, float]:
        policy.eval()
        result: dict[str, float] = {}
        if eval_set is not None:
            result = sum_over_batches(eval_set, recipe.eval_batch_size, batch_of, pair_metrics)
        result |= task_accuracy(policy, tokenizer, data_lib.eval_task_path(cfg.data), task_rows, recipe.eval_max_new_tokens, recipe.eval_batch_size)
        logger.note(f"step {step}: " + "  ".join(f"{k}={v:.4f}" for k, v in result.items() if k in SHOWN_EVAL))
        return result

    return session.train(evaluate, next_step, pair_metrics, shown=("loss", "rewards/accuracies", "rewards/margins", "logps/chosen"))


SHOWN_EVAL = ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_exact_match")


STAGE = Stage("dpo", run, held_models, data_format="preference", planned_batch=planned_batch, sequences_per_row=2, max_length_multiple=2)
