"""alignctl.rl.decode, the native rollout engine: its logits are the model's own at every step (prefill,
cached decode, rows repeated and dropped), adapters folded in; greedy sampling equals generate; and it
stands aside, or refuses with one line, where it does not apply."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from alignctl.core.errors import ConfigError
from alignctl.rl import decode, vllm_engine
from alignctl.rl.rollout import Sampling, native_engine, sample

PAD, BOS, EOS = 0, 1, 2
TOL = 1e-5
PROMPTS = [[BOS, 5, 6, 7, 8], [BOS, 9], [BOS, 10, 11]]
SHAPE = dict(vocab_size=24, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)


def _sharpen(model):
    """Default init predicts almost uniformly; a larger head makes positions (and EOS) tell apart."""
    torch.manual_seed(0)
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 1.0)
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.5)
    return model.eval()


def llama(**extra):
    torch.manual_seed(0)
    return _sharpen(LlamaForCausalLM(LlamaConfig(**SHAPE, **extra)))


MODELS = {
    "llama": llama,
    "llama-attention-bias": lambda: llama(attention_bias=True),
    "llama3-rope-scaling": lambda: llama(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "mistral": lambda: _sharpen(MistralForCausalLM(MistralConfig(**SHAPE, sliding_window=None))),
    "qwen2": lambda: _sharpen(Qwen2ForCausalLM(Qwen2Config(**SHAPE))),  # q, k, v biases
}


def left_padded(prompts):
    """Left-padded ids and their mask, from the rows' lengths (a sampled context may hold the pad id as a real token)."""
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def model_logits(model, rows):
    """The model's own next-token logits after each row (unpadded, one row at a time)."""
    with torch.no_grad():
        return torch.cat([model(input_ids=torch.tensor([row])).logits[:, -1] for row in rows])


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_prefill_and_every_cached_step_give_the_models_logits(kind):
    model = MODELS[kind]()
    ids, mask = left_padded(PROMPTS)
    decoder = decode.Decoder(model, len(PROMPTS), ids.size(1) + 4)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = decoder.forward(ids, positions, decode.prompt_mask(mask))
    rows = [list(p) for p in PROMPTS]
    assert torch.allclose(logits, model_logits(model, rows), atol=TOL)

    # two copies of each prompt, then drop some rows mid-way: what a rollout does
    decoder.repeat_rows(2)
    rows = [r for r in rows for _ in range(2)]
    next_position = positions[:, -1].repeat_interleave(2) + 1
    key_valid = torch.cat([mask.bool().repeat_interleave(2, 0), torch.ones(len(rows), 4, dtype=torch.bool)], 1)
    generator = torch.Generator().manual_seed(0)
    for step in range(3):
        tokens = torch.randint(3, 24, (len(rows),), generator=generator)
        rows = [r + [t] for r, t in zip(rows, tokens.tolist())]
        logits = decoder.forward(tokens[:, None], next_position[:, None], key_valid[:, None, None, : decoder.length + 1])
        next_position = next_position + 1
        assert torch.allclose(logits, model_logits(model, rows), atol=TOL), f"step {step}"
        if step == 0:
            keep = torch.tensor([0, 3, 4])
            decoder.keep_rows(keep)
            rows, next_position, key_valid = [rows[i] for i in keep], next_position[keep], key_valid[keep]


def test_unpadded_prompts_take_the_causal_path():
    model = llama()
    ids = torch.tensor([[BOS, 5, 6], [BOS, 7, 8]])
    decoder = decode.Decoder(model, 2, 5)
    logits = decoder.forward(ids, torch.arange(3).expand(2, 3), None)
    assert torch.allclose(logits, model_logits(model, ids.tolist()), atol=TOL)


