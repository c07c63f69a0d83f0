"""PPO: the RLHF third step, a policy and a value model optimised on sampled completions.

Trains: a causal LM policy and a scalar-head value model (full weights, or a LoRA adapter on each).
Needs: prompt rows (the built-in task's ``rl`` split) and a reward: a reward model
(``inputs.reward=<reward run dir>``) and/or ``recipe.reward_funcs``.
Starts from: ``inputs.policy=<SFT run dir>`` or ``model``; the value model from ``inputs.init``,
else the reward model (as InstructGPT does), else the policy's backbone with a fresh head.
Reference: the starting policy (``recipe.reference``), loaded only when ``recipe.beta`` > 0.
Each rollout: one completion per prompt, scored once at its end; per-token rewards
-beta (log pi - log pi_ref) plus the score on the last token (adaptive beta with ``recipe.kl_target``);
GAE advantages (whitened) and returns from the value model; then ``num_ppo_epochs`` passes of
``steps_per_generation`` optimiser steps of the clipped surrogate + vf_coef x clipped value loss.
Writes: checkpoint/ (the policy, a plain causal LM; the value model in checkpoint/value_model/),
metrics.jsonl (TRL's objective/*, policy/*, loss/*, val/* names), eval.json, lineage.json.
Evaluates: greedy completions of the eval prompts (eval_reward, and eval_exact_match on a built-in task).
Adapters: with LoRA and a value model that starts from the policy, the value model is a second
adapter on the policy's frozen base plus a scalar head (adapters.SharedBaseValue); a value model
from a reward model is another network and gets its own adapter.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from alignctl.config.schema import PPOConfig, Reference, RunConfig
from alignctl.core import distributed
from alignctl.data.batching import BatchStream, column_lengths
from alignctl.models.adapters import SharedBaseValue, apply_adapter, parameter_counts
from alignctl.models.loading import base_dir_of, load_reward_model, model_path
from alignctl.nn.logprobs import response_token_logps, response_values
from alignctl.nn.losses import (
    aggregate,
    clipped_surrogate,
    clipped_value_loss,
    gae,
    masked_whiten,
    score_to_token_rewards,
)
from alignctl.rl.online_rl import (
    StepQueue,
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
from alignctl.rl.rollout import Sampling, per_token_values, policy_mask, right_aligned
from alignctl.rl.rollout_log import RolloutLog
from alignctl.train.checkpoint import load_weights
from alignctl.train.reference import held_reference, load_policy_and_reference, reference_for, reference_logps
from alignctl.train.session import (
    start_process,
    start_training,
)
from alignctl.train.stage_spec import HeldModel, Stage


class PolicyAndValue(torch.nn.Module):
    """Both trained models as one module, so the shared loop clips, steps and switches modes over both.
    It saves as the policy (a plain Hugging Face directory) with the value model in value_model/."""

    def __init__(self, policy: torch.nn.Module, value: torch.nn.Module):
        super().__init__()
        self.policy, self.value = policy, value

    def save_pretrained(self, directory: Path, state_dict: dict | None = None, **kwargs) -> None:
        """`state_dict`: both models' full state (gathered from FSDP shards), keyed policy.* and value.*."""
        parts: dict[str, dict] = {"policy": {}, "value": {}}
        for key, tensor in (state_dict or {}).items():
            owner, _, rest = key.partition(".")
            parts[owner][rest] = tensor
        given = (lambda part: {"state_dict": parts[part]}) if state_dict is not None else (lambda part: {})
        value_kwargs = dict(kwargs)
        if isinstance(self.value, SharedBaseValue):  # the policy's files hold its own adapter only
            kwargs = {**kwargs, "selected_adapters": ["default"]}
            value_kwargs |= {"policy_state": parts["policy"], "head_state": parts["value"]} if state_dict is not None else {}
        else:
            value_kwargs |= given("value")
        self.policy.save_pretrained(directory, **kwargs, **given("policy"))
        self.value.save_pretrained(Path(directory) / "value_model", **value_kwargs)

    def fsdp_roots(self) -> list[torch.nn.Module]:
        """The modules called on their own: each is a root for FSDP (alignctl/train/sharding.py)."""
        return [self.policy, *(self.value.fsdp_roots() if hasattr(self.value, "fsdp_roots") else [self.value])]

    def load_weights(self, directory: Path) -> None:
        """Resume: the policy from the checkpoint's root, the value model from value_model/."""
        load_weights(self.policy, directory)
        load_weights(self.value, Path(directory) / "value_model")


