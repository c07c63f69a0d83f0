"""Distill: on-policy distillation (GKD, Agarwal et al. 2024), a student pulled toward a teacher on
the student's own samples.

Trains: a causal LM, the student (full weights, or a LoRA adapter).
Needs: prompt rows (the built-in task's ``rl`` split) and a teacher, ``inputs.teacher=<run dir or
model>`` with the student's tokenizer (same vocabulary and special tokens, checked before training).
Starts from: ``inputs.policy=<SFT run dir>`` or ``model``.
Reference: none (``recipe.beta`` must be 0); the teacher is frozen, in eval mode, without gradients,
loaded at the run's precision as a separate reference copy would be (alignctl/train/reference.py).
Each rollout: P prompts x ``num_generations`` completions sampled from the student with the rollout
engine at ``recipe.temperature`` (alignctl/rl/rollout.py), then ``steps_per_generation`` optimiser
steps; each micro-batch runs the student and the teacher once on prompt + completion, and the loss is
the generalized JSD (``recipe.beta_jsd``: 1 reverse KL, the default; 0 forward KL) over the
completion tokens only (alignctl/nn/distill_loss.py).
Output layer: with recipe.lm_head_chunk > 0, applied to the completion positions a chunk at a time (nn/distill_loss.chunked_jsd_sum).
Writes: checkpoint/, metrics.jsonl (distill/divergence, distill/teacher_agreement, the rollouts'
reward and completions/* when reward functions are set), eval.json, lineage.json.
Evaluates: greedy completions of the eval prompts (eval_reward, and eval_exact_match on a built-in task).
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from alignctl.config.schema import DistillConfig, Reference, RunConfig
from alignctl.core import distributed
from alignctl.core.errors import ConfigError
from alignctl.data.batching import BatchStream, column_lengths
from alignctl.models.adapters import apply_adapter, parameter_counts
from alignctl.models.loading import load_causal_lm, load_tokenizer, model_path
from alignctl.nn.distill_loss import chunked_jsd_sum, distill_loss
from alignctl.nn.lm_head import final_hidden, keep_last, output_head
from alignctl.rl.online_rl import (
    StepQueue,
    completion_tokens,
    greedy_evaluator,
    held_policy,
    load_prompts,
    planned_batch,
    reward_sources,
    rollout_metric_shares,
    rollout_metrics,
    sample_and_score,
)
from alignctl.rl.reward_sources import RewardState
from alignctl.rl.rollout import Sampling
from alignctl.rl.rollout_log import RolloutLog
from alignctl.train.reference import load_policy_and_reference
from alignctl.train.session import start_process, start_training
from alignctl.train.stage_spec import HeldModel, Stage


def teacher_path(cfg: RunConfig) -> str:
    """inputs.teacher's checkpoint (a run dir) or model (a local dir or hub id)."""
    if not cfg.inputs.get("teacher"):
        raise ConfigError("inputs.teacher", "recipe=distill needs a teacher: inputs.teacher=<run dir or model> with the student's tokenizer")
    return model_path(cfg.model, cfg.inputs["teacher"])


def held_models(cfg: RunConfig) -> list[HeldModel]:
    return [held_policy(cfg), HeldModel("teacher (frozen)", teacher_path(cfg), trained=False)]


def special_tokens(tokenizer) -> dict:
    return {name: getattr(tokenizer, name, None) for name in ("bos_token", "eos_token", "pad_token", "unk_token")}


def check_teacher_tokenizer(student, teacher, student_path: str, path: str) -> None:
    """The teacher scores the student's token ids: both must tokenise identically, special tokens included."""
    if student.get_vocab() != teacher.get_vocab() or special_tokens(student) != special_tokens(teacher):
        raise ConfigError("inputs.teacher", f"{path} has a different tokenizer (vocabulary or special tokens) from the student {student_path}; "
                          "distillation needs a teacher of the same tokenizer")


