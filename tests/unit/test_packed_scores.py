"""alignctl.rl.scored_text.packed_scores: sequences end to end in one row score, and train, as the same
sequences right-padded through the classifier's own forward (the reward stage's padding-free batches)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from alignctl.config.schema import LoraConfig as AlignctlLora
from alignctl.models.adapters import apply_adapter
from alignctl.nn.lora_linear import FusedLoraLinear
from alignctl.nn.varlen_attention import sequence_bounds
from alignctl.rl.scored_text import (
    has_score_head,
    packed,
    packed_scores,
    packed_scoring_pays,
    padded,
    sequence_scores,
)

PAD = 2  # pad = EOS, as SmolLM2's tokenizer has it: trailing EOS tokens are not read
SEQUENCES = [[5, 6, 7, 8, 9, 10, 11, PAD], [12, 13], [14, 15, 16, 17, PAD, PAD], [18], [19, 20, 21]]
WEIGHTS = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0])


def classifier():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, attn_implementation="sdpa", num_labels=1, pad_token_id=PAD)
    return LlamaForSequenceClassification(config)


def test_packed_batch_by_hand():
    batch = packed([[5, 6, PAD], [7], [8, PAD, PAD]], PAD)
    assert batch["input_ids"].tolist() == [[5, 6, PAD, 7, 8, PAD, PAD]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 0, 1, 2]]
    assert sequence_bounds(batch["position_ids"])[:-1].tolist() == [0, 3, 4]  # where each sequence starts
    assert batch["read_at"].tolist() == [1, 3, 4]  # each sequence's rightmost token that is not the pad id
    assert packed([[5, 6, PAD]], None)["read_at"].tolist() == [2]


def scores_and_grads(model, packed_rows: bool, trim: bool):
    model = copy.deepcopy(model).train()
    if packed_rows:
        scores = packed_scores(model, packed(SEQUENCES, PAD), trim)
    else:
        ids, mask = padded(SEQUENCES, PAD)
        scores = sequence_scores(model, ids, mask, PAD, trim)[0]
    (scores * WEIGHTS).sum().backward()
    return scores.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("trim", [True, False], ids=["top-layer-trimmed", "full"])
@pytest.mark.parametrize("adapter", [False, True], ids=["full-model", "lora"])
def test_packed_scores_and_gradients_equal_the_padded_forward(trim, adapter):
    model = classifier()
    if adapter:
        model = apply_adapter(model, AlignctlLora(kind="lora", r=4, alpha=8, dropout=0.0, target_modules="all-linear", use_rslora=False,
                                                   init_lora_weights=False, bias="none"), "SEQ_CLS")
        assert isinstance(model.base_model.model.model.layers[0].self_attn.q_proj, FusedLoraLinear)
    assert packed_scoring_pays(model)
    expected, expected_grads = scores_and_grads(model, packed_rows=False, trim=trim)
    got, grads = scores_and_grads(model, packed_rows=True, trim=trim)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert grads.keys() == expected_grads.keys() and len(grads) > 0
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-5 * (1 + grad.abs().max().item()), rtol=1e-4, msg=name)


def test_it_does_not_pay_under_gradient_checkpointing():
    model = classifier()
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    assert not packed_scoring_pays(model)  # transformers would mask the whole packed row instead


def test_only_a_score_head_is_read_at_packed_positions():
    from transformers import BertConfig, BertForSequenceClassification

    assert has_score_head(classifier())
    encoder = BertForSequenceClassification(BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                       intermediate_size=32, num_labels=1))
    assert not has_score_head(encoder) and not packed_scoring_pays(encoder)  # its head is `classifier`, over a pooled token
