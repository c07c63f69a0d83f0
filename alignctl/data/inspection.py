"""What `alignctl data inspect` shows about encoded rows: which tokens train, how long rows are, what
recipe.max_length would cut, and the chat-template mistakes that silently change what a model learns.

Rows are encoded by the training functions themselves (data/encode.py); nothing here re-derives a mask.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from transformers import PreTrainedTokenizerBase

from alignctl.core.errors import DataError
from alignctl.data.encode import IGNORE, encode_messages

# Texts no real conversation contains, to find them again in a template's rendering.
PROBE_USER, PROBE_SYSTEM, PROBE_REPLY = "Zq7 probe question", "Zq7 probe system", "Zq7 probe answer"


@dataclass
class Span:
    text: str
    trained: bool


def spans(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int], labels: Sequence[int]) -> list[Span]:
    """The row's text in runs of trained (label kept) and masked tokens, each run decoded as a whole."""
    runs: list[tuple[bool, list[int]]] = []
    for token, label in zip(ids, labels, strict=True):
        trained = label != IGNORE
        if runs and runs[-1][0] == trained:
            runs[-1][1].append(token)
        else:
            runs.append((trained, [token]))
    return [Span(tokenizer.decode(tokens, skip_special_tokens=False), trained) for trained, tokens in runs]


def trained_count(labels: Sequence[int]) -> int:
    return sum(label != IGNORE for label in labels)


def length_stats(lengths: Sequence[int]) -> dict[str, float]:
    """min / median / p95 / max of token lengths (zeros for no rows)."""
    if not len(lengths):
        return {"min": 0, "median": 0, "p95": 0, "max": 0}
    values = np.asarray(lengths)
    return {"min": int(values.min()), "median": float(np.median(values)), "p95": float(np.percentile(values, 95)), "max": int(values.max())}


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def injected_system_text(tokenizer: PreTrainedTokenizerBase) -> str:
    """Text a chat template writes into a conversation that has no system message and that a given
    system message replaces: a default system prompt ('' when there is none).

    Rendered once without a system message and once with a probe one (removed again): what the first
    rendering holds between the two renderings' common start and common end came from the template."""
    bare = _render(tokenizer, [{"role": "user", "content": PROBE_USER}])
    given = _render(tokenizer, [{"role": "system", "content": PROBE_SYSTEM}, {"role": "user", "content": PROBE_USER}])
    if PROBE_SYSTEM not in given:  # the template drops system messages: nothing to compare against
        return ""
    given = given.replace(PROBE_SYSTEM, "")
    start = len(os.path.commonprefix([bare, given]))
    bare_rest, given_rest = bare[start:], given[start:]
    end = len(os.path.commonprefix([bare_rest[::-1], given_rest[::-1]]))
    injected = bare_rest[: len(bare_rest) - end]
    return injected if any(c.isalpha() for c in injected) else ""


def template_warnings(tokenizer: PreTrainedTokenizerBase, conversational: bool, completion_only: bool) -> list[str]:
    """Warnings about the tokenizer's chat template, for data that goes through it."""
    if not conversational:
        return []
    if not getattr(tokenizer, "chat_template", None):
        return ["the tokenizer has no chat template, and conversational rows need one (use a chat/instruct model's tokenizer)"]
    found = []
    injected = injected_system_text(tokenizer)
    if injected:
        found.append(f"the chat template injects a default system prompt into conversations without one: {injected.strip()[:80]!r} "
                     "(every row trains with it; set data.system_prompt to choose it)")
    if completion_only:
        conversation = [{"role": "user", "content": PROBE_USER}, {"role": "assistant", "content": PROBE_REPLY},
                        {"role": "user", "content": PROBE_USER}, {"role": "assistant", "content": PROBE_REPLY}]
        try:
            ids, trainable = encode_messages(tokenizer, conversation)
        except DataError as err:
            found.append(f"the chat template cannot mark assistant turns ({err}); assistant-only loss needs it")
        else:
            trained = tokenizer.decode([t for t, keep in zip(ids, trainable) if keep], skip_special_tokens=True)
            if trained.count(PROBE_REPLY) != 2 or PROBE_USER in trained:
                found.append("the chat template's assistant turns do not come out as the trained tokens: "
                             f"the mask holds {trained[:80]!r}; assistant-only loss would train the wrong text")
    return found
