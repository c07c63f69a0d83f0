"""Greedy generation and exact-match accuracy on a verifiable task's held-out prompts."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from alignctl.data.batching import pad
from alignctl.data.encode import encode_prompt
from alignctl.data.loading import builtin_task


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence,
    max_new_tokens: int,
    batch_size: int,
) -> list[str]:
    """Greedy completions (decoded, special tokens removed) for `prompts`, batched with a KV cache."""
    return tokenizer.batch_decode(greedy_ids(model, tokenizer, prompts, max_new_tokens, batch_size), skip_special_tokens=True)


@torch.no_grad()
def greedy_ids(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence,
    max_new_tokens: int,
    batch_size: int,
) -> list[list[int]]:
    """Greedy completion token ids for `prompts`, each through its EOS (or max_new_tokens long)."""
    model.eval()
    device = next(model.parameters()).device
    completions: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        ids = [encode_prompt(tokenizer, p) for p in prompts[start : start + batch_size]]
        # Left padding keeps every prompt's last token at the same position, where generation starts.
        input_ids = pad(ids, tokenizer.pad_token_id, side="left").to(device)
        attention_mask = pad([[1] * len(s) for s in ids], 0, side="left").to(device)
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        for row in out[:, input_ids.size(1) :].tolist():  # rows that stopped early are padded after their EOS
            completions.append(row[: row.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in row else row)
    return completions


def exact_match(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[dict],
    verify: Callable[[str, str], bool],
    max_new_tokens: int,
    batch_size: int,
) -> tuple[float, list[str]]:
    """Share of rows whose greedy completion the task's verifier accepts, and the completions."""
    completions = generate(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens, batch_size)
    correct = sum(verify(c, r["answer"]) for c, r in zip(completions, rows))
    return correct / max(len(rows), 1), completions


def task_accuracy(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, task_path: str | None, rows: list[dict] | None, max_new_tokens: int, batch_size: int) -> dict[str, float]:
    """{"eval_exact_match": ...} on a built-in task's held-out rows; {} for other data."""
    if not rows:
        return {}
    accuracy, _ = exact_match(model, tokenizer, rows, builtin_task(task_path).verify, max_new_tokens, batch_size)
    return {"eval_exact_match": accuracy}
