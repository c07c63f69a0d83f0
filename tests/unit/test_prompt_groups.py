"""alignctl.nn.prompt_groups: online-RL batches packed with each prompt once (alignctl's attention), or
their rows end to end (what a flash kernel takes), compute the per-token log-probs, entropies and
gradients of the same completions as left-padded rows (GRPO's and PPO's ``recipe.padding_free``)."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from alignctl.config.schema import LoraConfig as AlignctlLora
from alignctl.core.errors import ConfigError
from alignctl.models.adapters import apply_adapter
from alignctl.nn.logprobs import left_padded_batch, response_token_logps
from alignctl.nn.lora_linear import FusedLoraLinear
from alignctl.nn.prompt_groups import attention_layout, prompt_group_fields, rows_end_to_end
from alignctl.nn.varlen_attention import packed_attention
from alignctl.rl.online_rl import packed_training
from alignctl.rl.rollout import Completions, training_batch

PAD = 2
# A GRPO micro-batch: two prompts, three completions of the first (one of them a single EOS token), two
# of the second, out of order as a shuffled rollout gives them, of different lengths.
PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13], [5, 6, 7], [9, 10, 11, 12, 13], [5, 6, 7]]
RESPONSES = [[20, 21, 22, 23], [24, 25], [PAD], [26, 27, 28, 29, 30, 31], [32, 33, PAD]]


def policy(attention: str = "sdpa"):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, attn_implementation=attention, pad_token_id=PAD,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def test_the_packed_layout_by_hand():
    fields = prompt_group_fields([[1, 2], [1, 2], [3]], [[4, 5], [6], [7, 8, 9]])
    assert fields["packed_ids"].tolist() == [[1, 2, 4, 5, 6, 3, 7, 8, 9]]  # prompt [1, 2] once for its two completions
    assert fields["packed_positions"].tolist() == [[0, 1, 2, 3, 2, 0, 1, 2, 3]]  # each completion continues its prompt
    # Attention sequences, longest 4: row 0 = prompt + [4, 5]; row 1 = prompt + [6], padded with its last token.
    assert int(fields["packed_longest"]) == 4
    assert fields["packed_gather"].tolist() == [0, 1, 2, 3, 0, 1, 4, 4, 5, 6, 7, 8]
    # The prompt's outputs come from row 0's copy; each completion token's from its own row.
    assert fields["packed_real"].tolist() == [0, 1, 2, 3, 6, 8, 9, 10, 11]
    assert fields["packed_targets"].tolist() == [2, 3, 4, 6, 7, 8]
    assert fields["packed_predictors"].tolist() == [1, 2, 1, 5, 6, 7]  # a completion's first token: from the prompt's last
    assert fields["packed_slots"].tolist() == [1, 2, 5, 6, 7, 8]  # right-aligned in (3 rows x 3)
    assert prompt_group_fields([[1], []], [[4], [5]]) == {}  # an empty prompt: padded rows


def test_rows_end_to_end_by_hand():
    padded = left_padded_batch([[1, 2], [3]], [[4], [6, 7, 8]], PAD)  # rows [PAD, 1, 2, 4] and [3, 6, 7, 8]
    fields = rows_end_to_end(padded, 3)
    assert fields["packed_ids"].tolist() == [[1, 2, 4, 3, 6, 7, 8]]  # each row with its own prompt, no padding
    assert fields["packed_positions"].tolist() == [[0, 1, 2, 0, 1, 2, 3]]  # restarting at each row: a flash kernel's boundaries
    assert fields["packed_targets"].tolist() == [2, 4, 5, 6]
    assert fields["packed_predictors"].tolist() == [1, 3, 4, 5]
    assert fields["packed_slots"].tolist() == [2, 3, 4, 5]  # right-aligned in (2 rows x 3)
    assert rows_end_to_end(left_padded_batch([[], [3]], [[4], [5]], PAD), 1) is None  # a row without a prompt: padded rows


def batch():
    return left_padded_batch(PROMPTS, RESPONSES, PAD) | prompt_group_fields(PROMPTS, RESPONSES)


def logps_entropy_and_grads(model, padding_free: bool, chunk: int, temperature: float = 0.7):
    model = copy.deepcopy(model).train()
    logps, mask, entropy = response_token_logps(model, batch(), temperature, with_entropy=True, chunk=chunk, entropy_grad=True,
                                                padding_free=padding_free)
    weights = torch.linspace(-1.0, 2.0, logps.numel()).view_as(logps)
    ((logps * weights).sum() + 0.3 * entropy.sum()).backward()
    return logps.detach(), mask, entropy.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("layout", ["each-prompt-once", "rows-end-to-end"])
@pytest.mark.parametrize("chunk", [0, 4], ids=["logits", "chunked-head"])
@pytest.mark.parametrize("adapter", [False, True], ids=["full-model", "lora"])
def test_packed_log_probs_entropies_and_gradients_equal_the_padded_rows(adapter, chunk, layout, monkeypatch):
    if layout == "rows-end-to-end":
        # As under a flash kernel: the prompt-sharing layout is not taken, the rows go end to end, and
        # (on CPU) alignctl's attention keeps them apart by their position ids as the kernel would.
        monkeypatch.setattr("alignctl.nn.logprobs.varlen_applies", lambda model: False)
    model = policy()
    if adapter:
        # init_lora_weights=False: B random, so that A's gradients are not all zero.
        model = apply_adapter(model, AlignctlLora(kind="lora", r=4, alpha=8, dropout=0.0, target_modules="all-linear", use_rslora=False,
                                                  init_lora_weights=False, bias="none"))
        assert isinstance(model.base_model.model.model.layers[0].self_attn.q_proj, FusedLoraLinear)
    padded = logps_entropy_and_grads(model, False, chunk)
    packed = logps_entropy_and_grads(model, True, chunk)
    torch.testing.assert_close(packed[1], padded[1])  # the same response mask
    assert padded[1].sum() == sum(len(r) for r in RESPONSES)
    torch.testing.assert_close(packed[0], padded[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[2], padded[2], atol=1e-5, rtol=1e-5)
    assert (packed[0] * (1 - padded[1])).abs().sum() == 0  # nothing outside the responses
    assert packed[3].keys() == padded[3].keys() and padded[3]
    for name, grad in padded[3].items():
        torch.testing.assert_close(packed[3][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_under_bf16_autocast_the_packed_log_probs_stay_within_bf16_rounding():
    model = policy()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        padded = response_token_logps(model, batch(), padding_free=False)[0]
        packed = response_token_logps(model, batch(), padding_free=True)[0]
    assert torch.isfinite(packed).all()
    torch.testing.assert_close(packed, padded, atol=0.05, rtol=0.02)


def test_the_training_batch_carries_both_layouts_and_the_packed_one_has_each_prompt_once():
    completions = Completions(PROMPTS, RESPONSES, [False] * len(PROMPTS))
    built = training_batch(completions, [0, 2, 4], PAD, torch.device("cpu"), {}, {})
    assert built["input_ids"].shape == (3, 3 + 4)  # padded rows: the prompt three times
    assert built["packed_ids"].tolist() == [[5, 6, 7, 20, 21, 22, 23, PAD, 32, 33, PAD]]  # packed: once
    assert built["num_tokens"] == 3 * 3 + 4 + 1 + 3  # the rows' real tokens, whichever layout runs


def test_padding_free_is_config_checked_against_the_models_attention():
    model = policy()
    assert packed_training(None, model) and packed_training(True, model) and not packed_training(False, model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert not packed_training(None, model)  # null: padded rows where per-sequence attention cannot run
    with pytest.raises(ConfigError, match="recipe.padding_free.*valid here: null"):
        packed_training(True, model)
    # An explicit layout cannot run there: transformers' own mask would not keep a completion to its prompt.
    with pytest.raises(ValueError, match="share tokens"), packed_attention(model, batch()["packed_positions"], layout=attention_layout(batch())):
        pass
    # And a model whose attention it cannot run takes the padded rows even when asked.
    batch_ = batch()
    model.train()
    torch.testing.assert_close(response_token_logps(model, batch_, padding_free=True)[0], response_token_logps(model, batch_)[0])


@pytest.mark.parametrize("chunk", [0, 4], ids=["logits", "chunked-head"])
def test_dpo_pairs_with_each_prompt_once_have_the_padded_rows_log_probs_and_gradients(chunk):
    from alignctl.stages.dpo import pair_batch, pair_logps

    rows = {"prompt_ids": [[5, 6, 7], [9, 10, 11, 12, 13]], "chosen_ids": [[20, 21, 22], [24]], "rejected_ids": [[25, 26], [27, 28, 29, 30]]}
    model, weights = policy().train(), torch.tensor([1.0, -2.0, 0.5, 3.0])

    def sums_and_grads(batch):
        trained = copy.deepcopy(model)
        sums, lengths = pair_logps(trained, batch, chunk)
        (sums * weights).sum().backward()
        return sums.detach(), lengths, {n: p.grad for n, p in trained.named_parameters()}

    packed_batch = pair_batch(rows, PAD, torch.device("cpu"), padding_free=True, prompt_once=True)
    # The batch holds this layout alone, so it is the one that runs: each prompt once for its two responses.
    assert "input_ids" not in packed_batch and "packed_gather" in packed_batch
    assert packed_batch["packed_ids"].numel() == (3 + 3 + 2) + (5 + 1 + 4)
    padded = sums_and_grads(pair_batch(rows, PAD, torch.device("cpu")))
    packed = sums_and_grads(packed_batch)
    torch.testing.assert_close(packed[0], padded[0], atol=1e-5, rtol=1e-5)
    assert packed[1].tolist() == padded[1].tolist() == [3, 1, 2, 4]  # chosen, then rejected
    for name, grad in padded[2].items():
        torch.testing.assert_close(packed[2][name], grad, atol=1e-5, rtol=1e-4, msg=name)

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (make test-gpu on a GPU machine)")
@pytest.mark.parametrize("attention", ["sdpa", "flash_attention_2"])
def test_on_gpu_packed_log_probs_equal_the_padded_rows_in_bf16(attention):
    # sdpa: each prompt once through alignctl's attention; flash_attention_2: the rows end to end, the
    # kernel keeping them apart by their position ids.
    if attention == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash-attn is not installed")
    model = policy(attention).to("cuda", torch.bfloat16).train()
    on_gpu = {k: v.cuda() for k, v in batch().items()}
    padded = response_token_logps(model, on_gpu, padding_free=False)[0]
    packed = response_token_logps(model, on_gpu, padding_free=True)[0]
    assert torch.isfinite(packed).all() and packed.abs().sum() > 0
    torch.testing.assert_close(packed, padded, atol=0.05, rtol=0.02)
