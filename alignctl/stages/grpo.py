"""GRPO: group-relative policy optimisation, online RL without a value model.

Trains: a causal LM (full weights, or a LoRA adapter).
Needs: prompt rows (standard or conversational) plus whatever columns the reward functions read
(the built-in task's ``rl`` split: prompt/answer). Rewards: ``recipe.reward_funcs`` and/or a reward
model (``inputs.reward=<reward run dir>``), combined with weights.
Starts from: ``inputs.policy=<SFT run dir>`` or ``model``.
Reference: only when ``recipe.beta`` > 0 (``recipe.reference``, see alignctl/train/reference.py).
Each rollout: P prompts x K completions sampled with a KV cache (alignctl/rl/rollout.py), scored,
advantages from the group of each prompt (``recipe.advantage``), then ``num_iterations`` passes
of ``steps_per_generation`` optimiser steps of the clipped surrogate + beta KL(k3) per token.
Writes: checkpoint/, metrics.jsonl (reward, reward_std, rewards/<fn>/mean, objective/kl,
objective/entropy, policy/clipfrac, completions/*, time/*), eval.json, lineage.json.
Evaluates: greedy completions of the eval prompts (eval_reward, and eval_exact_match on a built-in task).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from alignctl.config.schema import GRPOConfig, RunConfig
from alignctl.core import distributed
from alignctl.data.batching import BatchStream, column_lengths
from alignctl.models.adapters import apply_adapter, parameter_counts
from alignctl.nn.logprobs import response_token_logps
from alignctl.nn.losses import aggregate, group_advantages, kl_penalty, overlong_penalty, policy_surrogate
from alignctl.rl.dynamic_sampling import fill_with_informative_groups
from alignctl.rl.multi_turn import longest_turns
from alignctl.rl.online_rl import (
    ScoredRollout,
    StepQueue,
    completion_count,
    completion_tokens,
    environment_spec,
    greedy_evaluator,
    held_policy,
    held_reward_model,
    load_prompts,
    packed_training,
    planned_batch,
    reward_sources,
    rollout_correction_terms,
    rollout_metric_shares,
    rollout_metrics,
    sample_and_score,
    with_sampler_logps,
)
from alignctl.rl.reward_sources import RewardState
from alignctl.rl.rollout import Sampling, per_token_values, policy_mask
from alignctl.rl.rollout_log import RolloutLog
from alignctl.train.reference import held_reference, load_policy_and_reference, reference_for, reference_logps
from alignctl.train.session import (
    start_process,
    start_training,
)
from alignctl.train.stage_spec import HeldModel, Stage


def held_models(cfg: RunConfig) -> list[HeldModel]:
    return [held_policy(cfg), *held_reference(cfg), *held_reward_model(cfg)]


def run(cfg: RunConfig, raw: DictConfig, run_dir: Path) -> dict[str, float]:
    recipe: GRPOConfig = cfg.recipe
    device = start_process(cfg)
    # beta = 0: no KL term, so no reference model is loaded at all, whatever recipe.reference says.
    mode = reference_for(cfg)  # none with beta = 0: no KL term, so no reference model is loaded at all

    K = recipe.num_generations
    completions_per_rollout = recipe.batch_size * recipe.grad_accum * recipe.steps_per_generation
    environment = environment_spec(recipe)  # checked before any model loads
    prompts = load_prompts(cfg, recipe, completions_per_rollout // K, environment)
    train_set, eval_rows, path, tokenizer = prompts.train, prompts.eval_rows, prompts.policy_path, prompts.tokenizer
    sources, _ = reward_sources(cfg, recipe, tokenizer, device)

    policy, reference, _ = load_policy_and_reference(cfg, mode, tokenizer, path, run_dir)
    policy = apply_adapter(policy, cfg.adapter)
    packed = packed_training(recipe.padding_free, policy)
    trainable, total = parameter_counts(policy)
    stream = BatchStream(column_lengths(train_set, "prompt_ids").tolist(), completions_per_rollout // K, cfg.seed, group_by_length=False, **distributed.current().shard)
    session = start_training(policy, tokenizer, stream, cfg, raw, run_dir, "grpo", prompts.raw._fingerprint)
    logger = session.logger
    logger.note(
        f"grpo: {len(train_set)} prompts, {completions_per_rollout // K} prompts x {K} completions per rollout, "
        f"{recipe.advantage.value} advantages, beta {recipe.beta} (reference {mode.value}), rewards "
        + ", ".join(f"{s.name} x{s.weight:g}" for s in sources)
        + ("; padding-free batches" if packed else "; padded rows")
        + f"; {trainable:,} of {total:,} parameters train ({100 * trainable / total:.2f}%)"
    )
    sampling = Sampling(recipe.temperature, recipe.top_p, recipe.top_k, recipe.max_new_tokens, recipe.rollout_engine.value, recipe.max_length)
    rollout_log = RolloutLog(logger, run_dir, cfg.logger.samples_every, recipe.steps_per_generation * recipe.num_iterations)
    # Token-level aggregation is a mean over the step's completion tokens, sequence-level over its completions.
    items = completion_tokens if recipe.loss_aggregation.value == "token" else completion_count
    queue = StepQueue(recipe, recipe.num_iterations, cfg.seed, device, tokenizer.pad_token_id, items)

    def token_logps(model: torch.nn.Module, batch: dict) -> torch.Tensor:
        return response_token_logps(model, batch, recipe.temperature, chunk=recipe.lm_head_chunk, padding_free=packed)[0]

    def draw(state: RewardState) -> ScoredRollout:
        rollout = sample_and_score(policy, tokenizer, train_set[next(stream)], K, sampling, sources, state, environment)
        if recipe.overlong_buffer:  # DAPO: completions near max_new_tokens lose reward smoothly, logged as a source
            # max_new_tokens bounds each model turn: a multi-turn episode is as long as its longest turn here.
            lengths = longest_turns(rollout.completions)
            rollout.per_source["overlong_penalty"] = overlong_penalty(lengths, recipe.max_new_tokens, recipe.overlong_buffer)
            rollout.rewards = rollout.rewards + rollout.per_source["overlong_penalty"]
        return rollout

    def new_rollout() -> None:
        state = queue.start_rollout()
        rollout, sampling_stats = draw(state), {}
        if recipe.dynamic_sampling:
            rollout, sampling_stats = fill_with_informative_groups(rollout, lambda: draw(state), K, recipe.max_draws)
        per_token, per_sequence = with_sampler_logps({}, rollout.completions), {"advantages": group_advantages(rollout.rewards, K, recipe.advantage.value)}
        started = time.perf_counter()
        if recipe.num_iterations > 1:  # with one pass the current log-probs are the sampling ones
            policy.eval()
            per_token["old_logps"] = per_token_values(lambda b: token_logps(policy, b), rollout.completions, tokenizer.pad_token_id, device, recipe.batch_size)
        if recipe.beta > 0:
            per_token["ref_logps"] = per_token_values(lambda b: reference_logps(mode, policy, reference, b, token_logps), rollout.completions,
                                                      tokenizer.pad_token_id, device, recipe.batch_size)
        rollout.times["time/reference"] = time.perf_counter() - started
        stats = rollout_metrics(rollout.rewards, rollout.per_source, rollout.completions, K) | sampling_stats
        queue.add(rollout, per_token, per_sequence, stats)
        rollout_log.after(queue.rollouts, rollout, rollout.rewards)

    def step_fn(batch: dict, num_items: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logps, mask, entropy = response_token_logps(policy, batch, recipe.temperature, with_entropy=True, chunk=recipe.lm_head_chunk,
                                                    entropy_grad=recipe.entropy_coef > 0, padding_free=packed)
        mask = policy_mask(batch, mask)  # an environment's tokens: no loss, no KL
        old = batch["old_logps"] if "old_logps" in batch else logps.detach()
        surrogate = policy_surrogate(recipe.policy_loss.value, logps, old, mask, batch["advantages"], recipe.epsilon, recipe.epsilon_high)
        level = recipe.loss_aggregation.value
        # The sampler is not the trainer: the mismatch is logged, and recipe.rollout_is reweights the policy gradient.
        weights, correction = rollout_correction_terms(recipe, batch, old, mask, level, num_items)
        per_token = surrogate.loss if weights is None else surrogate.loss * weights
        if recipe.entropy_coef > 0:  # only then does backward go through the entropy
            per_token = per_token - recipe.entropy_coef * entropy

        def mean(values: torch.Tensor) -> torch.Tensor:
            return aggregate(values.float(), mask, level, num_items)

        metrics = {"objective/entropy": mean(entropy.detach()), "policy/clipfrac": mean(surrogate.clipped_low | surrogate.clipped_high),
                   "clip_ratio/low_mean": mean(surrogate.clipped_low), "clip_ratio/high_mean": mean(surrogate.clipped_high),
                   "policy/importance_weight": mean(surrogate.weight)}
        if recipe.beta > 0:
            kl = kl_penalty(logps, batch["ref_logps"], "k3")
            per_token = per_token + recipe.beta * kl
            metrics["objective/kl"] = aggregate(kl.detach(), mask, level, num_items)
        metrics |= correction | rollout_metric_shares(batch)
        return aggregate(per_token, mask, level, num_items), metrics

    evaluate = greedy_evaluator(policy, tokenizer, sources, eval_rows, cfg, recipe, logger, environment)
    # A checkpoint keeps the steps left from the current rollout, so a resumed run trains on the same samples.
    return session.train(evaluate, lambda: queue.next(new_rollout), step_fn, shown=("loss", "reward", "objective/kl", "completions/mean_length"),
                         extra_state=queue.state, restore_extra=queue.restore)


STAGE = Stage("grpo", run, held_models, data_format="prompt", planned_batch=planned_batch)
