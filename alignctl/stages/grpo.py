"""GRPO: group-relative policy optimisation, online RL without a value model.

Trains: a causal LM (full weights, or a LoRA adapter).
Needs: prompt rows (standard or conversational) plus whatever columns the reward functions read
(the built-in task's ``rl`` split: prompt/answer). Rewards: ``recipe.reward_funcs`` and/or a reward
model (``inputs.reward=<reward run dir>``), combined with weights.
Starts from: ``inputs.policy=<SFT run dir>`` or ``model``.
Reference: only when ``recipe.beta`` > 0 (``recipe.reference``, see alignctl/reference.py).
Each rollout: P prompts x K completions sampled with a KV cache (alignctl/rollout.py), scored,
advantages from the group of each prompt (``recipe.advantage``), then ``num_iterations`` passes
of ``steps_per_generation`` optimiser steps of the clipped surrogate + beta KL(k3) per token.
Writes: checkpoint/, metrics.jsonl (reward, reward_std, rewards/<fn>/mean, objective/kl,
objective/entropy, policy/clipfrac, completions/*, time/*), eval.json, lineage.json.
Evaluates: greedy completions of the eval prompts (eval_reward, and eval_exact_match on a built-in task).
"""

from __future__ import annotations

import time
from collections import deque
from pathlib import Path

import torch
from omegaconf import DictConfig

from alignctl import distributed
from alignctl.adapters import apply_adapter, parameter_counts
from alignctl.batching import BatchStream
from alignctl.config import GRPOConfig, Reference, RunConfig
from alignctl.losses import aggregate, clipped_surrogate, group_advantages, kl_penalty
from alignctl.online_rl import (
    RolloutLog,
    completion_count,
    completion_tokens,
    greedy_evaluator,
    load_prompts,
    queue_steps,
    reward_sources,
    rollout_metric_shares,
    rollout_metrics,
    sample_and_score,
)
from alignctl.ops import response_token_logps
from alignctl.reference import load_policy_and_reference, reference_logps, resolve_mode
from alignctl.registry import register_stage
from alignctl.resume import to_device
from alignctl.rewards import RewardState
from alignctl.rollout import Sampling, per_token_values
from alignctl.training import (
    start_process,
    start_training,
    train_and_finish,
)


