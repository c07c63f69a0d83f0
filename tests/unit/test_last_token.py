"""alignctl.nn.last_token: a sequence classifier whose top layer runs for the pooled position only
scores, and trains, like the model's own forward."""

from __future__ import annotations

import copy
from contextlib import nullcontext

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    LlamaConfig,
    LlamaForSequenceClassification,
    Qwen3Config,
    Qwen3ForSequenceClassification,
)

from alignctl.data.batching import pad
from alignctl.nn.fused_mlp import fuse_swiglu
from alignctl.nn.last_token import applies, read_positions, top_layer_at_last_token

PAD = 0


def llama(**overrides):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, attn_implementation="sdpa", num_labels=1,
                         pad_token_id=PAD, **overrides)  # grouped-query attention
    return LlamaForSequenceClassification(config)


def qwen3():
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, max_position_embeddings=64, attn_implementation="sdpa", num_labels=1,
                         pad_token_id=PAD)
    return Qwen3ForSequenceClassification(config)


def batch(side: str = "right"):
    sequences = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17], [18]]
    return pad(sequences, PAD, side=side), pad([[1] * len(s) for s in sequences], 0, side=side)


def test_read_positions_by_hand():
    ids, _ = batch()
    assert read_positions(ids, PAD).tolist() == [6, 1, 3, 0]
    left, _ = batch("left")
    assert read_positions(left, PAD).tolist() == [6, 6, 6, 6]
    assert read_positions(ids, None).tolist() == [6, 6, 6, 6]


def scores_and_grads(model, ids, mask, trimmed: bool):
    model = copy.deepcopy(model)
    model.train()
    with top_layer_at_last_token(model, ids, mask, PAD) if trimmed else nullcontext(False) as used:
        scores = model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
    assert used is trimmed
    (scores * torch.tensor([1.0, -2.0, 0.5, 3.0])).sum().backward()
    return scores.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("make", [llama, qwen3], ids=["llama", "qwen3"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_scores_and_gradients_equal_the_full_forward(make, side):
    model = make()
    ids, mask = batch(side)
    full, full_grads = scores_and_grads(model, ids, mask, trimmed=False)
    trimmed, trimmed_grads = scores_and_grads(model, ids, mask, trimmed=True)
    torch.testing.assert_close(trimmed, full, atol=1e-5, rtol=1e-5)
    assert trimmed_grads.keys() == full_grads.keys()  # every parameter of the top layer still trains
    for name, grad in full_grads.items():
        torch.testing.assert_close(trimmed_grads[name], grad, atol=1e-5 * (1 + grad.abs().max().item()), rtol=1e-4, msg=name)
    # the forward is restored on leaving the block
    assert "forward" not in vars(model.model.layers[-1])


def test_lora_and_fused_mlp_train_the_same():
    model = llama()
    fuse_swiglu(model)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                                             task_type="SEQ_CLS", init_lora_weights=False))
    ids, mask = batch()
    full, full_grads = scores_and_grads(model, ids, mask, trimmed=False)
    trimmed, trimmed_grads = scores_and_grads(model, ids, mask, trimmed=True)
    torch.testing.assert_close(trimmed, full, atol=1e-5, rtol=1e-5)
    assert any("layers.2" in n and "lora_A" in n for n in trimmed_grads)
    for name, grad in full_grads.items():
        torch.testing.assert_close(trimmed_grads[name], grad, atol=1e-5 * (1 + grad.abs().max().item()), rtol=1e-4, msg=name)


def test_the_top_layer_really_runs_for_one_position():
    model = llama()
    ids, mask = batch()
    seen = []
    handle = model.model.layers[-1].mlp.register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape))
    with top_layer_at_last_token(model, ids, mask, PAD):
        model(input_ids=ids, attention_mask=mask)
    model(input_ids=ids, attention_mask=mask)
    handle.remove()
    assert seen == [torch.Size([4, 1, 16]), torch.Size([4, 7, 16])]


def test_models_it_does_not_know_keep_their_forward():
    model = llama()
    assert applies(model, 7)
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    assert not applies(model, 7)  # its recompute in backward would run outside the switch
    eager_flash = llama()
    eager_flash.config._attn_implementation = "flash_attention_2"
    assert not applies(eager_flash, 7)
    ids, mask = batch()
    with top_layer_at_last_token(eager_flash, ids, mask, PAD) as used:
        assert not used and "forward" not in vars(eager_flash.model.layers[-1])
