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
from alignctl.nn.last_token import read_positions, top_layer_at_last_token

__all__ = ["completion_turn", "scored_ids", "padded", "sequence_scores", "read_positions"]


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
