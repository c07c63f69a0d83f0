"""KTO: align from unpaired binary feedback (a completion is good or bad), no pairs needed.

Trains: a causal LM (full weights or a LoRA adapter) with the KTO loss (alignctl.nn.losses.kto_loss).
Needs: prompt/completion/label rows (label true = desirable), standard or conversational.
Starts from: ``inputs.policy=<SFT run dir>`` or ``model``. Reference: ``recipe.reference`` (auto,
separate, adapter_disabled, precomputed), the starting policy.
KL reference point: each row's prompt is also scored with the completion of the next row in the
dataset (a fixed mismatched pair, so it can be precomputed); the batch mean of
log pi - log pi_ref over those pairs, clamped at 0 and without gradient, is z in the loss.
Writes: checkpoint/, metrics.jsonl (TRL's KTO names: rewards/chosen_sum, count/chosen, kl, ...),
eval.json, lineage.json. Evaluates: mean rewards of desirable and undesirable eval rows, their
margin and, on a built-in task, greedy exact-match accuracy.
"""

from __future__ import annotations

from pathlib import Path

import torch
from datasets import Dataset
from omegaconf import DictConfig

from alignctl.config.schema import KTOConfig, Reference, RunConfig
from alignctl.core import distributed
from alignctl.data import loading as data_lib
from alignctl.data.batching import BatchStream, column_lengths, split_micro
from alignctl.data.encode import (
    encode_completion,
    encode_prompt,
    encode_rows,
    fit_completion,
    fit_prompt,
    sampled_part,
)
from alignctl.models.adapters import apply_adapter, parameter_counts
from alignctl.models.loading import load_tokenizer, model_path
from alignctl.nn.logprobs import left_padded_batch, response_logps
from alignctl.nn.losses import kto_loss
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
from alignctl.train.stage_spec import BatchShape, HeldModel, PlanData, Stage, longest


def encode_feedback(dataset: Dataset, tokenizer, recipe: KTOConfig, cfg: RunConfig, where: str) -> Dataset:
    def encode(row: dict, index: int) -> dict | None:
        prompt_ids = fit_prompt(encode_prompt(tokenizer, row["prompt"]), recipe.max_length, cfg.data.overlong.value, f"{where}: row {index}")
        if prompt_ids is None:
            return None
        completion = sampled_part(tokenizer, encode_completion(tokenizer, row["prompt"], row["completion"]))
        completion_ids = fit_completion(tokenizer, completion, recipe.max_length - len(prompt_ids))
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "label": bool(row["label"])}

    empty = {"prompt_ids": [], "completion_ids": [], "label": False}
    kept = encode_rows(dataset, encode, empty, cfg.data.num_proc, where, recipe.max_length, minimum=2)  # a mismatched pair needs two rows
    # The mismatched completion of row i is row i+1's: prompt and completion are unrelated, which is
    # what the KL reference point needs.
    shifted = kept["completion_ids"][1:] + kept["completion_ids"][:1]
    return kept.add_column("mismatched_ids", shifted)


SEQUENCE_KEYS = ("input_ids", "attention_mask", "position_ids", "response_mask")
MISMATCHED = "mismatched_"  # key prefix of the mismatched half of a batch


def feedback_batch(rows: dict[str, list], pad_id: int, device: torch.device) -> dict:
    """Rows with their own completions, and under ``mismatched_*`` the same prompts with mismatched
    completions, each half padded to its own longest row.

    Two halves rather than one batch of 2B rows: the rows a step trains on are grouped by length, the
    mismatched ones are not, and padding the trained half to the mismatched half's width made the
    forward and backward that carry the gradient about a quarter padding on the benchmark."""
    own = left_padded_batch(rows["prompt_ids"], rows["completion_ids"], pad_id)
    mismatched = left_padded_batch(rows["prompt_ids"], rows["mismatched_ids"], pad_id)
    out = {k: v.to(device) for k, v in own.items()} | {MISMATCHED + k: v.to(device) for k, v in mismatched.items()}
    if "ref_logps" in rows:
        out["ref_logps"] = torch.tensor(rows["ref_logps"], device=device).T.reshape(-1)
    out["desirable"] = torch.tensor(rows["label"], dtype=torch.bool, device=device)
    return {**out, "num_items": len(rows["prompt_ids"]), "num_tokens": int(own["attention_mask"].sum())}


def halves(batch: dict) -> tuple[dict, dict]:
    """The own and the mismatched rows of a `feedback_batch`, each a plain response batch."""
    return {k: batch[k] for k in SEQUENCE_KEYS}, {k: batch[MISMATCHED + k] for k in SEQUENCE_KEYS}


def held_models(cfg: RunConfig) -> list[HeldModel]:
    return [HeldModel("policy (trained)", model_path(cfg.model, cfg.inputs.get("policy")), trained=True), *held_reference(cfg)]


def feedback_lengths(cfg: RunConfig, data: PlanData) -> tuple[list[int], int]:
    """(every sequence's length, the longest completion) of the encoded training split."""
    encoded = encode_feedback(data.raw, data.tokenizer, cfg.recipe, cfg, data.where)
    return [len(p) + len(c) for p, c in zip(encoded["prompt_ids"], encoded["completion_ids"])], max(len(c) for c in encoded["completion_ids"])


def planned_batch(cfg: RunConfig, data: PlanData, rows: int) -> BatchShape:
    lengths, completion = data.once("kto: sequence lengths, longest completion", lambda: feedback_lengths(cfg, data))
    # The trained half (the mismatched half runs without gradient): whole sequences left-padded.
    widest = longest(lengths, rows)
    return BatchShape(len(widest), widest[0], len(widest) * completion, data.source)


