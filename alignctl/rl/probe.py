"""`alignctl probe`: how far the rollout engine's log-probs are from the trainer's, before any training.

The policy is loaded as the recipe would load it (adapter, precision, rollout engine), samples one
completion for each of a handful of prompts, and the trainer's forward scores the same tokens under
the same autocast. The gap, |log μ_sampler − log π_trainer| per completion token, is what
`rollout/logprob_diff` logs during a run and what `recipe.rollout_is` corrects: a native engine in
float32 is the trainer up to rounding, `generate` under bf16 autocast or vLLM are not. Nothing is
written to the run directory.
"""

from __future__ import annotations

import math

import torch

from alignctl.config.schema import OnlineRLConfig, RunConfig
from alignctl.core.errors import ConfigError
from alignctl.models import precision
from alignctl.models.adapters import apply_adapter
from alignctl.models.loading import device_type, load_causal_lm
from alignctl.nn.logprobs import response_token_logps
from alignctl.nn.losses import logprob_gap, rollout_correction
from alignctl.rl.online_rl import load_prompts
from alignctl.rl.rollout import ENGINES, Sampling, per_token_values, right_aligned, sample
from alignctl.train.session import start_process

NEGLIGIBLE = 1e-3  # mean |Δ log p| below which the sampler is, for training, the trainer (bf16 sampling: ~6e-4 on the tiny model)
ROUNDING = 1e-5  # mean |Δ log p| of float32 rounding alone (~2e-7 on the tiny model)


def probe(cfg: RunConfig, prompts: int) -> dict:
    """Sample one completion for each of the first `prompts` training prompts; the sampler/trainer gap
    over their tokens, and a verdict. A ConfigError for a recipe that does not sample."""
    recipe = cfg.recipe
    if not isinstance(recipe, OnlineRLConfig):
        raise ConfigError("recipe", f"probe measures an online RL recipe's sampler; {recipe.stage} samples nothing: use recipe=grpo or recipe=ppo")
    device = start_process(cfg)  # hardware.autocast/dtype settled as the run would settle them
    data = load_prompts(cfg, recipe, 1)
    rows = data.train[: min(prompts, len(data.train))]
    policy = apply_adapter(load_causal_lm(data.policy_path, cfg.model, cfg.hardware, cfg.adapter), cfg.adapter)
    sampling = Sampling(recipe.temperature, recipe.top_p, recipe.top_k, recipe.max_new_tokens, recipe.rollout_engine.value, recipe.max_length)
    pad_id = data.tokenizer.pad_token_id
    with precision.autocast(cfg.hardware.autocast, device_type(cfg.hardware)):
        completions = sample(policy, rows["prompt_ids"], 1, sampling, pad_id, data.tokenizer.eos_token_id)
        policy.eval()
        trainer = per_token_values(lambda b: response_token_logps(policy, b, recipe.temperature, chunk=recipe.lm_head_chunk)[0],
                                   completions, pad_id, device, recipe.batch_size)
    width = max(len(ids) for ids in completions.completion_ids)
    mask = right_aligned([torch.ones(len(ids), dtype=torch.bool) for ids in completions.completion_ids], width)
    result = {"engine": completions.engine, "engine_name": ENGINES.get(completions.engine, completions.engine),
              "autocast": cfg.hardware.autocast or "float32", "dtype": cfg.hardware.dtype, "device": str(device),
              "prompts": len(completions.completion_ids), "tokens": int(mask.sum()), "cap": recipe.rollout_is_cap}
    if completions.sampler_logps is None:
        return result | {"logprob_diff": None, "logprob_diff_max": None, "over_cap_frac": None, "verdict": "the engine gave no log-probs"}
    trainer_t, sampler_t = right_aligned(trainer, width), right_aligned(completions.sampler_logps, width)
    gap = logprob_gap(trainer_t, sampler_t, mask)
    _, masked = rollout_correction(trainer_t, sampler_t, mask, "mask", "token", recipe.rollout_is_cap)
    result |= {"logprob_diff": float(gap["rollout/logprob_diff"]), "logprob_diff_max": float(gap["rollout/logprob_diff_max"]),
               "over_cap_frac": float(masked["rollout/is_masked_frac"])}
    return result | {"verdict": verdict(result["logprob_diff"], result["logprob_diff_max"], recipe.rollout_is_cap, recipe.rollout_is.value)}


def verdict(mean: float, largest: float, cap: float, current: str) -> str:
    """One line: whether the gap calls for recipe.rollout_is (and whether it is already on)."""
    on = current != "off"
    if largest > math.log(cap):
        return f"tokens beyond the cap: recipe.rollout_is={current} corrects them" if on else "consider recipe.rollout_is=truncate (or mask)"
    if mean > NEGLIGIBLE:
        return f"a small mismatch, within the cap; recipe.rollout_is={current} is on" if on else "a small mismatch, within the cap: recipe.rollout_is=truncate is cheap insurance"
    if mean > ROUNDING:
        return "no correction needed: a gap the size of low-precision rounding, far within the cap"
    return "no correction needed: the sampler is the trainer up to float32 rounding"
