"""The widest micro-batch a run will put through its trained model, from the data's own token lengths.

`plan` sizes activations from this shape rather than from recipe.max_length: real rows are often far
shorter than the limit, and activations grow with the padded width of the widest batch. The rows are
encoded by the stage's own functions (so the lengths are exactly the ones the run will see, and
`datasets` caches the encoding for the run). Where the data cannot be read here (a hub dataset
offline, a tokenizer not downloaded) or the stage is not covered, the shape falls back to
recipe.max_length and says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from alignctl.errors import UserError


@dataclass(frozen=True)
class BatchShape:
    rows: int  # sequences in one micro-batch of the trained model
    width: int  # padded tokens per sequence
    positions: int  # positions that reach the output layer (the loss positions)
    source: str  # how it was sized, printed by plan


def from_max_length(cfg: Any, rows: int, reason: str) -> BatchShape:
    width = getattr(cfg.recipe, "max_length", 0)
    return BatchShape(rows, width, rows * width, f"recipe.max_length ({reason})")


def longest(lengths: list[int], count: int) -> list[int]:
    return sorted(lengths, reverse=True)[:count]


def batch_shape(cfg: Any, tokenizer_path: str) -> BatchShape:
    """The shape of the widest micro-batch of the trained model (policy, or reward model)."""
    recipe, stage = cfg.recipe, cfg.recipe.stage
    rows = 2 * recipe.batch_size if stage in ("dpo", "reward") else recipe.batch_size
    if stage not in ("sft", "dpo", "reward", "kto", "grpo", "ppo"):
        return from_max_length(cfg, rows, f"recipe={stage} is not sized from its data")
    try:
        return _from_data(cfg, tokenizer_path, rows)
    except (UserError, OSError, ValueError) as err:
        return from_max_length(cfg, rows, f"the data could not be read here: {str(err).strip().splitlines()[0][:120]}")


def _from_data(cfg: Any, tokenizer_path: str, rows: int) -> BatchShape:
    from alignctl import data as data_lib
    from alignctl.models import load_tokenizer

    recipe, stage = cfg.recipe, cfg.recipe.stage
    tokenizer = load_tokenizer(tokenizer_path, cfg.model)
    where = f"{cfg.data.path} [{cfg.data.train_split}]"
    fmt = {"sft": "sft", "dpo": "preference", "reward": "preference", "kto": "feedback", "grpo": "prompt", "ppo": "prompt"}[stage]
    raw = data_lib.load_split(cfg.data, fmt, cfg.data.train_split)
    source = f"the {len(raw):,} training rows' token lengths"
    if stage == "sft":
        from alignctl.encode import IGNORE
        from alignctl.stages.sft import encode_split

        encoded = encode_split(raw, tokenizer, recipe, cfg, where)[0]
        if recipe.packing:
            return BatchShape(rows, recipe.max_length, rows * recipe.max_length, "packed blocks of recipe.max_length")
        labelled = sorted(((len(ids), sum(t != IGNORE for t in labels)) for ids, labels in zip(encoded["input_ids"], encoded["labels"])), reverse=True)[:rows]
        positions = sum(n for _, n in labelled)
        if recipe.padding_free:  # the rows end to end in one sequence
            return BatchShape(1, sum(length for length, _ in labelled), positions, source)
        return BatchShape(len(labelled), labelled[0][0], positions, source)
    if stage == "dpo":
        from alignctl.stages.dpo import encode_pairs

        encoded = encode_pairs(raw, tokenizer, recipe, cfg, where)
        responses = [max(len(c), len(r)) for c, r in zip(encoded["chosen_ids"], encoded["rejected_ids"])]
        pairs = min(recipe.batch_size, len(responses))
        # Left-padded prompts, right-padded responses: the width is the longest prompt plus the longest response.
        prompt, response = max(len(p) for p in encoded["prompt_ids"]), max(responses)
        return BatchShape(2 * pairs, prompt + response, 2 * pairs * response, source)
    if stage == "reward":
        from alignctl.stages.reward import encode_pairs as encode_scored_pairs

        encoded = encode_scored_pairs(raw, tokenizer, recipe, cfg, where)
        sides = longest([len(ids) for side in ("chosen", "rejected") for ids in encoded[side]], rows)
        # Chosen and rejected sequences right-padded together; one score is read per sequence.
        return BatchShape(len(sides), sides[0], len(sides), source)
    if stage == "kto":
        from alignctl.stages.kto import encode_feedback

        encoded = encode_feedback(raw, tokenizer, recipe, cfg, where)
        # The trained half (the mismatched half runs without gradient): whole sequences left-padded.
        widest = longest([len(p) + len(c) for p, c in zip(encoded["prompt_ids"], encoded["completion_ids"])], rows)
        completion = max(len(c) for c in encoded["completion_ids"])
        return BatchShape(len(widest), widest[0], len(widest) * completion, source)
    from alignctl.online_rl import encode_prompts

    encoded = encode_prompts(raw, tokenizer, recipe, cfg, where, 1)
    prompt = max(len(ids) for ids in encoded["prompt_ids"])
    # Completions may run to max_new_tokens; the prompts are left-padded to the longest.
    return BatchShape(rows, prompt + recipe.max_new_tokens, rows * recipe.max_new_tokens, f"{source} and recipe.max_new_tokens")