def _greedy_reference(model, prompts, max_new_tokens, eos):
    """generate's greedy completions, each prompt decoded alone (unpadded), cut after `eos`."""
    out = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                                   pad_token_id=PAD, eos_token_id=eos)[0, len(prompt):].tolist()
        out.append(generated[: generated.index(eos) + 1] if eos in generated else generated)
    return out


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_greedy_rollouts_equal_generate_with_rows_finishing_early(kind):
    model = MODELS[kind]()
    # The stop token: one that some prompts' greedy completions reach mid-way and others never do, so
    # rows leave the batch at different steps.
    free_running = _greedy_reference(model, PROMPTS, 6, eos=EOS)
    eos = next(t for t in range(3, 24) if any(t in c[1:5] and c[0] != t for c in free_running) and any(t not in c for c in free_running))
    alone = _greedy_reference(model, PROMPTS, 6, eos)
    assert any(a[-1] == eos and len(a) < 6 for a in alone) and any(eos not in a for a in alone), alone
    torch.manual_seed(0)
    out = sample(model, PROMPTS, 2, Sampling(temperature=1.0, top_p=1.0, top_k=1, max_new_tokens=6, engine="native"), PAD, eos)
    assert out.completion_ids == [a for a in alone for _ in range(2)]
    assert out.truncated == [eos not in a for a in alone for _ in range(2)]


def test_sampled_rollouts_are_seeded_and_spread():
    model = llama()
    sampling = Sampling(temperature=1.5, top_p=0.9, top_k=10, max_new_tokens=6, engine="native")

    def draw(seed):
        torch.manual_seed(seed)
        return sample(model, PROMPTS, 4, sampling, PAD, EOS).completion_ids

    assert draw(3) == draw(3)
    assert draw(3) != draw(4)
    assert len({tuple(c) for c in draw(3)}) > 3  # the K completions of a prompt differ


@pytest.mark.parametrize("use_dora", [False, True])
def test_adapters_are_folded_in_and_the_model_is_left_untouched(use_dora):
    model = get_peft_model(llama(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, use_dora=use_dora))
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids, mask = left_padded(PROMPTS)
    assert decode.unsupported_reason(model) is None
    assert decode.engine_gap(model, ids, mask)[0] < TOL
    with model.disable_adapter():  # the reference: the adapter switched off
        assert decode.engine_gap(model, ids, mask)[0] < TOL
        plain = decode.Decoder(model, 1, 8).weights.layers[0].qkv
    assert not torch.allclose(plain, decode.Decoder(model, 1, 8).weights.layers[0].qkv)  # the adapter does change the weights
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_unsupported_models_fall_back_or_refuse_in_one_line():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=24, n_embd=16, n_layer=1, n_head=2, n_positions=32)).eval()
    assert "gpt2" in decode.unsupported_reason(gpt2)
    ids, mask = left_padded(PROMPTS)
    assert native_engine(gpt2, "auto", ids, mask, 4) is False
    with pytest.raises(ConfigError, match="rollout_engine: native cannot sample from this model: model type .gpt2."):
        native_engine(gpt2, "native", ids, mask, 4)
    windowed = _sharpen(MistralForCausalLM(MistralConfig(**SHAPE, sliding_window=8)))
    assert decode.unsupported_reason(windowed, 6) is None
    assert "sliding attention window" in decode.unsupported_reason(windowed, 12)
    assert native_engine(llama(), "hf", ids, mask, 4) is False


def test_a_model_whose_logits_differ_is_not_sampled_natively(monkeypatch):
    model = llama()
    ids, mask = left_padded(PROMPTS)
    monkeypatch.setattr(decode, "engine_gap", lambda *a: (0.5, decode.CHECK_TOLERANCE))
    assert native_engine(model, "auto", ids, mask, 4) is False
    with pytest.raises(ConfigError, match="differ"):
        native_engine(model, "native", ids, mask, 4)


@pytest.mark.skipif(vllm_engine.unavailable_reason() is None, reason="vLLM and a GPU are here: tests/unit/test_vllm_engine.py samples with it")
def test_the_vllm_engine_without_vllm_or_a_gpu_is_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"rollout_engine: vllm: .*; use auto, native or hf"):
        sample(llama(), PROMPTS, 2, Sampling(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=4, engine="vllm"), PAD, EOS)


def _full_context_turn(model, contexts, top_k, seed, eos, max_new_tokens=4):
    """A turn sampled the plain way: every context prefilled whole."""
    ids, mask = left_padded(contexts)
    torch.manual_seed(seed)
    return decode.sample(model, ids, mask, 1, 1.0, top_k, 1.0, max_new_tokens, eos, PAD, with_logps=True)


