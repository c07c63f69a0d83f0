"""What the online RL stages (grpo, ppo, distill) share around the rollout: prompts, reward sources,
rollout statistics, the queue of steps a rollout feeds, and evaluation by greedy decoding. The log of
sample completions (a table, and samples.jsonl) is alignctl/rl/rollout_log.py."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from datasets import Dataset

from alignctl.config.schema import OnlineRLConfig, RunConfig
from alignctl.core import distributed
from alignctl.core.errors import ConfigError, DataError
from alignctl.data import loading as data_lib
from alignctl.data.encode import encode_prompt, encode_rows, fit_prompt
from alignctl.models.loading import check_reward_model, load_reward_model, load_tokenizer, model_path
from alignctl.nn.losses import aggregate, logprob_gap, rollout_correction
from alignctl.nn.varlen_attention import pays as packed_rows_pay
from alignctl.rl.environments import EnvironmentSpec, load_environment
from alignctl.rl.multi_turn import sample_episodes
from alignctl.rl.reward_sources import (
    RewardSource,
    RewardState,
    combined_rewards,
    function_sources,
    model_source,
)
from alignctl.rl.rollout import Completions, Sampling, plan_steps, sample, training_batch
from alignctl.rl.scored_text import completion_turn
from alignctl.train.evaluate import greedy_ids
from alignctl.train.reference import check_same_tokenizer
from alignctl.train.restore import to_device
from alignctl.train.stage_spec import BatchShape, HeldModel, PlanData

PROMPT_COLUMNS = ("prompt", "prompt_ids")


def encode_prompts(dataset: Dataset, tokenizer, recipe: OnlineRLConfig, cfg: RunConfig, where: str, prompts_per_rollout: int,
                   tools: list[dict] | None = None) -> Dataset:
    """Add ``prompt_ids``, keeping every column (reward functions receive them); a DataError when
    fewer prompts than one rollout needs remain. `tools`: an environment's tool declarations, which a
    chat template that takes them renders into a conversational prompt."""
    def encode(row: dict, index: int) -> dict | None:
        ids = fit_prompt(encode_prompt(tokenizer, row["prompt"], tools), recipe.max_length, cfg.data.overlong.value, f"{where}: row {index}", recipe.max_new_tokens)
        return None if ids is None else {**row, "prompt_ids": ids}

    empty = {name: None for name in dataset.column_names} | {"prompt_ids": []}
    return encode_rows(dataset, encode, empty, cfg.data.num_proc, where, recipe.max_length, minimum=prompts_per_rollout)


@dataclass
class PromptData:
    raw: Dataset  # the training prompts as loaded (its fingerprint goes into lineage)
    train: Dataset  # with prompt_ids
    eval_rows: list[dict] | None
    policy_path: str
    tokenizer: object


def environment_spec(recipe: OnlineRLConfig) -> EnvironmentSpec | None:
    """recipe.environment loaded and checked (before any model loads), or None for single-turn rollouts."""
    if recipe.environment is None:
        return None
    return load_environment(recipe.environment, dict(recipe.environment_kwargs), recipe.max_turns)


def load_prompts(cfg: RunConfig, recipe: OnlineRLConfig, prompts_per_rollout: int, environment: EnvironmentSpec | None = None) -> PromptData:
    """The starting policy's tokenizer and the encoded prompt splits (before any model loads, so bad data fails fast)."""
    raw = data_lib.load_split(cfg.data, "prompt", cfg.data.train_split)
    eval_raw = data_lib.load_eval_split(cfg.data, "prompt")
    path = model_path(cfg.model, cfg.inputs.get("policy"))
    tokenizer = load_tokenizer(path, cfg.model)
    tools = environment.tool_schemas() if environment is not None else None
    train = encode_prompts(raw, tokenizer, recipe, cfg, f"{cfg.data.path} [{cfg.data.train_split}]", prompts_per_rollout, tools)
    return PromptData(raw, train, eval_raw.to_list() if eval_raw is not None else None, path, tokenizer)


