"""alignctl.rl.scored_text with the char tokenizer (pad <> EOS): the text a reward model scores is built,
and read, the same way in reward training (stages/reward.py) and in rollout scoring (rewards.model_source).
The same on SmolLM2 (pad = EOS): tests/integration/real/test_reward_scoring.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForSequenceClassification

from alignctl.rl.reward_sources import model_source
from alignctl.rl.scored_text import completion_turn, padded, read_positions, scored_ids, sequence_scores
from alignctl.stages.reward import encode_pairs, pair_batch

CHAT = [{"role": "user", "content": "1+2="}]


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_a_text_answer_to_a_chat_prompt_becomes_an_assistant_message():
    assert completion_turn(CHAT, "3") == [{"role": "assistant", "content": "3"}]
    assert completion_turn("1+2=", "3") == "3"
    message = [{"role": "assistant", "content": "3"}]
    assert completion_turn(CHAT, message) is message


def test_scored_ids_by_hand(tok):
    # A chat prompt: the template closes the assistant turn with <|end|>, then EOS (the template's end is not EOS).
    assert scored_ids(tok, CHAT, "3") == ids(tok, "<|user|>1+2=<|end|><|assistant|>3<|end|></s>")
    assert scored_ids(tok, CHAT, [{"role": "assistant", "content": "3"}]) == scored_ids(tok, CHAT, "3")
    # A plain prompt: the text, then EOS.
    assert scored_ids(tok, "1+2=", "3") == ids(tok, "1+2=3</s>")


def test_the_read_position_is_the_last_real_token_on_either_side(tok):
    sequences = [scored_ids(tok, CHAT, "3"), scored_ids(tok, "1+2=", "300")]
    for side in ("right", "left"):
        input_ids, mask = padded(sequences, tok.pad_token_id, side)
        read = read_positions(input_ids, tok.pad_token_id)
        assert input_ids[torch.arange(2), read].tolist() == [tok.eos_token_id] * 2  # pad <> EOS: EOS is read
        assert mask[torch.arange(2), read].tolist() == [1, 1]


def scorer(tok) -> LlamaForSequenceClassification:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=128, attn_implementation="sdpa", num_labels=1,
                         pad_token_id=tok.pad_token_id)
    model = LlamaForSequenceClassification(config).eval()
    torch.nn.init.normal_(model.score.weight, std=1.0)  # a visible score, not one near zero
    return model


def training_scores(model, tok, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of chosen and rejected as recipe=reward computes them in training and eval."""
    recipe = SimpleNamespace(max_length=256)
    cfg = SimpleNamespace(data=SimpleNamespace(overlong=SimpleNamespace(value="error"), num_proc=None))
    encoded = encode_pairs(Dataset.from_list(rows), tok, recipe, cfg, "test")
    batch = pair_batch(encoded[:], tok.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        scores, _ = sequence_scores(model, batch["input_ids"], batch["attention_mask"], tok.pad_token_id)
    return scores[: len(rows)], scores[len(rows) :]


PAIRS = [  # answers of different lengths, so every batch is padded
    {"prompt": [{"role": "user", "content": "12+30="}], "chosen": [{"role": "assistant", "content": "42"}],
     "rejected": [{"role": "assistant", "content": "forty-three, I think"}]},
    {"prompt": [{"role": "user", "content": "Say hi"}], "chosen": [{"role": "assistant", "content": "hi"}],
     "rejected": [{"role": "assistant", "content": "no"}]},
]


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("trim", [True, False])
def test_rollout_scores_equal_training_scores_for_chat_prompts(tok, side, trim):
    model = scorer(tok)
    chosen, rejected = training_scores(model, tok, PAIRS)
    tok.padding_side = side
    source = model_source(model, tok, batch_size=4, weight=1.0, trim_top_layer=trim)
    prompts = [row["prompt"] for row in PAIRS] * 2
    texts = [row[answer][0]["content"] for answer in ("chosen", "rejected") for row in PAIRS]  # decoded text, as a rollout has it
    expected = torch.cat([chosen, rejected])
    # Decoded text and TRL's message form score alike, and as trained.
    torch.testing.assert_close(source.score(prompts, texts, {}), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(source.score(prompts, [completion_turn(p, t) for p, t in zip(prompts, texts)], {}), expected,
                               atol=1e-5, rtol=1e-5)
    assert expected.std() > 1e-3  # the scores differ, so the comparison could fail


def test_rollout_scores_equal_training_scores_for_plain_prompts(tok):
    model = scorer(tok)
    rows = [{"prompt": "12+30=", "chosen": "42", "rejected": "forty-three"}, {"prompt": "7*6=", "chosen": "42", "rejected": "4"}]
    chosen, rejected = training_scores(model, tok, rows)
    source = model_source(model, tok, batch_size=3, weight=1.0)
    scores = source.score([r["prompt"] for r in rows] * 2, [r["chosen"] for r in rows] + [r["rejected"] for r in rows], {})
    torch.testing.assert_close(scores, torch.cat([chosen, rejected]), atol=1e-5, rtol=1e-5)


def test_a_text_answer_in_a_chat_training_row_is_trained_as_an_assistant_turn(tok):
    model = scorer(tok)
    as_text = [{"prompt": row["prompt"], "chosen": row["chosen"][0]["content"], "rejected": row["rejected"][0]["content"]} for row in PAIRS]
    for got, want in zip(training_scores(model, tok, as_text), training_scores(model, tok, PAIRS)):
        torch.testing.assert_close(got, want)