class AdaptiveKLController:
    """Ziegler et al. 2019, eq. 2: beta <- beta (1 + clip(KL / target - 1, -0.2, 0.2) n / horizon)."""

    def __init__(self, beta: float, target: float | None, horizon: int):
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, kl: float, completions: int) -> None:
        if self.target is not None:
            error = min(max(kl / self.target - 1, -0.2), 0.2)
            self.beta *= 1 + error * completions / self.horizon


def value_model_path(cfg: RunConfig, policy_path: str) -> str:
    """Where the value model starts: inputs.init, else the reward model (inputs.reward), else the policy."""
    if cfg.inputs.get("init"):
        return model_path(cfg.model, cfg.inputs["init"])
    return model_path(cfg.model, cfg.inputs["reward"]) if cfg.inputs.get("reward") else policy_path


def shares_the_policy_base(cfg: RunConfig, value_path: str, policy_path: str) -> bool:
    """With an adapter, a value model that would start from the policy itself is a second adapter on
    the policy's frozen base (adapters.SharedBaseValue): one base in memory."""
    return cfg.adapter.kind != "none" and value_path == policy_path


def held_models(cfg: RunConfig) -> list[HeldModel]:
    policy = held_policy(cfg)
    value_path = value_model_path(cfg, policy.path)
    shared = shares_the_policy_base(cfg, value_path, policy.path)
    value = HeldModel("value (adapter on the policy's base)" if shared else "value (trained)", value_path, trained=True, scalar_head=True,
                      shared_base=shared)
    return [policy, *held_reference(cfg), value, *held_reward_model(cfg)]