def reward_sources(cfg: RunConfig, recipe: OnlineRLConfig, policy_tokenizer, device: torch.device) -> tuple[list[RewardSource], str | None]:
    """The configured reward functions, plus the reward model of inputs.reward; and that model's path."""
    sources = function_sources(list(recipe.reward_funcs), list(recipe.reward_weights) if recipe.reward_weights is not None else None,
                               recipe.reward_timeout, recipe.reward_concurrency)
    reward_path = None
    if cfg.inputs.get("reward"):
        reward_path = model_path(cfg.model, cfg.inputs["reward"])
        check_reward_model(reward_path, cfg.model, f"inputs.reward={cfg.inputs['reward']}")
        tokenizer = load_tokenizer(reward_path, cfg.model)
        check_same_tokenizer(policy_tokenizer, tokenizer, reward_path)
        scorer = load_reward_model(reward_path, cfg.model, cfg.hardware, tokenizer.pad_token_id).to(device).eval().requires_grad_(False)
        sources.append(model_source(scorer, tokenizer, recipe.eval_batch_size, recipe.reward_model_weight, recipe.trim_top_layer))
    if not sources and recipe.environment is None:
        raise DataError("no reward: set recipe.reward_funcs and/or inputs.reward=<reward run dir> (or recipe.environment)")
    return sources, reward_path


def planned_batch(cfg: RunConfig, data: PlanData, rows: int) -> BatchShape:
    """GRPO and PPO: prompts left-padded to the longest, completions that may run to max_new_tokens."""
    def longest_prompt() -> int:
        return max(len(ids) for ids in encode_prompts(data.raw, data.tokenizer, cfg.recipe, cfg, data.where, 1)["prompt_ids"])

    prompt = data.once("longest prompt", longest_prompt)
    if cfg.recipe.environment is not None:  # a multi-turn episode may run to max_length
        new = cfg.recipe.max_length - prompt
        return BatchShape(rows, cfg.recipe.max_length, rows * new, f"{data.source} and recipe.max_length (multi-turn episodes)")
    new = cfg.recipe.max_new_tokens
    return BatchShape(rows, prompt + new, rows * new, f"{data.source} and recipe.max_new_tokens")


def packed_training(padding_free: bool | None, policy: torch.nn.Module) -> bool:
    """recipe.padding_free as this run applies it to its training forwards (alignctl/nn/prompt_groups.py).

    null: packed wherever alignctl's per-sequence attention or a flash kernel keeps the packed sequences
    apart; true where neither does (sdpa or eager attention under gradient checkpointing or with a
    sliding window) is a config error, since transformers' own mask would not keep a completion to its prompt."""
    fits = packed_rows_pay(policy)
    if padding_free and not fits:
        raise ConfigError("recipe.padding_free", "true needs a flash kernel, or sdpa or eager attention without a sliding window or "
                          "gradient checkpointing, which this model does not have; valid here: null (padded rows where it cannot run) or false")
    return fits if padding_free is None else padding_free


def held_policy(cfg: RunConfig, trained: bool = True) -> HeldModel:
    """The policy an online stage samples from (and, when `trained`, trains)."""
    path = model_path(cfg.model, cfg.inputs.get("policy"))
    return HeldModel("policy (trained)", path, trained=True, samples=True) if trained else HeldModel("policy (sampling)", path, trained=False)


def held_reward_model(cfg: RunConfig) -> list[HeldModel]:
    """inputs.reward's reward model, frozen, when one is given."""
    if not cfg.inputs.get("reward"):
        return []
    return [HeldModel("reward model (scoring)", model_path(cfg.model, cfg.inputs["reward"]), trained=False, scalar_head=True)]


def repeat_columns(rows: dict[str, list], times: int) -> dict[str, list]:
    """A batch's extra columns (not prompt or prompt ids), each value repeated for the K completions of its prompt."""
    return {name: [v for v in values for _ in range(times)] for name, values in rows.items() if name not in PROMPT_COLUMNS}


