"""Multi-turn episodes on SmolLM2's ChatML template: a reply is a `tool` message between the model's
turn and the next assistant header, and an episode's sampler log-probs are those of one forward."""

from __future__ import annotations

import torch

from alignctl.data.encode import encode_prompt
from alignctl.nn.logprobs import response_token_logps
from alignctl.rl.environments import EnvironmentSpec, StepResult
from alignctl.rl.multi_turn import reply_text, sample_episodes
from alignctl.rl.online_rl import model_turns
from alignctl.rl.rollout import Sampling, policy_mask, training_batch
from alignctl.rl.tools import call_format


class TwoReplies:
    def __init__(self):
        self.turns = 0

    def reset(self, row: dict) -> None:
        pass

    def step(self, turn: str) -> StepResult:
        self.turns += 1
        return StepResult("7", self.turns >= 3, 0.0)


def test_a_tool_reply_is_rendered_by_chatml(smollm2):
    _, tok = smollm2
    conversation = [{"role": "user", "content": "1+2="}, {"role": "assistant", "content": "<tool>calculator: 1+2</tool>"}]
    # The model wrote <|im_end|> itself: the template's "\n" after it comes first, then the tool turn and the header.
    assert reply_text(tok, conversation, "<|im_end|>", "3") == "\n<|im_start|>tool\n3<|im_end|>\n<|im_start|>assistant\n"
    assert reply_text(tok, conversation, "", "3") == "<|im_end|>\n<|im_start|>tool\n3<|im_end|>\n<|im_start|>assistant\n"
    assert call_format(tok.chat_template) == "plain"  # SmolLM2's template declares no tool-call markup


def test_a_chatml_episode_s_log_probs_equal_one_forward(smollm2):
    model, tok = smollm2
    torch.manual_seed(0)
    prompts = [[{"role": "user", "content": "What is 12+30?"}]]
    rows = {"prompt": prompts, "prompt_ids": [encode_prompt(tok, p) for p in prompts]}
    spec = EnvironmentSpec("TwoReplies", TwoReplies, 3, [])
    episodes = sample_episodes(model, tok, rows, 2, Sampling(1.0, 1.0, 0, 5, "hf"), spec, max_length=200)
    completions = episodes.completions
    assert [model_turns(m) for m in completions.token_masks] == [3, 3]
    batch = training_batch(completions, [0, 1], tok.pad_token_id, torch.device("cpu"), {"sampler_logps": completions.sampler_logps}, {})
    with torch.no_grad():
        logps, response_mask, _ = response_token_logps(model, batch)
    sampled = policy_mask(batch, response_mask)
    torch.testing.assert_close(logps * sampled, batch["sampler_logps"] * sampled, atol=2e-4, rtol=1e-4)
    replies = tok.decode([t for t, m in zip(completions.completion_ids[0], completions.token_masks[0].tolist()) if m == 0])
    assert replies.count("<|im_start|>tool\n7<|im_end|>\n<|im_start|>assistant\n") == 2
