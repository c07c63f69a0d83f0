"""Rollouts for online RL, shared by PPO and GRPO: sample completions, then turn them into training batches.

Sampling (temperature / top-p / top-k, stop at EOS) runs on left-padded prompts through the native
engine (alignctl.rl.decode) where it applies, else through ``model.generate`` (``recipe.rollout_engine``);
either way each prompt is prefilled once and the K completions of a prompt come out next to each
other, which is what group baselines need. A completion keeps its EOS (ending
is an action the policy takes) and loses everything after it; one that never ends is *truncated*.

Per-token quantities of a rollout (log-probs at sampling time, reference log-probs, values) are
computed once, without gradient, in chunks, and kept per completion as 1-D tensors. A minibatch is
then any subset of completions: `training_batch` left-pads them again, so each row's completion
ends at the last position and the per-token tensors line up with ``ops.response_token_logps``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from transformers import DynamicCache
from transformers.generation.logits_process import LogitsProcessor, LogitsProcessorList

from alignctl.core.errors import ConfigError
from alignctl.data.batching import pad
from alignctl.nn.kv_cache import CACHE_ARG
from alignctl.nn.lm_head import keep_last
from alignctl.nn.logprobs import left_padded_batch
from alignctl.nn.prompt_groups import prompt_group_fields
from alignctl.rl import decode, vllm_engine
from alignctl.train.sharding import is_sharded


@dataclass
class Sampling:
    temperature: float
    top_p: float
    top_k: int  # 0: off
    max_new_tokens: int
    engine: str = "auto"  # native (alignctl.rl.decode), hf (model.generate), auto: native where it applies, vllm
    max_length: int | None = None  # prompt + completion: bounds the vllm engine's sequences


@dataclass
class Completions:
    prompt_ids: list[list[int]]  # one per completion (a prompt's K completions repeat its ids)
    completion_ids: list[list[int]]  # each ends with EOS unless truncated
    truncated: list[bool]  # no EOS within max_new_tokens
    engine: str = ""  # what sampled them: a key of ENGINES
    # The sampler's log-prob of each completion token (1-D, as long as its ids) under the distribution it
    # drew from (temperature, top-p, top-k applied); None where the engine gave none.
    sampler_logps: list[torch.Tensor] | None = None
    # Multi-turn episodes (alignctl/rl/multi_turn.py): per completion token, 1 where the policy sampled it,
    # 0 where the environment wrote it; None: a single turn, every token sampled.
    token_masks: list[torch.Tensor] | None = None


# What each engine is, as the run's log names it.
ENGINES = {"native": "the native decoder (alignctl/rl/decode.py)", "hf": "transformers generate", "vllm": "vLLM (alignctl/rl/vllm_engine.py)"}


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    prompt_ids: Sequence[list[int]],
    num_generations: int,
    sampling: Sampling,
    pad_id: int,
    eos_id: int,
) -> Completions:
    """`num_generations` sampled completions per prompt, the K of a prompt consecutive."""
    model.eval()
    if sampling.engine == "vllm":
        return replace(vllm_sample(model, prompt_ids, num_generations, sampling, eos_id), engine="vllm")
    device = next(model.parameters()).device
    input_ids = pad(prompt_ids, pad_id, side="left").to(device)
    attention_mask = pad([[1] * len(p) for p in prompt_ids], 0, side="left").to(device)
    if native_engine(model, sampling.engine, input_ids, attention_mask, sampling.max_new_tokens):
        new_tokens, logps = decode.sample(model, input_ids, attention_mask, num_generations, sampling.temperature, sampling.top_k, sampling.top_p,
                                          sampling.max_new_tokens, eos_id, pad_id, with_logps=True)
        return replace(completions_from(new_tokens, prompt_ids, num_generations, eos_id, logps), engine="native")
    cache = shared_prompt_cache(model, input_ids, attention_mask, num_generations)
    if cache is not None:  # generate() then starts from the cache: K rows per prompt, one per completion
        input_ids, attention_mask = input_ids.repeat_interleave(num_generations, 0), attention_mask.repeat_interleave(num_generations, 0)
    recorder = SampledLogps(sampling.temperature, sampling.top_k, sampling.top_p)
    output = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        **{CACHE_ARG: cache},
        do_sample=True,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,  # passed even when 0: a model's generation_config may set its own default
        max_new_tokens=sampling.max_new_tokens,
        num_return_sequences=1 if cache is not None else num_generations,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        use_cache=True,
        # FSDP: every process takes part in every forward, so all go on until the last one is done.
        synced_gpus=is_sharded(model),
        logits_processor=LogitsProcessorList([recorder]),
    )
    return replace(completions_from(output[:, input_ids.size(1) :], prompt_ids, num_generations, eos_id, recorder.finish(output)), engine="hf")


def sample_resuming(
    model: torch.nn.Module,
    contexts: Sequence[list[int]],
    caches: Sequence[decode.RowCache | None],
    num_generations: int,
    sampling: Sampling,
    pad_id: int,
    eos_id: int,
) -> tuple[Completions, list[decode.RowCache]] | None:
    """`sample` that keeps each sequence's KV cache (the native engine only): context r's first
    caches[r].length tokens are taken from its cache (None: none), only the rest is prefilled. Returns
    the completions and each completion's cache (its context and completion, all but the last sampled
    token); None where the native engine does not take this rollout (`hf`, `vllm`, or `auto` falling back)."""
    if sampling.engine not in ("native", "auto"):
        return None
    model.eval()
    device = next(model.parameters()).device
    input_ids = pad(contexts, pad_id, side="left").to(device)
    attention_mask = pad([[1] * len(c) for c in contexts], 0, side="left").to(device)
    if not native_engine(model, sampling.engine, input_ids, attention_mask, sampling.max_new_tokens):
        return None
    new_ids = [list(context[cache.length if cache is not None else 0 :]) for context, cache in zip(contexts, caches)]
    tokens, logps, kept = decode.sample_resumed(model, caches, new_ids, num_generations, sampling.temperature, sampling.top_k, sampling.top_p,
                                                sampling.max_new_tokens, eos_id, pad_id)
    return replace(completions_from(tokens, contexts, num_generations, eos_id, logps), engine="native"), kept


class SampledLogps(LogitsProcessor):
    """Records, for `generate`, the log-prob of each token it samples under the distribution it samples
    from, holding one step's distribution at a time (``output_scores`` would keep them all: rows x
    vocabulary x new tokens). generate applies its warpers after a caller's processors, so the same
    warpers (alignctl.rl.decode.warpers, generate's order) are applied here to what this one sees."""

    def __init__(self, temperature: float, top_k: int, top_p: float):
        self.warp = decode.warpers(temperature, top_k, top_p)
        self.previous: torch.Tensor | None = None  # the last step's log-probs over the vocabulary
        self.values: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self._take(input_ids[:, -1])  # the token sampled from the previous step's distribution
        self.previous = torch.log_softmax(self.warp(input_ids, scores.float()), dim=-1)
        return scores

    def _take(self, tokens: torch.Tensor) -> None:
        if self.previous is not None:
            self.values.append(self.previous.gather(1, tokens[:, None]).squeeze(1))
            self.previous = None

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        """(rows, new tokens) log-probs, once generate has returned `sequences`."""
        self._take(sequences[:, -1])
        return torch.stack(self.values, 1) if self.values else sequences.new_zeros((sequences.size(0), 0), dtype=torch.float32)


def completions_from(new_tokens: torch.Tensor, prompt_ids: Sequence[list[int]], num_generations: int, eos_id: int,
                     logps: torch.Tensor | None = None) -> Completions:
    """Cut each row of sampled tokens after its EOS (kept); a row without one is truncated. `logps`
    (rows, new tokens): the sampler's log-probs, cut the same way."""
    completion_ids, truncated = [], []
    for tokens in new_tokens.tolist():
        if eos_id in tokens:
            completion_ids.append(tokens[: tokens.index(eos_id) + 1])
            truncated.append(False)
        else:
            completion_ids.append(tokens)
            truncated.append(True)
    repeated_prompts = [list(p) for p in prompt_ids for _ in range(num_generations)]
    sampler = None if logps is None else [logps[row, : len(ids)].float().cpu().clone() for row, ids in enumerate(completion_ids)]
    return Completions(repeated_prompts, completion_ids, truncated, sampler_logps=sampler)


_checked: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> did the engine match its forward


def native_engine(model: torch.nn.Module, engine: str, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int) -> bool:
    """Whether this rollout goes through alignctl.rl.decode. `native` insists (an error where it cannot),
    `auto` takes it where it applies and falls back to generate otherwise. The first time a model is
    used, the engine's logits are compared with the model's own forward on the rollout's prompts."""
    if engine == "hf" or (engine == "auto" and is_sharded(model)):
        return False
    reason = "sharded weights" if is_sharded(model) else decode.unsupported_reason(model, input_ids.size(1) + max_new_tokens)
    if reason is None and model not in _checked:
        gap, tolerance = decode.engine_gap(model, input_ids, attention_mask)
        _checked[model] = gap <= tolerance
        if not _checked[model]:
            reason = f"its logits differ from the model's forward by {gap:.2e}"
    elif reason is None and not _checked[model]:
        reason = "its logits differed from the model's forward"
    if reason is None:
        return True
    if engine == "native":
        raise ConfigError("recipe.rollout_engine", f"native cannot sample from this model: {reason}; use hf or auto")
    return False


_vllm_engines: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its colocated vLLM engine


def vllm_sample(model: torch.nn.Module, prompt_ids: Sequence[list[int]], num_generations: int, sampling: Sampling, eos_id: int) -> Completions:
    """Sample through vLLM colocated in this process (alignctl/rl/vllm_engine.py): the engine is built from
    the policy's starting checkpoint on first use, and gets the policy's current weights before each rollout."""
    engine = _vllm_engines.get(model)
    if engine is None:
        reason = vllm_engine.unavailable_reason()
        if reason is not None:
            raise ConfigError("recipe.rollout_engine", f"vllm: {reason}; use auto, native or hf")
        config = decode.causal_lm(model).config
        # Each process samples its own completions: a seed of its own, drawn from the seeded run.
        seed = int(torch.randint(0, 2**31 - 1, (1,)))
        engine = _vllm_engines[model] = vllm_engine.VLLMRollouts(config._name_or_path, sampling.max_length or config.max_position_embeddings, seed=seed)
    engine.push_weights(model)
    completion_ids, logps = engine.sample(prompt_ids, num_generations, sampling.temperature, sampling.top_p, sampling.top_k, sampling.max_new_tokens,
                                          eos_id, with_logps=True)
    truncated = [not ids or ids[-1] != eos_id for ids in completion_ids]
    return Completions([list(p) for p in prompt_ids for _ in range(num_generations)], completion_ids, truncated,
                       sampler_logps=[torch.tensor(values, dtype=torch.float32) for values in logps])


def shared_prompt_cache(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, copies: int) -> DynamicCache | None:
    """The KV cache of each prompt but its last token, computed once and repeated for its K completions.

    generate(num_return_sequences=K) would run the prompt K times; here the K rows share one prefill,
    and generate() continues from the cache with the last prompt token. None when there is nothing
    to share (K = 1, or prompts of one token)."""
    if copies == 1 or input_ids.size(1) < 2:
        return None
    cache = DynamicCache(config=model.config)
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    model(input_ids=input_ids[:, :-1], attention_mask=attention_mask[:, :-1], position_ids=positions[:, :-1],
          **{CACHE_ARG: cache}, use_cache=True, logits_to_keep=keep_last(input_ids[:, :-1], 1))
    cache.batch_repeat_interleave(copies)
    return cache


def right_aligned(values: Sequence[torch.Tensor], width: int) -> torch.Tensor:
    """Stack 1-D per-completion tensors into (B, width), each ending at the last column (zeros before)."""
    out = torch.zeros(len(values), width, dtype=values[0].dtype if values else torch.float32)
    for row, value in enumerate(values):
        if len(value):
            out[row, -len(value) :] = value
    return out


def training_batch(completions: Completions, indices: Sequence[int], pad_id: int, device: torch.device, per_token: dict[str, list[torch.Tensor]], per_sequence: dict[str, torch.Tensor]) -> dict:
    """A left-padded batch of the chosen completions with their stored quantities, and the same rows
    packed, each prompt once (alignctl/nn/prompt_groups.py: ``recipe.padding_free`` picks the layout).

    `per_token` values become (B, W) tensors aligned with the response mask's last W columns;
    `per_sequence` values are indexed to (B,).
    """
    prompts = [completions.prompt_ids[i] for i in indices]
    responses = [completions.completion_ids[i] for i in indices]
    layouts = left_padded_batch(prompts, responses, pad_id) | prompt_group_fields(prompts, responses)
    batch = {k: v.to(device) for k, v in layouts.items()}
    width = max(len(r) for r in responses)
    for name, values in per_token.items():
        batch[name] = right_aligned([values[i] for i in indices], width).to(device)
    for name, values in per_sequence.items():
        batch[name] = values[list(indices)].to(device)
    if completions.token_masks is not None:  # aligned with the response mask's last W columns, as per-token values are
        batch["sampled_mask"] = right_aligned([completions.token_masks[i] for i in indices], width).to(device)
    batch["num_tokens"] = int(batch["attention_mask"].sum())
    return batch


def policy_mask(batch: dict, response_mask: torch.Tensor) -> torch.Tensor:
    """The completion tokens the policy sampled: the response mask ((B, W), from response_token_logps)
    without the environment's tokens of a multi-turn batch; unchanged for a single-turn one."""
    return response_mask * batch["sampled_mask"].to(response_mask.dtype) if "sampled_mask" in batch else response_mask


@torch.no_grad()
def per_token_values(
    compute: Callable[[dict], torch.Tensor], completions: Completions, pad_id: int, device: torch.device, batch_size: int
) -> list[torch.Tensor]:
    """`compute(batch) -> (B, W)` over the whole rollout in chunks, split back into one 1-D tensor per completion."""
    out: list[torch.Tensor] = []
    total = len(completions.completion_ids)
    for start in range(0, total, batch_size):
        indices = range(start, min(start + batch_size, total))
        values = compute(training_batch(completions, indices, pad_id, device, {}, {})).float().cpu()
        for row, i in enumerate(indices):
            length = len(completions.completion_ids[i])
            out.append(values[row, values.size(1) - length :].clone())
    return out


def plan_steps(num_completions: int, steps_per_generation: int, grad_accum: int, passes: int, generator: torch.Generator) -> list[list[list[int]]]:
    """The optimiser steps one rollout feeds: `passes` shuffled passes over its completions, each cut
    into `steps_per_generation` steps of `grad_accum` micro-batches (lists of completion indices)."""
    if num_completions % (steps_per_generation * grad_accum):
        raise ValueError(f"{num_completions} completions do not split into {steps_per_generation} steps x {grad_accum} micro-batches")
    steps = []
    for _ in range(passes):
        order = torch.randperm(num_completions, generator=generator).tolist()
        per_step = num_completions // steps_per_generation
        for s in range(steps_per_generation):
            chunk = order[s * per_step : (s + 1) * per_step]
            per_micro = len(chunk) // grad_accum
            steps.append([chunk[m * per_micro : (m + 1) * per_micro] for m in range(grad_accum)])
    return steps
