"""Schemas of the recipe config group: what every training stage shares (TrainConfig) and each
stage's own hyperparameters. Types and validation only; the defaults live in conf/recipe/*.yaml."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from alignctl.config.bounds import within
from alignctl.core.errors import ConfigError


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


class NonFinite(str, Enum):
    stop = "stop"
    skip = "skip"


class GuardMode(str, Enum):
    off = "off"  # no monitor
    warn = "warn"  # one line per signal that trips, training goes on
    stop = "stop"  # the first signal that trips ends the run there, saved and finished (alignctl/train/guard.py)


class Scheduler(str, Enum):
    linear = "linear"
    cosine = "cosine"
    constant = "constant"


class Reference(str, Enum):
    auto = "auto"  # adapter_disabled when an adapter trains, else a frozen copy (none for simpo)
    separate = "separate"  # a frozen copy of the starting policy
    adapter_disabled = "adapter_disabled"  # the policy with its adapter switched off: no second model
    precomputed = "precomputed"  # one pass before training, cached on disk, reference freed
    none = "none"  # reference-free: reference log-probs are zero


class DPOLossType(str, Enum):
    sigmoid = "sigmoid"
    robust = "robust"
    hinge = "hinge"
    ipo = "ipo"
    simpo = "simpo"


class Advantage(str, Enum):
    grpo = "grpo"  # (r - group mean) / (group std + eps)
    dr_grpo = "dr_grpo"  # r - group mean (no std scaling)
    rloo = "rloo"  # r - mean of the other K - 1 completions
    reinforce = "reinforce"  # r - batch mean
    reinforce_pp = "reinforce_pp"  # REINFORCE++-baseline: r - group mean, over the batch's std


class RolloutEngine(str, Enum):
    auto = "auto"  # native where it applies (Llama-family, float weights, unsharded), else hf
    native = "native"  # alignctl.rl.decode: fused weights, preallocated cache, finished rows leave the batch
    hf = "hf"  # transformers' generate
    vllm = "vllm"  # vLLM colocated in the training process (GPU, `pip install vllm`): alignctl/rl/vllm_engine.py


class RolloutIS(str, Enum):
    off = "off"  # train as if the sampler were the trainer
    truncate = "truncate"  # TIS: weight each token's loss by min(pi_old / mu, cap)
    mask = "mask"  # MIS: drop tokens (or completions) whose pi_old / mu is outside [1/cap, cap]


class RolloutISLevel(str, Enum):
    token = "token"  # one ratio per token
    sequence = "sequence"  # one ratio per completion: exp(sum of its tokens' log-ratios)


class PolicyLoss(str, Enum):
    ppo_clip = "ppo_clip"  # PPO's clipped surrogate per token (GRPO, DAPO)
    gspo = "gspo"  # one clipped importance ratio per completion (GSPO)
    cispo = "cispo"  # capped, detached importance weights, every token keeps its gradient (CISPO)


class LossAggregation(str, Enum):
    token = "token"  # every completion token of the step weighs the same (DAPO)
    sequence = "sequence"  # mean over each completion, then over completions (original GRPO)



# -------------------------------------------------------------------------------------- recipe
@dataclass
class TrainConfig:
    """What every training stage shares: the loop, the optimiser and the schedule."""

    stage: str
    max_steps: int = within("[0, 1e9]", "0: evaluate the starting model only")
    lr: float = within("(0, 10]")
    batch_size: int = within("[1, 1e6]")  # per device, per micro-step
    grad_accum: int = within("[1, 1e6]")
    max_length: int = within("[2, 1e7]")
    scheduler: Scheduler
    warmup_ratio: float = within("[0, 1)")
    weight_decay: float = within("[0, 10]")
    max_grad_norm: float | None = within("(0, 1e9]", "null: no clipping")
    optimizer: dict[str, Any]  # `_target_` plus keyword arguments; lr and weight_decay come from above
    eval_every: int = within("[0, 1e9]", "0: only at the end")  # optimiser steps between evaluations (0: only at the end)
    save_every: int = within("[0, 1e9]", "0: only at the end")  # optimiser steps between checkpoints (0: only at the end)
    keep_last: int = within("[1, 1e6]")  # intermediate checkpoints to keep on disk
    eval_batch_size: int = within("[1, 1e6]")
    eval_max_new_tokens: int = within("[1, 1e7]")
    nonfinite: NonFinite  # a step whose loss or gradient is nan/inf: stop the run, or skip the step and count it
    lm_head_chunk: int = within("[0, 1e7]", "0: plain logits")  # positions per chunk of the fused output layer (alignctl/nn/lm_head.py); 0: plain logits
    fused_mlp: bool  # SwiGLU MLPs keep (gate, up) for backward, not silu(gate) too (alignctl/nn/fused_mlp.py)
    fused_rms_norm: bool  # RMSNorms keep their input and one float a token for backward (alignctl/nn/fused_rms_norm.py)
    trim_top_layer: bool  # scalar heads: the top decoder layer runs at the scored position only (alignctl/nn/last_token.py)
    guard: GuardMode  # watch for over-optimisation, KL and length bias (alignctl/train/guard.py): off, warn or stop
    guard_drop: float = within("(0, 1e9]")  # how far the held-out metric may fall below its best, in its units (0.05: 5 points)
    guard_kl_max: float | None = within("(0, 1e9]", "null: not watched")  # ceiling on objective/kl, averaged over guard_window steps
    guard_length_corr: float | None = within("(0, 1]", "null: not watched")  # ceiling on the length-reward correlation, averaged likewise
    guard_min_evals: int = within("[2, 1e6]")  # evaluations (step 0 included) before the held-out signal may trip
    guard_window: int = within("[1, 1e6]")  # optimiser steps the training signals are averaged over

    def __post_init__(self) -> None:
        # Single-field ranges are declared with `within` and checked before this runs (alignctl/config/bounds.py);
        # what is left here involves more than a number.
        target = self.optimizer.get("_target_")
        _check(
            isinstance(target, str) and bool(target),
            "optimizer._target_",
            "must name an optimiser class (e.g. torch.optim.AdamW)",
        )
        if self.guard != GuardMode.off and self.guard_kl_max is not None:
            # objective/kl is logged by ppo, and by grpo with a KL term; anywhere else the ceiling would never be read.
            logs_kl = self.stage == "ppo" or (self.stage == "grpo" and getattr(self, "beta", 0) > 0)
            why = "grpo with beta=0 has no KL term" if self.stage == "grpo" else f"{self.stage} logs no objective/kl"
            _check(logs_kl, "guard_kl_max", f"{why}, so the KL signal would never be read; valid here: null (it is watched by ppo, and grpo with beta > 0)")


@dataclass
class SFTConfig(TrainConfig):
    completion_only_loss: bool  # loss on completion tokens only (prompt tokens are masked)
    packing: bool  # concatenate examples into max_length blocks instead of padding
    group_by_length: bool  # batches of rows of similar length (less padding)
    padding_free: bool  # each batch's rows end to end in one row, attention kept per row (no padding)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(not (self.packing and self.padding_free), "padding_free", "and packing are two ways to drop padding: set one of them")
        _check_nothing_to_guard(self)


@dataclass
class RewardConfig(TrainConfig):
    center_rewards_coefficient: float = within("[0, 1e3]", "0: off")  # c in c * (r+ + r-)^2, keeps rewards centred (0: off)
    extra_layers: int = within("[0, 1024]")  # fresh decoder layers stacked on the initial backbone, starting as the identity
    lm_loss_coef: float = within("[0, 1e3]", "0: off")  # weight of next-token loss on chosen responses, read below the extra layers (0: off)
    # each batch's sequences end to end in one row, attention kept per sequence (alignctl/nn/varlen_attention.py);
    # null: where that pays (alignctl.rl.scored_text.packed_scoring_pays) and lm_loss_coef is 0
    padding_free: bool | None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(not (self.padding_free is True and self.lm_loss_coef > 0), "padding_free",
               "reads every chosen token for lm_loss_coef's next-token loss, which takes padded rows: set padding_free=false or lm_loss_coef=0")
        _check_nothing_to_guard(self)


def _check_nothing_to_guard(recipe: TrainConfig) -> None:
    """sft and reward train on fixed targets, kto on single labels: no training reward (objective/scores,
    reward or rewards/margins), objective/kl or sampled completions for the guard to watch."""
    _check(recipe.guard == GuardMode.off, "guard", f"{recipe.stage} has no training reward or sampled completions for the guard to watch; valid here: off")


@dataclass
class DPOConfig(TrainConfig):
    beta: float = within("(0, 1e3]")  # strength of the KL anchor to the reference
    loss_type: DPOLossType
    label_smoothing: float = within("[0, 0.5)")  # probability that a preference label is wrong (conservative DPO, robust)
    simpo_gamma: float = within("[0, 1e3]")  # SimPO's target margin
    nll_weight: float = within("[0, 1e3]", "0: off")  # weight of an NLL term on the chosen response (RPO); 0: off
    reference: Reference
    share_prompt: bool  # each prompt through the model once for its two responses (alignctl/nn/shared_prompt.py)
    # each batch's rows end to end in one row, attention kept per row (alignctl/nn/varlen_attention.py);
    # null: where that pays (alignctl.nn.varlen_attention.pays) and share_prompt is off
    padding_free: bool | None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(not (self.share_prompt and self.padding_free is True), "padding_free",
               "and share_prompt are two batch layouts: set one of them (padding_free=null picks padding-free where share_prompt is off)")
        if self.loss_type == DPOLossType.simpo:
            _check(self.reference in (Reference.auto, Reference.none), "reference", "simpo is reference-free: use auto or none")


@dataclass
class KTOConfig(TrainConfig):
    beta: float = within("(0, 1e3]")
    desirable_weight: float = within("(0, 1e3]")  # lambda_D: weight of desirable examples
    undesirable_weight: float = within("(0, 1e3]")  # lambda_U: weight of undesirable examples
    reference: Reference

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.reference != Reference.none, "reference", "KTO needs a reference: auto, separate, adapter_disabled or precomputed")
        _check_nothing_to_guard(self)


@dataclass
class OnlineRLConfig(TrainConfig):
    """What PPO and GRPO share: sampling, rewards and the reference. `batch_size` counts completions."""

    max_new_tokens: int = within("[1, 1e7]")  # completion tokens sampled per prompt (max_length bounds prompt + completion)
    temperature: float = within("(0, 100]")
    top_p: float = within("(0, 1]")
    top_k: int = within("[0, 1e7]", "0: off")
    rollout_engine: RolloutEngine
    steps_per_generation: int = within("[1, 1e6]")  # optimiser steps fed by one pass over a rollout batch
    beta: float = within("[0, 1e3]", "0: no KL term, no reference")  # KL coefficient to the reference (0: no reference is loaded at all)
    reference: Reference
    reward_funcs: list[Any]  # dotted paths, or {_target_: path, weight: w, **kwargs} mappings
    reward_weights: list[float] | None = within("[-1e6, 1e6]")  # one per reward function (null: each entry's weight, else 1)
    reward_model_weight: float = within("[0, 1e6]")  # weight of inputs.reward's score, when a reward model is given
    reward_timeout: float | None = within("(0, 1e6]", "null: no limit")  # seconds one reward function call may take
    reward_concurrency: int = within("[1, 1e6]")  # awaitables of an async reward function's list in flight at once
    rollout_is: RolloutIS  # importance-sampling correction of the sampler/trainer mismatch (off, truncate, mask)
    rollout_is_level: RolloutISLevel  # token or sequence ratios
    rollout_is_cap: float = within("[1, 1e6]")  # truncate: the largest weight; mask: ratios outside [1/cap, cap] are dropped
    environment: str | None  # dotted path of a multi-turn environment class (null: single-turn completions)
    environment_kwargs: dict[str, Any]  # keyword arguments of the environment's constructor
    max_turns: int = within("[1, 1e4]")  # model turns per episode at most (with an environment)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.max_new_tokens < self.max_length, "max_new_tokens", f"must leave room for the prompt in max_length ({self.max_length})")
        _check(self.reference != Reference.precomputed, "reference", "precomputed needs a fixed dataset; online RL samples new completions: use auto, separate or adapter_disabled")
        if self.reward_weights is not None:
            _check(len(self.reward_weights) == len(self.reward_funcs), "reward_weights",
                   f"has {len(self.reward_weights)} values for {len(self.reward_funcs)} reward_funcs")


@dataclass
class GRPOConfig(OnlineRLConfig):
    num_generations: int = within("[2, 1e4]")  # K completions per prompt, the group of the group baseline
    num_iterations: int = within("[1, 1e3]")  # mu: optimisation passes over each rollout batch
    epsilon: float = within("(0, 10]")  # clip range of the ratio
    epsilon_high: float | None = within("(0, 10]", "null: epsilon")  # separate upper clip (DAPO's clip-higher)
    advantage: Advantage
    loss_aggregation: LossAggregation
    policy_loss: PolicyLoss
    overlong_buffer: int = within("[0, 1e7]", "0: off")  # DAPO's soft overlong punishment over the last N tokens of max_new_tokens
    entropy_coef: float = within("[0, 1e3]", "0: off")  # an entropy bonus: the loss minus coef x mean entropy of the sampled positions
    dynamic_sampling: bool  # DAPO: drop groups whose rewards are all equal, sample more prompts to refill
    max_draws: int = within("[1, 1e4]")  # dynamic sampling: batches of prompts drawn per rollout at most
    # training forwards as one packed row, each prompt once for its completions (alignctl/nn/prompt_groups.py);
    # null: wherever alignctl.nn.varlen_attention.pays
    padding_free: bool | None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.overlong_buffer <= self.max_new_tokens, "overlong_buffer",
               f"the punished window must fit in max_new_tokens ({self.max_new_tokens}), got {self.overlong_buffer}")
        if self.epsilon_high is not None:
            _check(self.epsilon_high >= self.epsilon, "epsilon_high", f"must be >= epsilon ({self.epsilon}), got {self.epsilon_high}")
        step = self.batch_size * self.grad_accum
        _check(step % self.num_generations == 0, "batch_size",
               f"batch_size x grad_accum ({step}) must be a multiple of num_generations ({self.num_generations}): whole groups per step")


@dataclass
class PPOConfig(OnlineRLConfig):
    num_ppo_epochs: int = within("[1, 1e3]")  # passes over each rollout batch
    cliprange: float = within("(0, 10]")  # clip range of the policy ratio
    cliprange_value: float = within("(0, 1e6]")  # clip range of the value update
    vf_coef: float = within("(0, 1e3]")  # weight of the value loss
    gamma: float = within("(0, 1]")  # discount
    lam: float = within("[0, 1]")  # GAE lambda
    kl_target: float | None = within("(0, 1e3]", "null: fixed beta")  # adaptive KL controller target
    kl_horizon: int = within("[1, 1e12]")  # adaptive controller horizon, in completions
    missing_eos_penalty: float | None = within("[-1e6, 1e6]")  # subtracted from the score of a completion that never ends
    # training forwards as one packed row, each prompt once for its completions (alignctl/nn/prompt_groups.py);
    # null: wherever alignctl.nn.varlen_attention.pays
    padding_free: bool | None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kl_target is not None:
            _check(self.beta > 0, "beta", "the adaptive KL controller needs a starting beta > 0")


@dataclass
class DistillConfig(OnlineRLConfig):
    """recipe=distill: on-policy distillation (GKD). The student samples, the teacher (inputs.teacher) scores
    every sampled token's next-token distribution; `batch_size` counts completions."""

    num_generations: int = within("[1, 1e4]")  # completions the student samples per prompt
    beta_jsd: float = within("[0, 1]", "0: forward KL(teacher||student), 1: reverse KL(student||teacher)")  # TRL GKDTrainer's beta

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.beta == 0, "beta", "distill has no reference policy: the teacher is what the student is pulled to; set beta=0")
        # The teacher scores the student's own tokens: an environment's would be scored as if the student wrote them.
        _check(self.environment is None, "environment", "distill samples single-turn completions; multi-turn environments train with "
               "recipe=grpo or recipe=ppo; set environment=null")
        step = self.batch_size * self.grad_accum
        _check(step % self.num_generations == 0, "batch_size",
               f"batch_size x grad_accum ({step}) must be a multiple of num_generations ({self.num_generations})")


