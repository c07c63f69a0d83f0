"""alignctl.nn.shared_prompt: a pair's prompt computed once gives the log-probs and gradients of the
two-row layout, on the plain logits path and the chunked one, with and without LoRA."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from alignctl.nn.logprobs import left_padded_batch, response_logps
from alignctl.nn.shared_prompt import applies, shared_prompt_batch, shared_prompt_logps


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, max_position_embeddings=64))
    with torch.no_grad():
        base.lm_head.weight.normal_(0.0, 0.5)  # sharp enough that a misaligned position shows
    lora = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    return {"full": base, "lora": lora}


def pairs(seed: int):
    generator = torch.Generator().manual_seed(seed)

    def row(low, high):
        return torch.randint(3, 40, (int(torch.randint(low, high, (1,), generator=generator)),), generator=generator).tolist()

    # prompts of 1 to 8 tokens, responses of 1 to 6: left padding, right padding and one-token rows all occur
    return [row(1, 9) for _ in range(5)], [row(1, 7) for _ in range(5)], [row(1, 7) for _ in range(5)]


@pytest.mark.parametrize("kind", ["full", "lora"])
@pytest.mark.parametrize("chunk", [0, 3])
def test_log_probs_and_gradients_equal_two_rows_a_pair(models, kind, chunk):
    model = models[kind]
    prompts, chosen, rejected = pairs(1)
    params = [p for p in model.parameters() if p.requires_grad]
    expected, expected_lengths = response_logps(model, left_padded_batch(prompts * 2, chosen + rejected, 0), chunk)
    expected_grads = torch.autograd.grad((expected * torch.linspace(-1, 1, 10)).sum(), params)
    got, lengths = shared_prompt_logps(model, shared_prompt_batch(prompts, chosen, rejected, 0), chunk)
    grads = torch.autograd.grad((got * torch.linspace(-1, 1, 10)).sum(), params)
    assert torch.equal(lengths, expected_lengths)
    assert torch.allclose(got, expected, atol=1e-4)
    for g, e in zip(grads, expected_grads):
        assert torch.allclose(g, e, atol=1e-4, rtol=1e-4)


def test_batch_layout_and_when_it_applies(models):
    batch = shared_prompt_batch([[5, 6, 7], [8]], [[9], [10, 11]], [[12, 13], [14]], 0)
    assert batch["prompt_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["prompt_positions"].tolist() == [[0, 1, 2], [0, 0, 0]]
    assert batch["response_ids"].tolist() == [[9, 0], [12, 13], [10, 11], [14, 0]]  # the two of a prompt side by side
    assert applies(models["full"])
    checkpointed = copy.deepcopy(models["full"])
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # as alignctl.models.loading does
    assert not applies(checkpointed)