def run(cfg: RunConfig, raw: DictConfig, run_dir: Path) -> dict[str, float]:
    recipe: KTOConfig = cfg.recipe
    device = start_process(cfg)
    mode = reference_for(cfg)

    train_raw = data_lib.load_split(cfg.data, "feedback", cfg.data.train_split)
    eval_raw = data_lib.load_eval_split(cfg.data, "feedback")
    task_rows = data_lib.task_eval_rows(cfg.data)
    path = model_path(cfg.model, cfg.inputs.get("policy"))
    tokenizer = load_tokenizer(path, cfg.model)
    train_set = encode_feedback(train_raw, tokenizer, recipe, cfg, f"{cfg.data.path} [{cfg.data.train_split}]")
    eval_set = encode_feedback(eval_raw, tokenizer, recipe, cfg, f"{cfg.data.path} [{cfg.data.eval_split}]") if eval_raw else None

    policy, reference, reference_path = load_policy_and_reference(cfg, mode, tokenizer, path, run_dir)

    def logps(model: torch.nn.Module, batch: dict) -> torch.Tensor:
        return response_logps(model, batch, recipe.lm_head_chunk)[0]

    def both_logps(model: torch.nn.Module, batch: dict) -> torch.Tensor:
        """(2B,): the own completions' log-probs, then the mismatched ones' (the reference scores both)."""
        return torch.cat([logps(model, half) for half in halves(batch)])

    def with_reference(dataset: Dataset, split: str) -> Dataset:
        key = cache_key(stage="kto", model=model_identity(reference_path), data=dataset._fingerprint, split=split, max_length=recipe.max_length)
        return precompute(dataset, reference, lambda rows: feedback_batch(rows, tokenizer.pad_token_id, device), both_logps,
                          recipe.eval_batch_size, key, split)

    if mode == Reference.precomputed:
        train_set = with_reference(train_set, "train")
        eval_set = with_reference(eval_set, "eval") if eval_set is not None else None
        reference = None  # freed: training holds one model

    policy = apply_adapter(policy, cfg.adapter)
    trainable, total = parameter_counts(policy)
    stream = BatchStream((column_lengths(train_set, "prompt_ids") + column_lengths(train_set, "completion_ids")).tolist(),
                         recipe.batch_size * recipe.grad_accum, cfg.seed, **distributed.current().shard)
    session = start_training(policy, tokenizer, stream, cfg, raw, run_dir, "kto", train_raw._fingerprint)
    logger = session.logger
    desirable_share = sum(train_set["label"]) / len(train_set)
    logger.note(f"kto: {len(train_set)} rows ({100 * desirable_share:.0f}% desirable), beta {recipe.beta}, reference {mode.value}, "
                f"{trainable:,} of {total:,} parameters train ({100 * trainable / total:.2f}%)")

    def feedback_loss(batch: dict, num_items: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        rows = batch["num_items"]
        own, mismatched = halves(batch)
        # The forwards without gradient first, so that they run before the policy's activations are held.
        ref = reference_logps(mode, policy, reference, batch, both_logps)
        with torch.no_grad():
            kl = (logps(policy, mismatched) - ref[rows:]).mean()
        policy_logps = logps(policy, own)
        desirable = batch["desirable"]
        losses, out = kto_loss(policy_logps, ref[:rows], desirable, kl, recipe.beta, recipe.desirable_weight, recipe.undesirable_weight)
        rewards, good, bad = out["rewards"], desirable.float(), (~desirable).float()
        # Sums and counts, as TRL logs them: means per class are sum / count over a whole step.
        return losses.sum() / num_items, {
            "kl": out["kl"] * rows / num_items,  # the reference point the loss used: the estimate clamped at 0
            "rewards/chosen_sum": (rewards * good).sum(),
            "rewards/rejected_sum": (rewards * bad).sum(),
            "logps/chosen_sum": (policy_logps.detach() * good).sum(),
            "logps/rejected_sum": (policy_logps.detach() * bad).sum(),
            "count/chosen": good.sum(),
            "count/rejected": bad.sum(),
        }

    def next_step() -> list[dict]:
        return [feedback_batch(train_set[rows], tokenizer.pad_token_id, device) for rows in split_micro(next(stream), recipe.grad_accum)]

    @torch.no_grad()
    def evaluate(step: int) -> dict[str, float]:
        policy.eval()
        result: dict[str, float] = {}
        if eval_set is not None:
            totals = sum_over_batches(eval_set, recipe.eval_batch_size, lambda rows: feedback_batch(rows, tokenizer.pad_token_id, device),
                                      feedback_loss, prefix="")
            chosen = totals["rewards/chosen_sum"] / max(totals["count/chosen"], 1)
            rejected = totals["rewards/rejected_sum"] / max(totals["count/rejected"], 1)
            result = {"eval_loss": totals["loss"], "eval_kl": totals["kl"], "eval_rewards/chosen": chosen,
                      "eval_rewards/rejected": rejected, "eval_rewards/margins": chosen - rejected}
        result |= task_accuracy(policy, tokenizer, data_lib.eval_task_path(cfg.data), task_rows, recipe.eval_max_new_tokens, recipe.eval_batch_size)
        logger.note(f"step {step}: " + "  ".join(f"{k}={v:.4f}" for k, v in result.items()))
        return result

    return session.train(evaluate, next_step, feedback_loss, shown=("loss", "kl"))


STAGE = Stage("kto", run, held_models, data_format="feedback", planned_batch=planned_batch)