def trl_extras(completion_ids: list[list[int]], state: RewardState) -> dict:
    """What TRL passes every reward function besides prompts, completions and the dataset's columns."""
    return {"completion_ids": completion_ids, "trainer_state": state}


def score(sources: Sequence[RewardSource], prompts: list, completions: list, columns: dict[str, list]) -> tuple[torch.Tensor, dict[str, torch.Tensor], float]:
    started = time.perf_counter()
    total, per_source = combined_rewards(sources, prompts, completions, columns)
    return total, per_source, time.perf_counter() - started


def rollout_metrics(total: torch.Tensor, per_source: dict[str, torch.Tensor], completions: Completions, group_size: int) -> dict[str, float]:
    """TRL's names: reward, reward_std, rewards/<name>/mean, completions/mean_length, completions/clipped_ratio;
    and completions/length_reward_corr, what recipe.guard reads for length bias: over the tokens the policy
    wrote (a multi-turn episode's tool results are not the policy padding its answers)."""
    lengths = torch.tensor([len(c) for c in completions.completion_ids], dtype=torch.float32)
    sampled = lengths if completions.token_masks is None else torch.tensor([float(m.sum()) for m in completions.token_masks])
    metrics = {
        "reward": float(total.mean()),
        "reward_std": float(total.std()) if total.numel() > 1 else 0.0,
        "completions/mean_length": float(lengths.mean()),
        "completions/clipped_ratio": sum(completions.truncated) / len(completions.truncated),
        "completions/length_reward_corr": correlation(sampled, total.float()),
    }
    if group_size > 1:
        metrics["frac_reward_zero_std"] = float((total.view(-1, group_size).std(-1) == 0).float().mean())
    metrics |= {f"rewards/{name}/mean": float(values.mean()) for name, values in per_source.items()}
    if completions.token_masks is not None:  # multi-turn: how much of an episode the policy wrote
        metrics["completions/mean_sampled_length"] = float(sampled.mean())
        metrics["episodes/mean_turns"] = sum(model_turns(m) for m in completions.token_masks) / len(completions.token_masks)
    return metrics