@dataclass
class PairsConfig:
    """recipe=pairs: sample K completions per prompt from a policy, rank them with the rewards, and
    write (prompt, best, worst) preference pairs for the next DPO round. Trains nothing."""

    stage: str
    num_prompts: int = within("[1, 1e9]")  # prompts drawn (seeded) from the prompt split
    num_generations: int = within("[2, 1e4]")  # K completions per prompt
    batch_size: int = within("[1, 1e6]")  # prompts per generation call
    max_length: int = within("[2, 1e7]")
    max_new_tokens: int = within("[1, 1e7]")
    temperature: float = within("(0, 100]")
    top_p: float = within("(0, 1]")
    top_k: int = within("[0, 1e7]", "0: off")
    rollout_engine: RolloutEngine
    reward_funcs: list[Any]
    reward_weights: list[float] | None = within("[-1e6, 1e6]")
    reward_model_weight: float = within("[0, 1e6]")
    reward_timeout: float | None = within("(0, 1e6]", "null: no limit")  # seconds one reward function call may take
    reward_concurrency: int = within("[1, 1e6]")  # awaitables of an async reward function's list in flight at once
    eval_batch_size: int = within("[1, 1e6]")  # completions per reward-model forward

    def __post_init__(self) -> None:
        _check(self.max_new_tokens < self.max_length, "max_new_tokens", f"must leave room for the prompt in max_length ({self.max_length})")
        if self.reward_weights is not None:
            _check(len(self.reward_weights) == len(self.reward_funcs), "reward_weights",
                   f"has {len(self.reward_weights)} values for {len(self.reward_funcs)} reward_funcs")


RECIPE_SCHEMAS: dict[str, type] = {
    "sft": SFTConfig,
    "reward": RewardConfig,
    "dpo": DPOConfig,
    "kto": KTOConfig,
    "grpo": GRPOConfig,
    "ppo": PPOConfig,
    "distill": DistillConfig,
    "pairs": PairsConfig,
}