def _two_turns(model, eos, top_k):
    """A first turn of K=2 per prompt keeping each row's cache, then a second that prefills only the last
    sampled token and new ids of different lengths per row; with what prefilling each whole context
    samples in the second turn."""
    torch.manual_seed(0)
    first, _, caches = decode.sample_resumed(model, [None] * len(PROMPTS), PROMPTS, 2, 1.0, 1, 1.0, 4, eos, PAD)
    contexts, replies = [], [[3], [4, 5], [6, 8, 9], [10], [11, 12], [13, 14, 15, 16]]
    for row, (tokens, reply) in enumerate(zip(first.tolist(), replies)):
        sampled = tokens[: tokens.index(eos) + 1] if eos in tokens else tokens
        context = PROMPTS[row // 2] + sampled
        assert caches[row].length == len(context) - 1  # all but the last sampled token
        contexts.append(context + reply)
    torch.manual_seed(5)
    resumed = decode.sample_resumed(model, caches, [c[cache.length :] for c, cache in zip(contexts, caches)], 1, 1.0, top_k, 1.0, 4, eos, PAD)
    return contexts, resumed, _full_context_turn(model, contexts, top_k, 5, eos)


# Sampled from a fixed seed, and greedy on llama. Not llama-attention-bias: its sharpened biases make every
# row repeat one token, so no stop token ends some rows and not others.
@pytest.mark.parametrize(("kind", "top_k"), [(kind, 0) for kind in sorted(MODELS) if kind != "llama-attention-bias"] + [("llama", 1)])
def test_a_kept_cache_resumes_as_if_the_whole_context_were_prefilled(kind, top_k):
    """The second turn samples the tokens and log-probs that prefilling each whole context samples, with
    cache lengths that differ and rows that end at EOS mid-turn (the stop token: the first that some
    rows reach mid-turn and others never do)."""
    model = MODELS[kind]()

    def rows_leave_mid_turn(tokens):
        return any(eos in row[:-1] for row in tokens.tolist()) and any(eos not in row for row in tokens.tolist())

    for eos in range(3, 24):
        contexts, (tokens, logps, kept), (expected_tokens, expected_logps) = _two_turns(model, eos, top_k)
        if rows_leave_mid_turn(expected_tokens):
            break
    assert rows_leave_mid_turn(expected_tokens)
    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(logps, expected_logps, atol=TOL, rtol=0)
    for context, cache, row in zip(contexts, kept, tokens.tolist()):
        sampled = row[: row.index(eos) + 1] if eos in row else row
        assert cache.length == len(context) + len(sampled) - 1


def _bf16_base_with_lora():
    """As alignctl stores a frozen base under an adapter with bf16 autocast: the base in bf16, LoRA in float32."""
    model = get_peft_model(llama().to(torch.bfloat16), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    for name, parameter in model.named_parameters():
        if "lora_" in name:
            parameter.data = parameter.data.float()
    return model.eval()


def test_under_cpu_autocast_the_engine_multiplies_in_bf16_keeps_the_rest_float32_and_is_still_taken():
    """A decode step is bound by reading the weights, so its matmul weights are bf16; the residual stream,
    norms, cache and attention stay float32, and the embedding stays as stored (no float32 copy of the
    vocabulary: only the looked-up rows are cast). The check against the model's own bf16-rounded forward is to
    a fraction of its logits' spread: before that, every bf16 rollout fell back to generate."""
    model = _bf16_base_with_lora()
    ids, mask = left_padded(PROMPTS)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        decoder = decode.Decoder(model, ids.size(0), ids.size(1))
        assert decoder.matmul_dtype == torch.bfloat16
        assert {t.dtype for layer in decoder.weights.layers for t in (layer.qkv, layer.gate_up, layer.out, layer.down)} == {torch.bfloat16}
        assert {layer.input_norm.dtype for layer in decoder.weights.layers} == {torch.float32}
        assert decoder.weights.embed.dtype == torch.bfloat16 and decoder.weights.embed is model.get_input_embeddings().weight
        assert decoder.keys[0].dtype == decoder.dtype == torch.float32 and decoder.weights.head.dtype == torch.bfloat16
        gap, tolerance = decode.engine_gap(model, ids, mask)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        theirs = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1).logits[:, -1].float()
        assert tolerance == pytest.approx(decode.AUTOCAST_CHECK_FRACTION * float(theirs.std()))
        assert 0 < gap < tolerance  # bf16 rounding shows, within the bound
        assert native_engine(model, "auto", ids, mask, 4) is True
        ours = decoder.forward(ids, positions, decode.prompt_mask(mask))
    # Against the same (bf16-valued) weights in float32: bf16 rounding of the matmul inputs only.
    exact = _bf16_base_with_lora()
    exact.load_state_dict(model.state_dict())
    with torch.no_grad():
        reference = exact.float()(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
    assert 0 < float((ours - reference).abs().max()) < 0.05 * float(reference.std())
    assert decode.engine_gap(exact, ids, mask)[1] == decode.CHECK_TOLERANCE  # no autocast: the float32 bound


def test_draw_samples_each_token_with_its_probability_and_never_a_zero_one():
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2], [0.0, 0.0, 1.0, 0.0]])
    torch.manual_seed(0)
    draws = torch.stack([decode.draw(probs) for _ in range(20000)])
    first = torch.bincount(draws[:, 0], minlength=4).float() / len(draws)
    assert first[1] == 0 and torch.allclose(first, probs[0], atol=0.015)  # 3 standard errors at most
    assert bool((draws[:, 1] == 2).all())  # a one-hot row is greedy
    torch.manual_seed(0)
    assert torch.equal(torch.stack([decode.draw(probs) for _ in range(5)]), draws[:5])  # the seed fixes the draws


