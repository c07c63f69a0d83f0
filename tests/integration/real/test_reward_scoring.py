"""On SmolLM2 (pad = EOS = <|im_end|>), a reward model scores a (prompt, answer) in PPO/GRPO rollout
scoring exactly as recipe=reward trained and evaluated it: the same text (``…answer<|im_end|>\\n``) read
at the same token (the ``\\n``), with right or left padding, in a batch of different lengths."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from alignctl.data.encode import encode_completion, encode_prompt
from alignctl.rl.reward_sources import model_source
from alignctl.rl.scored_text import padded, read_positions, scored_ids, sequence_scores
from alignctl.stages.reward import encode_pairs, pair_batch

PAIRS = [
    {"prompt": [{"role": "user", "content": "What is the capital of France?"}],
     "chosen": [{"role": "assistant", "content": "Paris."}],
     "rejected": [{"role": "assistant", "content": "I believe it is Lyon, the second largest city of France."}]},
    {"prompt": [{"role": "user", "content": "Name a primary colour."}],
     "chosen": [{"role": "assistant", "content": "Red"}],
     "rejected": [{"role": "assistant", "content": "Green, probably."}]},
]


@pytest.fixture(scope="module")
def reward_model(smollm2_dir):
    """SmolLM2's body with a fresh scalar head (random, fixed seed): a reward model before training."""
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(smollm2_dir, num_labels=1, dtype=torch.float32).eval()
    model.config.pad_token_id = tok.pad_token_id
    return model, tok


def training_scores(model, tok) -> torch.Tensor:
    """Chosen then rejected scores, as recipe=reward computes them (encode_pairs, pair_batch, the forward)."""
    recipe = SimpleNamespace(max_length=512)
    cfg = SimpleNamespace(data=SimpleNamespace(overlong=SimpleNamespace(value="error"), num_proc=None))
    batch = pair_batch(encode_pairs(Dataset.from_list(PAIRS), tok, recipe, cfg, "test")[:], tok.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        return sequence_scores(model, batch["input_ids"], batch["attention_mask"], tok.pad_token_id)[0]


def test_the_scored_text_ends_the_turn_as_training_does_and_is_read_at_its_last_token(reward_model):
    _, tok = reward_model
    ids = scored_ids(tok, PAIRS[0]["prompt"], "Paris.")
    assert tok.decode(ids).endswith("<|im_start|>assistant\nParis.<|im_end|>\n")
    for side in ("right", "left"):
        input_ids, _ = padded([ids, ids[:-9]], tok.pad_token_id, side)
        read = read_positions(input_ids, tok.pad_token_id)
        # pad = EOS: the classifier skips trailing <|im_end|> tokens, so the newline after the turn must be there.
        assert tok.decode(input_ids[0, read[0]]) == "\n"


def test_rollout_scores_equal_training_scores_with_either_padding(reward_model):
    model, tok = reward_model
    expected = training_scores(model, tok)
    assert expected.std() > 1e-2  # the four scores differ, so a misread token would show
    prompts = [row["prompt"] for row in PAIRS] * 2
    texts = [row[answer][0]["content"] for answer in ("chosen", "rejected") for row in PAIRS]  # decoded, as a rollout has them
    side = tok.padding_side
    try:
        for tok.padding_side in ("right", "left"):
            got = model_source(model, tok, batch_size=4, weight=1.0).score(prompts, texts, {})
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4, msg=f"{tok.padding_side} padding")
    finally:
        tok.padding_side = side
    # The first answer alone (no padding), through the model's own forward (no top-layer trimming): the same.
    alone = model(input_ids=torch.tensor([scored_ids(tok, prompts[0], texts[0])])).logits.item()
    assert alone == pytest.approx(expected[0].item(), abs=1e-4)
    # What rollout scoring read before: the text with <|im_end|> appended and no newline, so the
    # classifier read the answer's last token instead.
    before = model(input_ids=torch.tensor([encode_prompt(tok, prompts[0]) + encode_completion(tok, prompts[0], texts[0])])).logits.item()
    assert abs(before - alone) > 1e-2