def completion_logits(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, W, V) logits at the positions that predict each completion token, and the (B, W) completion mask."""
    mask = batch["response_mask"]
    width = int(mask.sum(-1).max())
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    # Logits at t score the token at t + 1: the last W + 1 positions but the last one.
    logits = model(**inputs, logits_to_keep=keep_last(inputs["input_ids"], width + 1), use_cache=False).logits[:, :-1]
    return logits, mask[:, -width:].to(torch.float32)


def chunked_divergence(student: torch.nn.Module, teacher: torch.nn.Module, batch: dict, recipe: DistillConfig, num_items: int) -> tuple | None:
    """The loss from the two models' hidden states at the completion tokens only, the output layers applied
    recipe.lm_head_chunk positions at a time (alignctl/nn/lm_head.py); None where a head cannot be fused."""
    heads = output_head(student), output_head(teacher)
    if not recipe.lm_head_chunk or None in heads:
        return None
    mask = batch["response_mask"]
    width = int(mask.sum(-1).max())
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    where = mask[:, -width:].bool()
    # Hidden states at t predict the token at t + 1: the W positions before the last one.
    hidden = final_hidden(student, **inputs)[:, -width - 1 : -1][where]
    with torch.no_grad():
        teacher_hidden = final_hidden(teacher, **inputs)[:, -width - 1 : -1][where]
    total, agree = chunked_jsd_sum(hidden, heads[0].weight, teacher_hidden, heads[1].weight, recipe.beta_jsd, recipe.temperature, recipe.lm_head_chunk)
    loss = total / num_items
    return loss, {"distill/divergence": loss.detach(), "distill/teacher_agreement": agree / num_items}


def run(cfg: RunConfig, raw: DictConfig, run_dir: Path) -> dict[str, float]:
    recipe: DistillConfig = cfg.recipe
    device = start_process(cfg)
    K = recipe.num_generations
    completions_per_rollout = recipe.batch_size * recipe.grad_accum * recipe.steps_per_generation
    prompts = load_prompts(cfg, recipe, completions_per_rollout // K)
    train_set, eval_rows, path, tokenizer = prompts.train, prompts.eval_rows, prompts.policy_path, prompts.tokenizer
    # The teacher's tokenizer is checked before any weights load, so a mismatch costs nothing.
    teacher_dir = teacher_path(cfg)
    check_teacher_tokenizer(tokenizer, load_tokenizer(teacher_dir, cfg.model), path, teacher_dir)
    sources, _ = reward_sources(cfg, recipe, tokenizer, device)

    student, _, _ = load_policy_and_reference(cfg, Reference.none, tokenizer, path, run_dir)
    teacher = load_causal_lm(teacher_dir, cfg.model, cfg.hardware).to(device).eval().requires_grad_(False)
    student = apply_adapter(student, cfg.adapter)
    trainable, total = parameter_counts(student)
    stream = BatchStream(column_lengths(train_set, "prompt_ids").tolist(), completions_per_rollout // K, cfg.seed, group_by_length=False,
                         **distributed.current().shard)
    session = start_training(student, tokenizer, stream, cfg, raw, run_dir, "distill", prompts.raw._fingerprint)
    logger = session.logger
    divergence = {0.0: "forward KL(teacher||student)", 1.0: "reverse KL(student||teacher)"}.get(recipe.beta_jsd, f"generalized JSD (beta {recipe.beta_jsd})")
    logger.note(f"distill: {len(train_set)} prompts, {completions_per_rollout // K} prompts x {K} student samples per rollout, "
                f"{divergence} to the teacher {teacher_dir} at temperature {recipe.temperature}; "
                f"{trainable:,} of {total:,} parameters train ({100 * trainable / total:.2f}%)")
    sampling = Sampling(recipe.temperature, recipe.top_p, recipe.top_k, recipe.max_new_tokens, recipe.rollout_engine.value, recipe.max_length)
    rollout_log = RolloutLog(logger, run_dir, cfg.logger.samples_every, recipe.steps_per_generation)
    # The loss is a mean over the step's completion tokens.
    queue = StepQueue(recipe, 1, cfg.seed, device, tokenizer.pad_token_id, completion_tokens)

    def new_rollout() -> None:
        state: RewardState = queue.start_rollout()
        rollout = sample_and_score(student, tokenizer, train_set[next(stream)], K, sampling, sources, state)
        queue.add(rollout, {}, {}, rollout_metrics(rollout.rewards, rollout.per_source, rollout.completions, K))
        rollout_log.after(queue.rollouts, rollout, rollout.rewards)

    def step_fn(batch: dict, num_items: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        chunked = chunked_divergence(student, teacher, batch, recipe, num_items)
        if chunked is not None:
            return chunked[0], chunked[1] | rollout_metric_shares(batch)
        logits, mask = completion_logits(student, batch)
        with torch.no_grad():
            teacher_logits, _ = completion_logits(teacher, batch)
        loss, metrics = distill_loss(logits, teacher_logits, mask, recipe.beta_jsd, recipe.temperature, num_items)
        return loss, metrics | rollout_metric_shares(batch)

    evaluate = greedy_evaluator(student, tokenizer, sources, eval_rows, cfg, recipe, logger)
    # A checkpoint keeps the steps left from the current rollout, so a resumed run trains on the same samples.
    return session.train(evaluate, lambda: queue.next(new_rollout), step_fn, shown=("loss", "distill/teacher_agreement", "reward"),
                         extra_state=queue.state, restore_extra=queue.restore)


STAGE = Stage("distill", run, held_models, data_format="prompt", planned_batch=planned_batch)