def test_under_cpu_autocast_an_engine_that_computes_another_model_is_still_caught(monkeypatch):
    model = _bf16_base_with_lora()
    ids, mask = left_padded(PROMPTS)
    original = decode.read_weights

    def zeroed_output_projection(m, dtype=None):  # an engine bug: the first layer's attention output dropped
        weights = original(m, dtype)
        weights.layers[0].out = torch.zeros_like(weights.layers[0].out)
        return weights

    monkeypatch.setattr(decode, "read_weights", zeroed_output_projection)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gap, tolerance = decode.engine_gap(model, ids, mask)
        assert gap > tolerance


@pytest.mark.skipif(not decode.mkldnn_prepacking(), reason="this CPU or torch build has no native bf16 oneDNN matmul")
def test_under_cpu_autocast_prepacked_weights_give_the_same_logits_bit_for_bit(monkeypatch):
    """Reordering the bf16 weights once for oneDNN (instead of at every matmul) changes the speed of a
    decode step, not one of its products."""
    model = _bf16_base_with_lora()
    ids, mask = left_padded(PROMPTS)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)

    def prefill_then_step(decoder):
        first = decoder.forward(ids, positions, decode.prompt_mask(mask))
        key_bias = torch.zeros(ids.size(0), ids.size(1) + 1).masked_fill_(~torch.cat([mask, torch.ones_like(mask[:, :1])], 1).bool(), float("-inf"))
        second = decoder.forward(first.argmax(-1, keepdim=True), positions[:, -1:] + 1, key_bias[:, None, None, :])
        return first, second

    with torch.autocast("cpu", dtype=torch.bfloat16):
        packed = decode.Decoder(model, ids.size(0), ids.size(1) + 1)
        assert packed.linear is decode.packed_linear and packed.weights.layers[0].qkv.layout == torch._mkldnn
        packed_logits = prefill_then_step(packed)
        monkeypatch.setattr(decode, "mkldnn_prepacking", lambda: False)
        plain = decode.Decoder(model, ids.size(0), ids.size(1) + 1)
        assert plain.linear is torch.nn.functional.linear and plain.weights.layers[0].qkv.layout == torch.strided
        plain_logits = prefill_then_step(plain)
    for ours, theirs in zip(packed_logits, plain_logits):
        assert torch.equal(ours, theirs)