@register_stage("grpo")
def run(cfg: RunConfig, raw: DictConfig, run_dir: Path) -> dict[str, float]:
    recipe: GRPOConfig = cfg.recipe
    device = start_process(cfg)
    # beta = 0: no KL term, so no reference model is loaded at all, whatever recipe.reference says.
    mode = Reference.none if recipe.beta == 0 else resolve_mode(recipe.reference, cfg.adapter.kind, False, bool(cfg.inputs.get("reference")))

    K = recipe.num_generations
    completions_per_rollout = recipe.batch_size * recipe.grad_accum * recipe.steps_per_generation
    prompts = load_prompts(cfg, recipe, completions_per_rollout // K)
    train_set, eval_rows, path, tokenizer = prompts.train, prompts.eval_rows, prompts.policy_path, prompts.tokenizer
    sources, _ = reward_sources(cfg, recipe, tokenizer, device)

    policy, reference, _ = load_policy_and_reference(cfg, mode, tokenizer, path, run_dir)
    policy = apply_adapter(policy, cfg.adapter)
    trainable, total = parameter_counts(policy)
    stream = BatchStream([len(ids) for ids in train_set["prompt_ids"]], completions_per_rollout // K, cfg.seed, group_by_length=False, **distributed.current().shard)
    optimizer, scheduler, run, logger = start_training(policy, recipe, cfg, raw, run_dir, "grpo", prompts.raw._fingerprint)
    logger.note(
        f"grpo: {len(train_set)} prompts, {completions_per_rollout // K} prompts x {K} completions per rollout, "
        f"{recipe.advantage.value} advantages, beta {recipe.beta} (reference {mode.value}), rewards "
        + ", ".join(f"{s.name} x{s.weight:g}" for s in sources)
        + f"; {trainable:,} of {total:,} parameters train ({100 * trainable / total:.2f}%)"
    )
    sampling = Sampling(recipe.temperature, recipe.top_p, recipe.top_k, recipe.max_new_tokens, recipe.rollout_engine.value, recipe.max_length)
    rollout_log = RolloutLog(logger, run_dir, cfg.logger.samples_every, recipe.steps_per_generation * recipe.num_iterations)
    pending: deque[list[dict]] = deque()  # the optimiser steps left from the current rollout
    rollouts = 0

    def token_logps(model: torch.nn.Module, batch: dict) -> torch.Tensor:
        return response_token_logps(model, batch, recipe.temperature, chunk=recipe.lm_head_chunk)[0]

    def new_rollout() -> None:
        nonlocal rollouts
        rollouts += 1
        # Each rollout feeds steps_per_generation x num_iterations steps: the optimiser steps already taken.
        state = RewardState((rollouts - 1) * recipe.steps_per_generation * recipe.num_iterations, recipe.max_steps)
        rollout = sample_and_score(policy, tokenizer, train_set[next(stream)], K, sampling, sources, state)
        per_token, per_sequence = {}, {"advantages": group_advantages(rollout.rewards, K, recipe.advantage.value)}
        started = time.perf_counter()
        if recipe.num_iterations > 1:  # with one pass the current log-probs are the sampling ones
            policy.eval()
            per_token["old_logps"] = per_token_values(lambda b: token_logps(policy, b), rollout.completions, tokenizer.pad_token_id, device, recipe.batch_size)
        if recipe.beta > 0:
            per_token["ref_logps"] = per_token_values(lambda b: reference_logps(mode, policy, reference, b, token_logps), rollout.completions,
                                                      tokenizer.pad_token_id, device, recipe.batch_size)
        rollout.times["time/reference"] = time.perf_counter() - started
        stats = rollout_metrics(rollout.rewards, rollout.per_source, rollout.completions, K)
        # Token-level aggregation is a mean over the step's completion tokens, sequence-level over its completions.
        items = completion_tokens if recipe.loss_aggregation.value == "token" else completion_count
        queue_steps(pending, rollout, rollouts, cfg.seed, recipe, recipe.num_iterations, per_token, per_sequence, stats, device, tokenizer.pad_token_id, items)
        rollout_log.after(rollouts, rollout, rollout.rewards)

    def next_step() -> list[dict]:
        if not pending:
            new_rollout()
        return pending.popleft()

    def step_fn(batch: dict, num_items: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logps, mask, entropy = response_token_logps(policy, batch, recipe.temperature, with_entropy=True, chunk=recipe.lm_head_chunk)
        old = batch["old_logps"] if "old_logps" in batch else logps.detach()
        per_token, clipped = clipped_surrogate(logps, old, batch["advantages"], recipe.epsilon, recipe.epsilon_high)
        level = recipe.loss_aggregation.value
        metrics = {"objective/entropy": aggregate(entropy, mask, level, num_items), "policy/clipfrac": aggregate(clipped.float(), mask, level, num_items)}
        if recipe.beta > 0:
            kl = kl_penalty(logps, batch["ref_logps"], "k3")
            per_token = per_token + recipe.beta * kl
            metrics["objective/kl"] = aggregate(kl.detach(), mask, level, num_items)
        metrics |= rollout_metric_shares(batch)
        return aggregate(per_token, mask, level, num_items), metrics

    def restore_rollouts(state: dict) -> None:
        nonlocal rollouts
        rollouts = state["rollouts"]
        pending.extend(to_device(state["pending"], device))

    evaluate = greedy_evaluator(policy, tokenizer, sources, eval_rows, cfg, recipe, logger)
    # A checkpoint keeps the steps left from the current rollout, so a resumed run trains on the same samples.
    return train_and_finish(run, recipe, policy, tokenizer, optimizer, scheduler, logger, stream, evaluate, next_step, step_fn,
                            cfg.hardware, shown=("loss", "reward", "objective/kl", "completions/mean_length"),
                            extra_state=lambda: {"rollouts": rollouts, "pending": list(pending)}, restore_extra=restore_rollouts)
