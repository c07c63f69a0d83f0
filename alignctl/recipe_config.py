"""Schemas of the recipe config group: what every training stage shares (TrainConfig) and each
stage's own hyperparameters. Types and validation only; the defaults live in conf/recipe/*.yaml."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from alignctl.errors import ConfigError


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


class NonFinite(str, Enum):
    stop = "stop"
    skip = "skip"


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


class RolloutEngine(str, Enum):
    auto = "auto"  # native where it applies (Llama-family, float weights, unsharded), else hf
    native = "native"  # alignctl.decode: fused weights, preallocated cache, finished rows leave the batch
    hf = "hf"  # transformers' generate
    vllm = "vllm"  # vLLM colocated in the training process (GPU, `pip install vllm`): alignctl/vllm_engine.py


class LossAggregation(str, Enum):
    token = "token"  # every completion token of the step weighs the same (DAPO)
    sequence = "sequence"  # mean over each completion, then over completions (original GRPO)



# -------------------------------------------------------------------------------------- recipe
@dataclass
class TrainConfig:
    """What every training stage shares: the loop, the optimiser and the schedule."""

    stage: str
    max_steps: int
    lr: float
    batch_size: int  # per device, per micro-step
    grad_accum: int
    max_length: int
    scheduler: Scheduler
    warmup_ratio: float
    weight_decay: float
    max_grad_norm: float | None
    optimizer: dict[str, Any]  # `_target_` plus keyword arguments; lr and weight_decay come from above
    eval_every: int  # optimiser steps between evaluations (0: only at the end)
    save_every: int  # optimiser steps between checkpoints (0: only at the end)
    keep_last: int  # intermediate checkpoints to keep on disk
    eval_batch_size: int
    eval_max_new_tokens: int
    nonfinite: NonFinite  # a step whose loss or gradient is nan/inf: stop the run, or skip the step and count it
    lm_head_chunk: int  # positions per chunk of the fused output layer (alignctl/lm_head.py); 0: plain logits
    fused_mlp: bool  # SwiGLU MLPs keep (gate, up) for backward, not silu(gate) too (alignctl/fused_mlp.py)
    trim_top_layer: bool  # scalar heads: the top decoder layer runs at the scored position only (alignctl/last_token.py)

    def __post_init__(self) -> None:
        _check(self.max_steps >= 0, "max_steps", f"must be >= 0 (0: evaluate the starting model only), got {self.max_steps}")
        _check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        _check(self.batch_size > 0, "batch_size", f"must be a positive integer, got {self.batch_size}")
        _check(self.grad_accum > 0, "grad_accum", f"must be a positive integer, got {self.grad_accum}")
        _check(self.max_length > 1, "max_length", f"must be at least 2, got {self.max_length}")
        _check(0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        _check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        if self.max_grad_norm is not None:
            _check(self.max_grad_norm > 0, "max_grad_norm", f"must be > 0 or null (no clipping), got {self.max_grad_norm}")
        target = self.optimizer.get("_target_")
        _check(
            isinstance(target, str) and bool(target),
            "optimizer._target_",
            "must name an optimiser class (e.g. torch.optim.AdamW)",
        )
        _check(self.eval_every >= 0, "eval_every", f"must be >= 0 (0: only at the end), got {self.eval_every}")
        _check(self.save_every >= 0, "save_every", f"must be >= 0 (0: only at the end), got {self.save_every}")
        _check(self.lm_head_chunk >= 0, "lm_head_chunk", f"must be >= 0 (0: plain logits), got {self.lm_head_chunk}")
        _check(self.keep_last >= 1, "keep_last", f"must be at least 1, got {self.keep_last}")
        _check(self.eval_batch_size > 0, "eval_batch_size", f"must be a positive integer, got {self.eval_batch_size}")
        _check(
            self.eval_max_new_tokens > 0, "eval_max_new_tokens", f"must be a positive integer, got {self.eval_max_new_tokens}"
        )


@dataclass
class SFTConfig(TrainConfig):
    completion_only_loss: bool  # loss on completion tokens only (prompt tokens are masked)
    packing: bool  # concatenate examples into max_length blocks instead of padding
    padding_free: bool  # each batch's rows end to end in one row, attention kept per row (no padding)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(not (self.packing and self.padding_free), "padding_free", "and packing are two ways to drop padding: set one of them")


@dataclass
class RewardConfig(TrainConfig):
    center_rewards_coefficient: float  # c in c * (r+ + r-)^2, keeps rewards centred (0: off)
    extra_layers: int  # fresh decoder layers stacked on the initial backbone, starting as the identity
    lm_loss_coef: float  # weight of next-token loss on chosen responses, read below the extra layers (0: off)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.center_rewards_coefficient >= 0, "center_rewards_coefficient", f"must be >= 0, got {self.center_rewards_coefficient}")
        _check(self.extra_layers >= 0, "extra_layers", f"must be >= 0, got {self.extra_layers}")
        _check(self.lm_loss_coef >= 0, "lm_loss_coef", f"must be >= 0 (0: off), got {self.lm_loss_coef}")


@dataclass
class DPOConfig(TrainConfig):
    beta: float  # strength of the KL anchor to the reference
    loss_type: DPOLossType
    label_smoothing: float  # probability that a preference label is wrong (conservative DPO, robust)
    simpo_gamma: float  # SimPO's target margin
    nll_weight: float  # weight of an NLL term on the chosen response (RPO); 0: off
    reference: Reference
    share_prompt: bool  # each prompt through the model once for its two responses (alignctl/shared_prompt.py)
    padding_free: bool  # each batch's rows end to end in one row, attention kept per row (alignctl/varlen_attention.py)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.beta > 0, "beta", f"must be > 0, got {self.beta}")
        _check(0 <= self.label_smoothing < 0.5, "label_smoothing", f"must be in [0, 0.5), got {self.label_smoothing}")
        _check(self.nll_weight >= 0, "nll_weight", f"must be >= 0, got {self.nll_weight}")
        _check(not (self.share_prompt and self.padding_free), "padding_free", "and share_prompt are two batch layouts: set one of them")
        if self.loss_type == DPOLossType.simpo:
            _check(self.reference in (Reference.auto, Reference.none), "reference", "simpo is reference-free: use auto or none")


@dataclass
class KTOConfig(TrainConfig):
    beta: float
    desirable_weight: float  # lambda_D: weight of desirable examples
    undesirable_weight: float  # lambda_U: weight of undesirable examples
    reference: Reference

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.beta > 0, "beta", f"must be > 0, got {self.beta}")
        _check(self.desirable_weight > 0, "desirable_weight", f"must be > 0, got {self.desirable_weight}")
        _check(self.undesirable_weight > 0, "undesirable_weight", f"must be > 0, got {self.undesirable_weight}")
        _check(self.reference != Reference.none, "reference", "KTO needs a reference: auto, separate, adapter_disabled or precomputed")


@dataclass
class OnlineRLConfig(TrainConfig):
    """What PPO and GRPO share: sampling, rewards and the reference. `batch_size` counts completions."""

    max_new_tokens: int  # completion tokens sampled per prompt (max_length bounds prompt + completion)
    temperature: float
    top_p: float
    top_k: int  # 0: off
    rollout_engine: RolloutEngine
    steps_per_generation: int  # optimiser steps fed by one pass over a rollout batch
    beta: float  # KL coefficient to the reference (0: no reference is loaded at all)
    reference: Reference
    reward_funcs: list[Any]  # dotted paths, or {_target_: path, weight: w, **kwargs} mappings
    reward_weights: list[float] | None  # one per reward function (null: each entry's weight, else 1)
    reward_model_weight: float  # weight of inputs.reward's score, when a reward model is given

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.max_new_tokens > 0, "max_new_tokens", f"must be a positive integer, got {self.max_new_tokens}")
        _check(self.max_new_tokens < self.max_length, "max_new_tokens", f"must leave room for the prompt in max_length ({self.max_length})")
        _check(self.temperature > 0, "temperature", f"must be > 0 (sampling), got {self.temperature}")
        _check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        _check(self.top_k >= 0, "top_k", f"must be >= 0 (0: off), got {self.top_k}")
        _check(self.steps_per_generation > 0, "steps_per_generation", f"must be a positive integer, got {self.steps_per_generation}")
        _check(self.beta >= 0, "beta", f"must be >= 0 (0: no KL term, no reference), got {self.beta}")
        _check(self.reward_model_weight >= 0, "reward_model_weight", f"must be >= 0, got {self.reward_model_weight}")
        _check(self.reference != Reference.precomputed, "reference", "precomputed needs a fixed dataset; online RL samples new completions: use auto, separate or adapter_disabled")
        if self.reward_weights is not None:
            _check(len(self.reward_weights) == len(self.reward_funcs), "reward_weights",
                   f"has {len(self.reward_weights)} values for {len(self.reward_funcs)} reward_funcs")


@dataclass
class GRPOConfig(OnlineRLConfig):
    num_generations: int  # K completions per prompt, the group of the group baseline
    num_iterations: int  # mu: optimisation passes over each rollout batch
    epsilon: float  # clip range of the ratio
    epsilon_high: float | None  # separate upper clip (DAPO's clip-higher); null: epsilon
    advantage: Advantage
    loss_aggregation: LossAggregation

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.num_generations >= 2, "num_generations", f"must be at least 2 (a group needs a baseline), got {self.num_generations}")
        _check(self.num_iterations > 0, "num_iterations", f"must be a positive integer, got {self.num_iterations}")
        _check(self.epsilon > 0, "epsilon", f"must be > 0, got {self.epsilon}")
        if self.epsilon_high is not None:
            _check(self.epsilon_high >= self.epsilon, "epsilon_high", f"must be >= epsilon ({self.epsilon}), got {self.epsilon_high}")
        step = self.batch_size * self.grad_accum
        _check(step % self.num_generations == 0, "batch_size",
               f"batch_size x grad_accum ({step}) must be a multiple of num_generations ({self.num_generations}): whole groups per step")


@dataclass
class PPOConfig(OnlineRLConfig):
    num_ppo_epochs: int  # passes over each rollout batch
    cliprange: float  # clip range of the policy ratio
    cliprange_value: float  # clip range of the value update
    vf_coef: float  # weight of the value loss
    gamma: float  # discount
    lam: float  # GAE lambda
    kl_target: float | None  # adaptive KL controller target (null: fixed beta)
    kl_horizon: int  # adaptive controller horizon, in completions
    missing_eos_penalty: float | None  # subtracted from the score of a completion that never ends

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.num_ppo_epochs > 0, "num_ppo_epochs", f"must be a positive integer, got {self.num_ppo_epochs}")
        _check(self.cliprange > 0, "cliprange", f"must be > 0, got {self.cliprange}")
        _check(self.cliprange_value > 0, "cliprange_value", f"must be > 0, got {self.cliprange_value}")
        _check(self.vf_coef > 0, "vf_coef", f"must be > 0, got {self.vf_coef}")
        _check(0 < self.gamma <= 1, "gamma", f"must be in (0, 1], got {self.gamma}")
        _check(0 <= self.lam <= 1, "lam", f"must be in [0, 1], got {self.lam}")
        if self.kl_target is not None:
            _check(self.kl_target > 0, "kl_target", f"must be > 0 or null (fixed beta), got {self.kl_target}")
            _check(self.beta > 0, "beta", "the adaptive KL controller needs a starting beta > 0")
        _check(self.kl_horizon > 0, "kl_horizon", f"must be a positive integer, got {self.kl_horizon}")


@dataclass
class PairsConfig:
    """recipe=pairs: sample K completions per prompt from a policy, rank them with the rewards, and
    write (prompt, best, worst) preference pairs for the next DPO round. Trains nothing."""

    stage: str
    num_prompts: int  # prompts drawn (seeded) from the prompt split
    num_generations: int  # K completions per prompt
    batch_size: int  # prompts per generation call
    max_length: int
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    rollout_engine: RolloutEngine
    reward_funcs: list[Any]
    reward_weights: list[float] | None
    reward_model_weight: float
    eval_batch_size: int  # completions per reward-model forward

    def __post_init__(self) -> None:
        _check(self.num_prompts > 0, "num_prompts", f"must be a positive integer, got {self.num_prompts}")
        _check(self.num_generations >= 2, "num_generations", f"must be at least 2 (a pair needs two completions), got {self.num_generations}")
        _check(self.batch_size > 0, "batch_size", f"must be a positive integer, got {self.batch_size}")
        _check(0 < self.max_new_tokens < self.max_length, "max_new_tokens", f"must be positive and leave room for the prompt in max_length ({self.max_length})")
        _check(self.temperature > 0, "temperature", f"must be > 0 (sampling), got {self.temperature}")
        _check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        _check(self.top_k >= 0, "top_k", f"must be >= 0 (0: off), got {self.top_k}")
        _check(self.eval_batch_size > 0, "eval_batch_size", f"must be a positive integer, got {self.eval_batch_size}")
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
    "pairs": PairsConfig,
}