def run(cfg: RunConfig, raw: DictConfig, run_dir: Path) -> dict[str, float]:
    recipe: PPOConfig = cfg.recipe
    device = start_process(cfg)
    mode = reference_for(cfg)

    per_rollout = recipe.batch_size * recipe.grad_accum * recipe.steps_per_generation
    environment = environment_spec(recipe)  # checked before any model loads
    prompts = load_prompts(cfg, recipe, per_rollout, environment)
    train_set, eval_rows, path, tokenizer = prompts.train, prompts.eval_rows, prompts.policy_path, prompts.tokenizer
    sources, reward_path = reward_sources(cfg, recipe, tokenizer, device)

    policy, reference, _ = load_policy_and_reference(cfg, mode, tokenizer, path, run_dir)
    policy = apply_adapter(policy, cfg.adapter)
    packed = packed_training(recipe.padding_free, policy)
    value_path = value_model_path(cfg, path)
    if shares_the_policy_base(cfg, value_path, path):
        value = SharedBaseValue(policy)
        value_fn, value_from = value.values, "a second adapter on the policy's base"
    else:
        value = apply_adapter(load_reward_model(value_path, cfg.model, cfg.hardware, tokenizer.pad_token_id, cfg.adapter,
                                                      base_dir=base_dir_of(cfg, run_dir, "value_model")), cfg.adapter, "SEQ_CLS")
        value_fn, value_from = (lambda batch: response_values(value, batch)), value_path
    both = PolicyAndValue(policy, value)
    trainable, total = parameter_counts(both)
    stream = BatchStream(column_lengths(train_set, "prompt_ids").tolist(), per_rollout, cfg.seed, group_by_length=False, **distributed.current().shard)
    session = start_training(both, tokenizer, stream, cfg, raw, run_dir, "ppo", prompts.raw._fingerprint)
    logger = session.logger
    logger.note(
        f"ppo: {len(train_set)} prompts, {per_rollout} completions per rollout, beta {recipe.beta}"
        f"{f' (adaptive, KL target {recipe.kl_target})' if recipe.kl_target else ''} (reference {mode.value}), value model: {value_from}, rewards "
        + ", ".join(f"{s.name} x{s.weight:g}" for s in sources)
        + ("; policy forwards padding-free" if packed else "; padded rows")
        + f"; {trainable:,} of {total:,} parameters train ({100 * trainable / total:.2f}%)"
    )
    sampling = Sampling(recipe.temperature, recipe.top_p, recipe.top_k, recipe.max_new_tokens, recipe.rollout_engine.value, recipe.max_length)
    kl_control = AdaptiveKLController(recipe.beta, recipe.kl_target, recipe.kl_horizon)
    rollout_log = RolloutLog(logger, run_dir, cfg.logger.samples_every, recipe.steps_per_generation * recipe.num_ppo_epochs)
    queue = StepQueue(recipe, recipe.num_ppo_epochs, cfg.seed, device, tokenizer.pad_token_id, completion_tokens)  # a mean over completion tokens

    def token_logps(model: torch.nn.Module, batch: dict) -> torch.Tensor:
        return response_token_logps(model, batch, recipe.temperature, chunk=recipe.lm_head_chunk, padding_free=packed)[0]

    def new_rollout() -> None:
        rollout = sample_and_score(policy, tokenizer, train_set[next(stream)], 1, sampling, sources, queue.start_rollout(), environment)
        completions, scores = rollout.completions, rollout.rewards
        if recipe.missing_eos_penalty:
            scores = scores - recipe.missing_eos_penalty * torch.tensor(completions.truncated, dtype=torch.float32)
        started = time.perf_counter()
        both.eval()
        pad_id, size = tokenizer.pad_token_id, recipe.batch_size
        old_logps = per_token_values(lambda b: token_logps(policy, b), completions, pad_id, device, size)
        old_values = per_token_values(value_fn, completions, pad_id, device, size)
        ref_logps = old_logps if mode == Reference.none else per_token_values(
            lambda b: reference_logps(mode, policy, reference, b, token_logps), completions, pad_id, device, size)
        width = max(len(c) for c in completions.completion_ids)
        # The policy's tokens only: an environment's carry no KL, and GAE steps over them.
        mask = right_aligned(completions.token_masks or [torch.ones(len(c)) for c in completions.completion_ids], width)
        kl = (right_aligned(old_logps, width) - right_aligned(ref_logps, width)) * mask  # k1 per token, as PPO-RLHF uses
        token_rewards = score_to_token_rewards(scores, kl, mask, kl_control.beta)
        advantages, returns = gae(token_rewards, right_aligned(old_values, width), mask, recipe.gamma, recipe.lam)
        advantages = masked_whiten(advantages, mask) * mask
        lengths = [len(c) for c in completions.completion_ids]
        per_token = with_sampler_logps({
            "old_logps": old_logps,
            "old_values": old_values,
            "advantages": [advantages[i, width - n :] for i, n in enumerate(lengths)],
            "returns": [returns[i, width - n :] for i, n in enumerate(lengths)],
        }, completions)
        sequence_kl = kl.sum(-1)
        stats = rollout_metrics(scores, rollout.per_source, completions, 1) | {
            "objective/kl": float(sequence_kl.mean()),
            "objective/scores": float(scores.mean()),
            "objective/non_score_reward": float((-kl_control.beta * sequence_kl).mean()),
            "objective/rlhf_reward": float((scores - kl_control.beta * sequence_kl).mean()),
            "beta": kl_control.beta,
        }
        rollout.times["time/values"] = time.perf_counter() - started
        kl_control.update(float(sequence_kl.mean()), len(rollout.texts))
        queue.add(rollout, per_token, {}, stats)
        rollout_log.after(queue.rollouts, rollout, scores)

    def step_fn(batch: dict, num_items: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logps, mask, entropy = response_token_logps(policy, batch, recipe.temperature, with_entropy=True, chunk=recipe.lm_head_chunk,
                                                    padding_free=packed)
        mask = policy_mask(batch, mask)  # an environment's tokens: no loss
        values = value_fn(batch)
        policy_loss, clipped = clipped_surrogate(logps, batch["old_logps"], batch["advantages"], recipe.cliprange)
        weights, correction = rollout_correction_terms(recipe, batch, batch["old_logps"], mask, "token", num_items)  # sampler vs trainer
        policy_loss = policy_loss if weights is None else policy_loss * weights
        value_loss, value_clipped = clipped_value_loss(values, batch["old_values"], batch["returns"], recipe.cliprange_value)
        metrics = {
            "loss/policy": aggregate(policy_loss.detach(), mask, "token", num_items),
            "loss/value": aggregate(value_loss.detach(), mask, "token", num_items),
            "policy/clipfrac": aggregate(clipped.float(), mask, "token", num_items),
            "val/clipfrac": aggregate(value_clipped.float(), mask, "token", num_items),
            "policy/approxkl": aggregate(0.5 * (logps.detach() - batch["old_logps"]) ** 2, mask, "token", num_items),
            "objective/entropy": aggregate(entropy, mask, "token", num_items),
        }
        metrics |= correction | rollout_metric_shares(batch)
        return aggregate(policy_loss + recipe.vf_coef * value_loss, mask, "token", num_items), metrics

    def restore(state: dict) -> None:
        kl_control.beta = state["beta"]
        queue.restore(state)

    evaluate = greedy_evaluator(policy, tokenizer, sources, eval_rows, cfg, recipe, logger, environment)
    # A checkpoint keeps the KL coefficient and the steps left from the current rollout (exact resume).
    return session.train(evaluate, lambda: queue.next(new_rollout), step_fn, shown=("loss", "objective/scores", "objective/kl", "loss/value"),
                         extra_state=lambda: {"beta": kl_control.beta, **queue.state()}, restore_extra=restore)


STAGE = Stage("ppo", run, held_models, data_format="prompt", planned_batch=planned_batch)