def correlation(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson's r of two (N,) tensors; 0 when either is constant (all completions the same length)."""
    dx, dy = x - x.mean(), y - y.mean()
    scale = float((dx.square().sum() * dy.square().sum()).sqrt())
    return float((dx * dy).sum()) / scale if scale > 0 else 0.0


def model_turns(token_mask: torch.Tensor) -> int:
    """The policy's turns in an episode: the runs of sampled tokens in its mask."""
    starts = token_mask.bool() & ~torch.cat([token_mask.new_zeros(1), token_mask[:-1]]).bool()
    return int(starts.sum())


def evaluate_greedy(
    policy: torch.nn.Module, tokenizer, sources: Sequence[RewardSource], eval_rows: list[dict] | None, cfg: RunConfig, recipe: OnlineRLConfig,
    step: int = 0, environment: EnvironmentSpec | None = None,
) -> dict[str, float]:
    """Greedy completions of the eval prompts: eval_reward (weighted sum) and each source's mean (where
    there are reward sources) and, on a built-in task, eval_exact_match. With an `environment`, each
    completion is a greedy multi-turn episode, scored (reward sources and exact match) on its last model turn."""
    if not eval_rows:
        return {}
    prompts = [row["prompt"] for row in eval_rows]
    if environment is None:
        ids = greedy_ids(policy, tokenizer, prompts, recipe.max_new_tokens, recipe.eval_batch_size)
        texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
        extra: dict[str, list] = {}
    else:
        ids, texts, extra, env_rewards = greedy_episodes(policy, tokenizer, eval_rows, recipe, environment)
    columns = {name: [row[name] for row in eval_rows] for name in eval_rows[0] if name not in PROMPT_COLUMNS}
    columns |= trl_extras(ids, RewardState(step, recipe.max_steps)) | extra
    per_source: dict[str, torch.Tensor] = {}
    total = torch.zeros(len(eval_rows))
    if sources:
        total, per_source = combined_rewards(sources, prompts, [completion_turn(p, t) for p, t in zip(prompts, texts)], columns)
    if environment is not None:  # the same reward training maximises
        total, per_source = with_environment(total, per_source, env_rewards)
    result: dict[str, float] = {}
    if per_source:
        result = {"eval_reward": float(total.mean())} | {f"eval_rewards/{name}/mean": float(v.mean()) for name, v in per_source.items()}
    task_path = data_lib.eval_task_path(cfg.data)
    task = data_lib.builtin_task(task_path) if task_path else None
    if task is not None:
        result["eval_exact_match"] = sum(task.verify(t, row["answer"]) for t, row in zip(texts, eval_rows)) / len(eval_rows)
    if "episode" in extra:
        result["eval_episodes/mean_turns"] = sum(sum(m["role"] == "assistant" for m in e) for e in extra["episode"]) / len(eval_rows)
    return result


def greedy_episodes(policy: torch.nn.Module, tokenizer, eval_rows: list[dict], recipe: OnlineRLConfig,
                    environment: EnvironmentSpec) -> tuple[list[list[int]], list[str], dict[str, list], torch.Tensor]:
    """One greedy multi-turn episode per eval row (top-k 1: the most likely token every step), in batches
    of recipe.eval_batch_size: every episode's token ids, its last model turn, the column ``episode`` and
    the environment's reward of each episode."""
    greedy = Sampling(temperature=1.0, top_p=1.0, top_k=1, max_new_tokens=recipe.max_new_tokens, engine=recipe.rollout_engine.value,
                      max_length=recipe.max_length)
    tools = environment.tool_schemas()
    ids: list[list[int]] = []
    finals: list[str] = []
    episodes: list[list[dict]] = []
    env_rewards: list[torch.Tensor] = []
    for start in range(0, len(eval_rows), recipe.eval_batch_size):
        batch = eval_rows[start : start + recipe.eval_batch_size]
        rows = {name: [row[name] for row in batch] for name in batch[0]}
        rows["prompt_ids"] = [encode_prompt(tokenizer, p, tools) for p in rows["prompt"]]
        rollout = sample_episodes(policy, tokenizer, rows, 1, greedy, environment, recipe.max_length)
        ids += rollout.completions.completion_ids
        finals += rollout.final_turns
        episodes += rollout.episodes
        env_rewards.append(rollout.env_rewards)
    return ids, finals, {"episode": episodes}, torch.cat(env_rewards)


@dataclass
class ScoredRollout:
    rows: dict[str, list]  # the prompts' dataset rows
    prompts: list  # one per completion
    texts: list[str]  # decoded completions
    completions: Completions
    rewards: torch.Tensor  # (N,) weighted sum of the sources
    per_source: dict[str, torch.Tensor]
    times: dict[str, float]


def sample_and_score(policy: torch.nn.Module, tokenizer, rows: dict[str, list], group: int, sampling: Sampling, sources: Sequence[RewardSource],
                     state: RewardState, environment: EnvironmentSpec | None = None) -> ScoredRollout:
    """Sample `group` completions per prompt of `rows` and score them; times the two phases. With an
    `environment`, each completion is a multi-turn episode (`sample_and_score_episodes`)."""
    if environment is not None:
        return sample_and_score_episodes(policy, tokenizer, rows, group, sampling, sources, state, environment)
    started = time.perf_counter()
    completions = sample(policy, rows["prompt_ids"], group, sampling, tokenizer.pad_token_id, tokenizer.eos_token_id)
    generation_seconds = time.perf_counter() - started
    texts = tokenizer.batch_decode(completions.completion_ids, skip_special_tokens=True)
    prompts = [p for p in rows["prompt"] for _ in range(group)]
    # Reward sources get TRL's form: one assistant message per completion after a chat prompt.
    in_form = [completion_turn(p, t) for p, t in zip(prompts, texts)]
    columns = repeat_columns(rows, group) | trl_extras(completions.completion_ids, state)
    rewards, per_source, scoring_seconds = score(sources, prompts, in_form, columns)
    return ScoredRollout(rows, prompts, texts, completions, rewards, per_source, {"time/generation": generation_seconds, "time/scoring": scoring_seconds})


def sample_and_score_episodes(policy: torch.nn.Module, tokenizer, rows: dict[str, list], group: int, sampling: Sampling,
                              sources: Sequence[RewardSource], state: RewardState, environment: EnvironmentSpec) -> ScoredRollout:
    """Multi-turn episodes (alignctl/rl/multi_turn.py), rewarded by the environment (the sum of its steps,
    logged as the source ``environment``) plus the reward sources, which read each episode's last model
    turn in the prompt's form, with the whole episode's messages in the column ``episode``."""
    started = time.perf_counter()
    episodes = sample_episodes(policy, tokenizer, rows, group, sampling, environment, sampling.max_length)
    generation_seconds = time.perf_counter() - started
    completions = episodes.completions
    texts = tokenizer.batch_decode(completions.completion_ids, skip_special_tokens=True)
    prompts = [p for p in rows["prompt"] for _ in range(group)]
    in_form = [completion_turn(p, t) for p, t in zip(prompts, episodes.final_turns)]
    columns = repeat_columns(rows, group) | trl_extras(completions.completion_ids, state) | {"episode": episodes.episodes}
    rewards, per_source, scoring_seconds = score(sources, prompts, in_form, columns) if sources else (torch.zeros(len(texts)), {}, 0.0)
    rewards, per_source = with_environment(rewards, per_source, episodes.env_rewards)
    # Logged with the times (the first step of a rollout; dynamic sampling adds its draws' up): what keeping
    # KV caches between turns saves shows here (alignctl/rl/multi_turn.py).
    times = {"time/generation": generation_seconds, "time/scoring": scoring_seconds, "rollout/prefill_tokens": float(episodes.prefill_tokens)}
    return ScoredRollout(rows, prompts, texts, completions, rewards, per_source, times)


def with_environment(total: torch.Tensor, per_source: dict[str, torch.Tensor], env_rewards: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The reward sources' total plus the environment's own rewards, which are logged as the source ``environment``."""
    return total + env_rewards, per_source | {"environment": env_rewards}


class StepQueue:
    """The optimiser steps rollouts feed, one step at a time: each rollout gives `passes` shuffled
    passes of recipe.steps_per_generation steps over its completions. The rollout count and the steps
    left travel with every checkpoint (`state` / `restore`), so a resumed run trains on the same samples.

    `items(batch)` counts what the stage's loss is a mean over (tokens or completions)."""

    def __init__(self, recipe: OnlineRLConfig, passes: int, seed: int, device: torch.device, pad_id: int, items: Callable[[dict], int]):
        self.recipe, self.passes, self.seed, self.device, self.pad_id, self.items = recipe, passes, seed, device, pad_id, items
        self.pending: deque[list[dict]] = deque()
        self.rollouts = 0  # rollouts sampled so far, this one included once `start_rollout` ran

    def start_rollout(self) -> RewardState:
        """Count a new rollout; where training stands for its reward functions (TRL's trainer_state)."""
        self.rollouts += 1
        steps_before = (self.rollouts - 1) * self.recipe.steps_per_generation * self.passes
        return RewardState(steps_before, self.recipe.max_steps)

    def add(self, rollout: ScoredRollout, per_token: dict[str, list[torch.Tensor]], per_sequence: dict[str, torch.Tensor], stats: dict[str, float]) -> None:
        """Queue the steps of the rollout just started; every step carries its statistics, the first also its times."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.rollouts)
        steps = plan_steps(len(rollout.texts), self.recipe.steps_per_generation, self.recipe.grad_accum, self.passes, generator)
        for n, step in enumerate(steps):
            micro = [training_batch(rollout.completions, indices, self.pad_id, self.device, per_token, per_sequence) for indices in step]
            for batch in micro:
                batch["num_items"] = self.items(batch)
            micro[0]["rollout_metrics"] = stats | (rollout.times if n == 0 else {})
            self.pending.append(micro)

    def next(self, new_rollout: Callable[[], None]) -> list[dict]:
        """The next step's micro-batches, sampling a new rollout (`new_rollout`) when none are left."""
        if not self.pending:
            new_rollout()
        return self.pending.popleft()

    def state(self) -> dict:
        return {"rollouts": self.rollouts, "pending": list(self.pending)}

    def restore(self, state: dict) -> None:
        self.rollouts = state["rollouts"]
        self.pending.extend(to_device(state["pending"], self.device))


def rollout_metric_shares(batch: dict) -> dict[str, torch.Tensor]:
    """The rollout statistics a micro-batch carries, as metrics the loop adds up (float64: exact values).
    Each process's rollout counts 1/world_size, so the sum over processes is their mean (a `_max`
    metric is not scaled: the loop takes its max)."""
    share = 1.0 / distributed.current().world_size
    return {k: torch.tensor(v if distributed.is_max_metric(k) else v * share, dtype=torch.float64) for k, v in batch.get("rollout_metrics", {}).items()}


def with_sampler_logps(per_token: dict[str, list[torch.Tensor]], completions: Completions) -> dict[str, list[torch.Tensor]]:
    """A rollout's per-token values plus the sampler's log-probs (`sampler_logps`), where the engine gave them."""
    if completions.sampler_logps is not None:
        per_token["sampler_logps"] = completions.sampler_logps
    return per_token


def rollout_correction_terms(recipe: OnlineRLConfig, batch: dict, old_logps: torch.Tensor, mask: torch.Tensor, level: str,
                             num_items: int) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """A micro-batch's sampler/trainer mismatch, as step-metric shares (`level`: the loss's aggregation),
    and the importance weights of recipe.rollout_is for its policy-gradient loss (None: off, or an engine
    without log-probs). `old_logps`: the trainer's log-probs of the sampled tokens before the update."""
    if "sampler_logps" not in batch:
        return None, {}
    sampler, old = batch["sampler_logps"], old_logps.detach()
    metrics = {"rollout/logprob_diff": aggregate((old.float() - sampler.float()).abs(), mask, level, num_items),
               "rollout/logprob_diff_max": logprob_gap(old, sampler, mask)["rollout/logprob_diff_max"]}
    if recipe.rollout_is.value == "off":
        return None, metrics
    weights, stats = rollout_correction(old, sampler, mask, recipe.rollout_is.value, recipe.rollout_is_level.value, recipe.rollout_is_cap)
    metrics |= {"rollout/is_weight_mean": aggregate(weights, mask, level, num_items),
                "rollout/is_masked_frac": aggregate(((weights == 0) & mask.bool()).float(), mask, level, num_items),
                "rollout/is_weight_max": stats["rollout/is_weight_max"]}
    return weights, metrics


def greedy_evaluator(policy: torch.nn.Module, tokenizer, sources: Sequence[RewardSource], eval_rows: list[dict] | None, cfg: RunConfig,
                     recipe: OnlineRLConfig, logger, environment: EnvironmentSpec | None = None) -> Callable[[int], dict[str, float]]:
    """Evaluation every recipe.eval_every steps: greedy, in multi-turn episodes where an `environment` is given."""
    @torch.no_grad()
    def evaluate(step: int) -> dict[str, float]:
        result = evaluate_greedy(policy, tokenizer, sources, eval_rows, cfg, recipe, step, environment)
        if result:
            logger.note(f"step {step}: " + "  ".join(f"{k}={v:.4f}" for k, v in result.items()))
        return result

    return evaluate


def completion_tokens(batch: dict) -> int:
    """The tokens a token-level mean is over: those the policy sampled (never an environment's)."""
    return int(batch["sampled_mask"].sum()) if "sampled_mask" in batch else int(batch["response_mask"].sum())


def completion_count(batch: dict) -> int:
    return int(batch["input_ids"].size(0))
