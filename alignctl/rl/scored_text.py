"""What a reward model reads: the text of (prompt, completion) and the position of its score.

Reward training (alignctl/stages/reward.py, train and eval) and rollout scoring in PPO and GRPO
(alignctl/rl/reward_sources.py `model_source`) both go through this module, so the score used as a reward is the
score that was trained:

- The text is the prompt's tokens followed by the completion in the prompt's form
  (`completion_turn`): after a conversational prompt the completion is one assistant message,
  rendered by the chat template as it closes a turn (ChatML: ``answer<|im_end|>\\n``); after a plain
  prompt it is the text followed by EOS. A rollout's completion is decoded text, so it is turned into
  that message here: appending EOS to the text instead (the old rollout path) gave
  ``answer<|im_end|>`` where training had ``answer<|im_end|>\\n``.
- The position is the one transformers' sequence classifiers pool at: each row's rightmost token that
  is not the pad id (`alignctl.nn.last_token.read_positions`). It is the same for left and right padding.
  When pad = EOS, trailing EOS tokens count as padding, so ``…<|im_end|>\\n`` is read at the
  ``\\n`` and a plain ``answer</s>`` at the answer's last token; both paths then read the same token
  because they build the same ids, and so does anyone who loads the checkpoint with transformers.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from alignctl.data.batching import pad
from alignctl.data.encode import Messages, encode_completion, encode_prompt
from alignctl.nn.last_token import packed_reads, read_positions, top_layer_at, top_layer_at_last_token
from alignctl.nn.model_parts import backbone, unwrapped
from alignctl.nn.varlen_attention import packed_attention, sequence_bounds
from alignctl.nn.varlen_attention import pays as packed_layout_pays

__all__ = ["completion_turn", "scored_ids", "padded", "sequence_scores", "read_positions", "packed", "packed_scores", "packed_scoring_pays",
           "has_score_head"]


def completion_turn(prompt: str | Messages, completion: str | Messages) -> str | Messages:
    """The completion in its prompt's form: one assistant message after a conversational prompt
    (TRL's form, ``[{"role": "assistant", "content": text}]``), the text itself after a plain one."""
    if isinstance(prompt, list) and isinstance(completion, str):
        return [{"role": "assistant", "content": completion}]
    return completion


def scored_ids(tokenizer, prompt: str | Messages, completion: str | Messages) -> list[int]:
    """Token ids of (prompt, completion) as reward training encodes a pair's side (alignctl.data.encode)."""
    return encode_prompt(tokenizer, prompt) + encode_completion(tokenizer, prompt, completion_turn(prompt, completion))


def padded(sequences: list[list[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of token-id lists padded on `side`."""
    return pad(sequences, pad_id, side=side), pad([[1] * len(s) for s in sequences], 0, side=side)


def sequence_scores(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_id: int | None,
                    trim_top_layer: bool = True, **kwargs) -> tuple[torch.Tensor, object]:
    """Each row's score (B,) in float32, and the model's output (`kwargs` go to the forward).

    Position ids count real tokens only, so a left-padded row is encoded exactly as it is alone.
    With `trim_top_layer` the top layer runs at the read position only (alignctl/nn/last_token.py)."""
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    trimmed = top_layer_at_last_token(model, input_ids, attention_mask, pad_id) if trim_top_layer else nullcontext()
    with trimmed:
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False, **kwargs)
    return out.logits.squeeze(-1).float(), out


def packed(sequences: list[list[int]], pad_id: int | None) -> dict[str, torch.Tensor]:
    """Token-id lists end to end in one row: input_ids and position_ids (1, T), position ids restarting at
    0 for each sequence (where each starts: `sequence_bounds`), and the column each sequence's score is
    read at (`read_at`, (sequences,)), the position `read_positions` gives the sequence alone."""
    read_at, offset = [], 0
    for ids in sequences:
        real = [i for i, token in enumerate(ids) if token != pad_id] if pad_id is not None else [len(ids) - 1]
        read_at.append(offset + (real[-1] if real else 0))
        offset += len(ids)
    return {
        "input_ids": torch.tensor([[token for ids in sequences for token in ids]]),
        "position_ids": torch.tensor([[i for ids in sequences for i in range(len(ids))]]),
        "read_at": torch.tensor(read_at),
    }


def packed_scoring_pays(model: torch.nn.Module) -> bool:
    """Whether `packed_scores` is faster than `sequence_scores` on padded rows for this model: its
    attention keeps packed sequences apart without a mask over the whole row
    (alignctl.nn.varlen_attention.pays), and its head is a decoder classifier's ``score`` layer."""
    return packed_layout_pays(model) and has_score_head(model)


def has_score_head(model: torch.nn.Module) -> bool:
    """Whether the classifier's head is a ``score`` layer (transformers' decoder classifiers: Llama, Qwen, ...)."""
    return isinstance(getattr(unwrapped(model), "score", None), torch.nn.Module)


def packed_scores(model: torch.nn.Module, batch: dict[str, torch.Tensor], trim_top_layer: bool = True) -> torch.Tensor:
    """`sequence_scores` for a `packed` batch: each sequence's score (sequences,) in float32, with
    attention kept within each sequence (alignctl/nn/varlen_attention.py), so no padding is computed.
    The classifier's own forward pools one position a row, so the decoder runs alone and its ``score``
    head is applied at the read columns."""
    reads = packed_reads(batch["read_at"], sequence_bounds(batch["position_ids"])[:-1], batch["input_ids"].size(1))
    trimmed = top_layer_at(model, reads) if trim_top_layer else nullcontext()
    with packed_attention(model, batch["position_ids"]), trimmed:
        hidden = backbone(model)(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).last_hidden_state
    return unwrapped(model).score(hidden[0, batch["read_at"]]).squeeze(-1).float()
