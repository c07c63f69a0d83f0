"""alignctl.nn.varlen_attention and the packed (padding-free) response log-probs: a packed row computes
what each of its sequences computes alone, and what the padded batch computes, gradients included."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from alignctl.nn.logprobs import (
    left_padded_batch,
    packed_response_logps,
    response_logps,
)
from alignctl.nn.prompt_groups import rows_end_to_end
from alignctl.nn.varlen_attention import NAME, applies, packed_attention, padding_index, pays, sequence_bounds


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, attn_implementation="sdpa")  # grouped-query attention
    return LlamaForCausalLM(config)


def test_bounds_and_padding_index_by_hand():
    bounds = sequence_bounds(torch.tensor([[0, 1, 2, 0, 0, 1]]))
    assert bounds.tolist() == [0, 3, 4, 6]
    gather, real, longest = padding_index(bounds)
    assert longest == 3
    # padded slots repeat their sequence's last token; the real slots come back in packed order
    assert gather.tolist() == [0, 1, 2, 3, 3, 3, 4, 5, 5]
    assert real.tolist() == [0, 1, 2, 3, 6, 7]


def test_a_packed_row_computes_each_sequence_alone(model):
    model.eval()
    sequences = [torch.randint(0, 40, (n,)) for n in (5, 9, 1, 7)]
    alone = torch.cat([model(input_ids=s[None]).logits[0] for s in sequences])
    ids = torch.cat(sequences)[None]
    positions = torch.cat([torch.arange(len(s)) for s in sequences])[None]
    with packed_attention(model, positions):
        assert model.config._attn_implementation == NAME
        packed = model(input_ids=ids, position_ids=positions, use_cache=False).logits[0]
    assert model.config._attn_implementation == "sdpa"  # restored
    assert torch.allclose(packed, alone, atol=1e-5)
    # the same tokens read as one sequence give other logits: the check above could tell a leak
    with torch.no_grad():
        crossed = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
    assert not torch.allclose(crossed, alone, atol=1e-3)


@pytest.mark.parametrize("chunk", [0, 3])
def test_packed_log_probs_and_gradients_equal_the_padded_batchs(model, chunk):
    model.train()
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]]
    responses = [[11, 12], [13, 14, 15, 16], [17], [18, 19, 20]]

    def run(layout):
        copy_ = copy.deepcopy(model)
        if layout == "padded":
            summed, lengths = response_logps(copy_, left_padded_batch(prompts, responses, pad_id=0), chunk)
        else:
            summed, lengths = packed_response_logps(copy_, rows_end_to_end(left_padded_batch(prompts, responses, pad_id=0), 4), chunk)
        (summed * torch.tensor([1.0, -2.0, 0.5, 3.0])).sum().backward()
        return summed.detach(), lengths, {n: p.grad for n, p in copy_.named_parameters()}

    padded, padded_lengths, padded_grads = run("padded")
    packed, packed_lengths, packed_grads = run("packed")
    assert packed_lengths.tolist() == padded_lengths.tolist() == [2, 4, 1, 3]
    assert torch.allclose(packed, padded, atol=1e-5)
    for name, grad in packed_grads.items():
        assert torch.allclose(grad, padded_grads[name], atol=1e-5), name
    assert all(g.abs().max() > 0 for g in packed_grads.values())


def test_it_stands_in_for_sdpa_and_eager_only(model):
    assert applies(model)
    flash = copy.deepcopy(model)
    flash.config._attn_implementation = "flash_attention_2"  # packed rows are the kernel's own business
    assert not applies(flash)
    windowed = copy.deepcopy(model)
    windowed.config.sliding_window = 4
    assert not applies(windowed)
    checkpointed = copy.deepcopy(model)
    checkpointed.gradient_checkpointing_enable()  # its backward re-runs attention outside the block
    assert not applies(checkpointed)
    with pytest.raises(RuntimeError), packed_attention(model, torch.tensor([[0, 1, 0]])):
        raise RuntimeError("a failing forward")
    assert model.config._attn_implementation == "sdpa"


def test_padding_free_pays_where_varlen_sdpa_or_a_flash_kernel_runs_and_not_where_a_block_mask_would(model):
    """DPO's recipe.padding_free=null reads this: transformers' block-diagonal mask over the whole packed
    row (gradient checkpointing, sliding windows) is slower than the padded batch it replaces."""
    assert pays(model)
    flash = copy.deepcopy(model)
    flash.config._attn_implementation = "flash_attention_2"
    assert pays(flash)
    windowed = copy.deepcopy(model)
    windowed.config.sliding_window = 4
    assert not pays(windowed)
    checkpointed = copy.deepcopy(model)
    checkpointed.gradient_checkpointing_enable()
    assert not pays(checkpointed)


def test_dpo_padding_free_null_follows_pays_and_gives_way_to_share_prompt(model):
    from types import SimpleNamespace

    from alignctl.stages.dpo import batch_layout

    def layout(policy, share_prompt, padding_free):
        return batch_layout(SimpleNamespace(share_prompt=share_prompt, padding_free=padding_free), policy)

    checkpointed = copy.deepcopy(model)
    checkpointed.gradient_checkpointing_enable()
    assert layout(model, False, None) == (False, True)
    assert layout(model, True, None) == (True, False)  # prefix sharing asked for: it runs, padded
    assert layout(checkpointed, False, None) == (False, False)  # a block mask would be slower than padding
    assert layout(checkpointed, True, None) == (False, False)  # no cache under checkpointing: no sharing either
    assert layout(model, False, False) == (False, False) and layout(checkpointed, False, True) == (False, True)  # as set
