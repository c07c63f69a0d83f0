"""alignctl.nn.logprobs: left-padded prompt + response batches and response log-probabilities, checked
against a naive computation on the real tiny model (built into a temporary ALIGNCTL_CACHE)."""

from __future__ import annotations

import math

import pytest
import torch

from alignctl.nn.logprobs import left_padded_batch, response_logps, token_logps

# Prompts and responses of different lengths (ids of printable characters of the char tokenizer).
# The longest response (row 1) does not belong to the longest sequence (row 3), and row 2's
# response is a single token.
PROMPTS = [[1, 20, 21, 22], [1, 30], [1, 40, 41, 42, 43, 44, 45], [1, 50, 51, 52, 53, 54, 55, 56, 57]]
RESPONSES = [[60, 61, 2], [62, 63, 64, 65, 66, 2], [2], [70, 71, 72, 2]]


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request, tiny_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32, attn_implementation=request.param).eval()
    # A freshly initialised model predicts nearly uniformly; sharpen it so the test can tell
    # positions apart (a wrong shift or a wrong position id changes the answer by far more than 1e-5).
    with torch.no_grad():
        for p in lm.parameters():
            if p.ndim >= 2:
                p.mul_(4.0)
    return lm


@pytest.fixture(scope="module")
def pad_id(tiny_dir) -> int:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir).pad_token_id


def naive_response_logps(lm, prompt: list[int], response: list[int]) -> float:
    """Each row alone, unpadded, default positions: sum over response tokens of log_softmax(logits)[token],
    the token at sequence position j scored by the logits at j - 1."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = lm(input_ids=ids).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return sum(float(logp[len(prompt) + i - 1, token]) for i, token in enumerate(response))


# --------------------------------------------------------------------------- left_padded_batch
def test_left_padded_batch_by_hand():
    # sequences: [5, 6 | 8] (3 tokens) and [7 | 9, 10, 11] (4 tokens); T = 4, pad id 0 on the left
    batch = left_padded_batch([[5, 6], [7]], [[8], [9, 10, 11]], pad_id=0)
    assert batch["input_ids"].tolist() == [[0, 5, 6, 8], [7, 9, 10, 11]]
    assert batch["attention_mask"].tolist() == [[0, 1, 1, 1], [1, 1, 1, 1]]
    # positions count real tokens only: the padded row starts at 0 on its first real token
    assert batch["position_ids"].tolist() == [[0, 0, 1, 2], [0, 1, 2, 3]]
    assert batch["response_mask"].tolist() == [[0, 0, 0, 1], [0, 1, 1, 1]]
    assert int(batch["response_mask"].sum(-1).max()) == 3


def test_left_padded_batch_every_row_ends_at_the_last_position():
    batch = left_padded_batch(PROMPTS, RESPONSES, pad_id=0)
    total = max(len(p) + len(r) for p, r in zip(PROMPTS, RESPONSES))
    assert batch["input_ids"].shape == (len(PROMPTS), total)
    for row, (p, r) in enumerate(zip(PROMPTS, RESPONSES)):
        n = len(p) + len(r)
        assert batch["input_ids"][row, -n:].tolist() == p + r
        assert batch["input_ids"][row, :-n].tolist() == [0] * (total - n)
        assert batch["attention_mask"][row].tolist() == [0] * (total - n) + [1] * n
        assert batch["position_ids"][row, -n:].tolist() == list(range(n))
        assert batch["response_mask"][row].tolist() == [0] * (total - len(r)) + [1] * len(r)


# ---------------------------------------------------------------------------------- token_logps
def test_token_logps_hand_worked():
    # logits (0, log 3): probabilities (1/4, 3/4); targets 1 and 0
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])
    out = token_logps(logits, torch.tensor([[1, 0]]))
    assert out.tolist()[0] == pytest.approx([math.log(0.75), math.log(0.25)], rel=1e-6)


def test_token_logps_equals_log_softmax_gather():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=gen) * 5
    targets = torch.randint(0, 11, (3, 5), generator=gen)
    expected = torch.log_softmax(logits.double(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    out = token_logps(logits, targets)
    assert out.shape == (3, 5) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)


def test_token_logps_is_float32_for_half_precision_logits():
    logits = (torch.randn(2, 4, 7) * 3).to(torch.bfloat16)
    targets = torch.randint(0, 7, (2, 4))
    out = token_logps(logits, targets)
    assert out.dtype == torch.float32
    expected = torch.log_softmax(logits.float(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------- response_logps
def test_response_logps_matches_each_row_alone(model, pad_id):
    batch = left_padded_batch(PROMPTS, RESPONSES, pad_id)
    with torch.no_grad():
        summed, lengths = response_logps(model, batch)
    assert lengths.tolist() == [len(r) for r in RESPONSES]
    expected = [naive_response_logps(model, p, r) for p, r in zip(PROMPTS, RESPONSES)]
    assert summed.shape == (len(PROMPTS),)
    assert summed.tolist() == pytest.approx(expected, abs=1e-5, rel=0)
    # the sharpened model is far from uniform: rows really differ, so a shift would show
    assert max(expected) - min(expected) > 1.0, expected


def test_response_logps_does_not_depend_on_the_other_rows(model, pad_id):
    """The same row, padded to different widths in different company, gives the same log-prob."""
    alone, _ = response_logps(model, left_padded_batch(PROMPTS[:1], RESPONSES[:1], pad_id))
    together, _ = response_logps(model, left_padded_batch(PROMPTS, RESPONSES, pad_id))
    assert alone.item() == pytest.approx(together[0].item(), abs=1e-5)


def test_response_logps_keeps_only_response_logits(model, pad_id):
    """Only the last (longest response + 1) positions reach the vocabulary projection."""
    seen = []
    handle = model.lm_head.register_forward_hook(lambda module, args, out: seen.append(tuple(out.shape)))
    try:
        with torch.no_grad():
            response_logps(model, left_padded_batch(PROMPTS, RESPONSES, pad_id))
    finally:
        handle.remove()
    width = max(len(r) for r in RESPONSES)
    assert seen == [(len(PROMPTS), width + 1, model.config.vocab_size)]


def test_response_logps_gradient_reaches_the_model(tiny_dir, pad_id):
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    summed, _ = response_logps(lm, left_padded_batch(PROMPTS, RESPONSES, pad_id))
    summed.sum().backward()
    grads = [p.grad for p in lm.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


def test_response_values_apply_the_head_to_every_response_state(tiny_dir):
    """V(s_t) is the head on the hidden state that precedes response token t (the backbone's last layer, normed)."""
    from transformers import AutoModelForSequenceClassification

    from alignctl.nn.logprobs import response_values

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_dir, num_labels=1).eval()
    model.config.pad_token_id = 0
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [3, 4, 5, 6, 7, 8]])
    mask = (ids != 0).long()
    batch = {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
             "response_mask": torch.tensor([[0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 1]])}
    with torch.no_grad():
        hidden = model.model(input_ids=ids, attention_mask=mask, position_ids=batch["position_ids"]).last_hidden_state
        by_hand = model.score(hidden[:, 2:5]).squeeze(-1)  # width 3: the states before the last 3 tokens
        assert torch.allclose(response_values(model, batch), by_hand, atol=1e-6)
