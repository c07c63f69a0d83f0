"""On-policy preference pairs: the data step of iterative (online) DPO.

Trains: nothing. Samples ``num_generations`` completions for each of ``num_prompts`` prompts from
the policy (``inputs.policy`` or ``model``), scores them with the rewards of ``recipe.reward_funcs``
and/or the reward model of ``inputs.reward``, and keeps, per prompt, the best completion as chosen
and the worst as rejected; a prompt whose completions all score the same gives no pair.
Writes: data.jsonl (prompt/chosen/rejected, plus each pair's reward gap as ``margin``), eval.json and
lineage.json with the sampling statistics. A DPO stage trains on it with ``inputs.data=<this run>``.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import torch
from omegaconf import DictConfig

from alignctl.config.schema import PairsConfig, RunConfig
from alignctl.core.console import console
from alignctl.core.errors import DataError
from alignctl.data import loading as data_lib
from alignctl.models.loading import load_causal_lm, load_tokenizer, model_path
from alignctl.rl.online_rl import (
    encode_prompts,
    held_policy,
    held_reward_model,
    repeat_columns,
    reward_sources,
    score,
    trl_extras,
)
from alignctl.rl.reward_sources import RewardState
from alignctl.rl.rollout import Sampling, sample
from alignctl.rl.scored_text import completion_turn
from alignctl.runs.rundir import RunDir, write_json_atomic
from alignctl.train.metrics import summary_table
from alignctl.train.session import start_process
from alignctl.train.stage_spec import HeldModel, Stage


def best_and_worst(prompts: list, texts: list, rewards: torch.Tensor, group: int) -> list[dict]:
    """One pair per prompt whose K completions do not all score the same: the highest against the lowest."""
    pairs = []
    for start in range(0, len(texts), group):
        scores = rewards[start : start + group]
        best, worst = start + int(scores.argmax()), start + int(scores.argmin())
        if scores[best - start] > scores[worst - start] and texts[best] != texts[worst]:
            pairs.append({"prompt": prompts[start], "chosen": texts[best], "rejected": texts[worst], "margin": float(scores.max() - scores.min())})
    return pairs


def held_models(cfg: RunConfig) -> list[HeldModel]:
    return [held_policy(cfg, trained=False), *held_reward_model(cfg)]


def run(cfg: RunConfig, raw: DictConfig, run_dir: Path) -> dict[str, float]:
    recipe: PairsConfig = cfg.recipe
    device = start_process(cfg)

    prompts_raw = data_lib.load_split(cfg.data, "prompt", cfg.data.train_split)
    chosen_rows = sorted(random.Random(cfg.seed).sample(range(len(prompts_raw)), min(recipe.num_prompts, len(prompts_raw))))
    prompts_raw = prompts_raw.select(chosen_rows)
    path = model_path(cfg.model, cfg.inputs.get("policy"))
    tokenizer = load_tokenizer(path, cfg.model)
    prompts = encode_prompts(prompts_raw, tokenizer, recipe, cfg, f"{cfg.data.path} [{cfg.data.train_split}]", 1)
    sources, _ = reward_sources(cfg, recipe, tokenizer, device)
    policy = load_causal_lm(path, cfg.model, cfg.hardware).eval()
    run = RunDir(run_dir, raw, "pairs", cfg.inputs, data_fingerprint=prompts_raw._fingerprint)
    sampling = Sampling(recipe.temperature, recipe.top_p, recipe.top_k, recipe.max_new_tokens, recipe.rollout_engine.value, recipe.max_length)
    K = recipe.num_generations

    pairs: list[dict] = []
    reward_sum, completions = 0.0, 0
    try:
        for start in range(0, len(prompts), recipe.batch_size):
            rows = prompts[start : start + recipe.batch_size]
            sampled = sample(policy, rows["prompt_ids"], K, sampling, tokenizer.pad_token_id, tokenizer.eos_token_id)
            texts = tokenizer.batch_decode(sampled.completion_ids, skip_special_tokens=True)
            repeated = [p for p in rows["prompt"] for _ in range(K)]
            # TRL's forms: after a chat prompt a completion is one assistant message, in scoring and in the pairs written.
            in_form = [completion_turn(p, t) for p, t in zip(repeated, texts)]
            columns = repeat_columns(rows, K) | trl_extras(sampled.completion_ids, RewardState(0, 0))  # this stage takes no optimiser step
            rewards, _, _ = score(sources, repeated, in_form, columns)
            pairs += best_and_worst(repeated, in_form, rewards, K)
            reward_sum, completions = reward_sum + float(rewards.sum()), completions + len(texts)
        if not pairs:
            raise DataError(f"pairs: all {K} completions of every prompt scored the same; nothing to prefer (raise temperature or num_generations)")
    except BaseException as err:
        run.fail(f"{type(err).__name__}: {err}")
        raise
    tmp = run_dir / f".data.jsonl.tmp-{os.getpid()}"
    tmp.write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    os.replace(tmp, run_dir / "data.jsonl")
    stats = {"pairs": len(pairs), "prompts": len(prompts), "pair_fraction": len(pairs) / len(prompts), "sampled_reward": reward_sum / completions}
    write_json_atomic(run_dir / "eval.json", {"step": 0, **stats})
    run.finish(stats)
    console.print(summary_table("pairs written", stats))
    console.print(f"run directory: {run_dir}\ndata: {run_dir / 'data.jsonl'}")
    return stats


STAGE = Stage("pairs", run, held_models)
