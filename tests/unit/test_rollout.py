"""alignctl.rl.rollout (sampling, step plans, training batches) and the per-token log-probs and values of
alignctl.nn.logprobs, on a tiny random Llama built in memory (no hub, no files)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from alignctl.nn.logprobs import left_padded_batch, response_token_logps, response_values
from alignctl.rl.rollout import (
    Completions,
    Sampling,
    per_token_values,
    plan_steps,
    right_aligned,
    sample,
    sample_resuming,
    training_batch,
)

PAD, BOS, EOS = 0, 1, 2
CPU = torch.device("cpu")

# Rows of different lengths; the longest response (row 1) is in the shorter sequence. No pad ids inside.
PROMPTS = [[BOS, 5, 6, 7, 8, 9], [BOS, 3]]
RESPONSES = [[10, EOS], [11, 12, 13, EOS]]


def _config(**extra) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=20,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        **extra,
    )


@pytest.fixture(scope="module")
def lm() -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(_config()).eval()
    # Default init predicts almost uniformly; a larger head makes positions (and EOS) tell apart.
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 1.0)
    return model


@pytest.fixture(scope="module")
def classifier() -> LlamaForSequenceClassification:
    torch.manual_seed(1)
    model = LlamaForSequenceClassification(_config(num_labels=1)).eval()
    with torch.no_grad():
        model.score.weight.normal_(0.0, 1.0)
    return model


# ------------------------------------------------------------------------------- right_aligned
def test_right_aligned_ends_every_row_at_the_last_column():
    out = right_aligned(
        [torch.tensor([1.0, 2.0]), torch.tensor([3.0]), torch.tensor([]), torch.tensor([4.0, 5.0, 6.0])], 3
    )
    torch.testing.assert_close(
        out, torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 3.0], [0.0, 0.0, 0.0], [4.0, 5.0, 6.0]])
    )


def test_right_aligned_keeps_the_dtype():
    assert right_aligned([torch.tensor([1, 2], dtype=torch.int64)], 4).tolist() == [[0, 0, 1, 2]]
    assert right_aligned([torch.tensor([0.5], dtype=torch.float64)], 2).dtype == torch.float64
    assert right_aligned([], 3).shape == (0, 3)


# ---------------------------------------------------------------------------------- plan_steps
def test_plan_steps_shapes_and_every_completion_once_per_pass():
    steps = plan_steps(
        12, steps_per_generation=3, grad_accum=2, passes=2, generator=torch.Generator().manual_seed(0)
    )
    assert len(steps) == 3 * 2
    assert all(len(step) == 2 and all(len(micro) == 2 for micro in step) for step in steps)
    for first in (0, 3):  # each pass is three consecutive steps
        indices = [i for step in steps[first : first + 3] for micro in step for i in micro]
        assert sorted(indices) == list(range(12))
    order = [[i for step in steps[first : first + 3] for micro in step for i in micro] for first in (0, 3)]
    assert order[0] != order[1]  # each pass is shuffled anew
    assert order[0] != list(range(12))


def test_plan_steps_is_deterministic_for_a_seeded_generator():
    def plan(seed):
        return plan_steps(16, 2, 4, 3, torch.Generator().manual_seed(seed))

    assert plan(7) == plan(7)
    assert plan(7) != plan(8)


def test_plan_steps_refuses_a_rollout_that_does_not_split_evenly():
    # Flooring would silently drop completions (or leave empty micro-batches).
    with pytest.raises(ValueError, match="10 completions do not split into 3 steps x 2 micro-batches"):
        plan_steps(10, 3, 2, 1, torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------ training_batch
COMPLETIONS = Completions(
    prompt_ids=[[BOS, 3, 4], [BOS], [BOS, 5]],
    completion_ids=[[7, 8], [9, 10, EOS], [12]],
    truncated=[True, False, True],
)


def test_training_batch_aligns_per_token_values_with_the_response_mask():
    per_token = {
        "old_logps": [torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -4.0, -5.0]), torch.tensor([-6.0])]
    }
    per_sequence = {"advantages": torch.tensor([0.5, 1.5, 2.5])}
    batch = training_batch(COMPLETIONS, [2, 0], PAD, CPU, per_token, per_sequence)
    expected = left_padded_batch([[BOS, 5], [BOS, 3, 4]], [[12], [7, 8]], PAD)
    for name, tensor in expected.items():
        assert torch.equal(batch[name], tensor), name
    # W = longest chosen response = 2: row 0 has one token, row 1 two
    torch.testing.assert_close(batch["old_logps"], torch.tensor([[0.0, -6.0], [-1.0, -2.0]]))
    keep = batch["response_mask"][:, -2:].bool()
    torch.testing.assert_close(batch["old_logps"][keep], torch.tensor([-6.0, -1.0, -2.0]))
    torch.testing.assert_close(batch["advantages"], torch.tensor([2.5, 0.5]))
    assert batch["num_tokens"] == 3 + 5


def test_per_token_values_split_back_one_tensor_per_completion():
    seen_batches = []

    def compute(batch):  # "values" = the response token ids, over the last W positions
        seen_batches.append(batch["input_ids"].size(0))
        width = int(batch["response_mask"].sum(-1).max())
        return batch["input_ids"][:, -width:]

    values = per_token_values(compute, COMPLETIONS, PAD, CPU, batch_size=2)
    assert seen_batches == [2, 1]
    assert [v.tolist() for v in values] == [[7.0, 8.0], [9.0, 10.0, float(EOS)], [12.0]]
    assert all(v.dtype == torch.float32 for v in values)


# -------------------------------------------------------------------------------------- sample
SAMPLE_PROMPTS = [[BOS, 5, 6, 7], [BOS, 8], [BOS, 9, 10]]


@pytest.mark.parametrize("engine", ["hf", "native"])
def test_completions_end_at_their_first_eos_or_are_truncated(lm, engine):
    torch.manual_seed(0)
    out = sample(
        lm, SAMPLE_PROMPTS, 4, Sampling(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=6, engine=engine), PAD, EOS
    )
    assert len(out.completion_ids) == len(out.truncated) == 12
    assert out.engine == engine  # what the run's log names (rollout_log.RolloutLog)
    for tokens, truncated in zip(out.completion_ids, out.truncated):
        if truncated:
            assert len(tokens) == 6 and EOS not in tokens
        else:
            assert tokens[-1] == EOS and tokens.count(EOS) == 1
    # this seed gives both kinds, so both branches above were checked
    assert any(out.truncated) and not all(out.truncated)


def test_the_hf_engine_passes_its_shared_prompt_cache_without_a_deprecation_warning(lm):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sample(lm, SAMPLE_PROMPTS, 2, Sampling(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=3, engine="hf"), PAD, EOS)
    assert not [w for w in caught if "past_key_values" in str(w.message)], [str(w.message) for w in caught]


def test_auto_names_the_engine_that_ran(lm):
    out = sample(lm, SAMPLE_PROMPTS, 2, Sampling(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=3, engine="auto"), PAD, EOS)
    assert out.engine == "native"  # a Llama on sdpa: the native decoder applies


@pytest.mark.parametrize("engine", ["hf", "native"])
def test_the_k_completions_of_a_prompt_are_consecutive(lm, engine):
    # At a tiny temperature sampling is greedy: the K completions of a prompt are all equal to the greedy
    # completion of that prompt decoded alone (unpadded), which also checks the left padding.
    torch.manual_seed(0)
    out = sample(
        lm, SAMPLE_PROMPTS, 3, Sampling(temperature=1e-4, top_p=1.0, top_k=0, max_new_tokens=5, engine=engine), PAD, EOS
    )
    assert out.prompt_ids == [p for p in SAMPLE_PROMPTS for _ in range(3)]
    alone = []
    for prompt in SAMPLE_PROMPTS:
        ids = torch.tensor([prompt])
        generated = lm.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=5,
            pad_token_id=PAD,
            eos_token_id=EOS,
        )
        tokens = generated[0, len(prompt) :].tolist()
        alone.append(tokens[: tokens.index(EOS) + 1] if EOS in tokens else tokens)
    assert len({tuple(a) for a in alone}) == 3  # the prompts really lead to different completions
    assert out.completion_ids == [a for a in alone for _ in range(3)]


@pytest.mark.parametrize("engine", ["hf", "native"])
def test_sampling_is_reproducible_for_a_fixed_seed(lm, engine):
    sampling = Sampling(temperature=1.5, top_p=0.9, top_k=10, max_new_tokens=6, engine=engine)

    def draw(seed):
        torch.manual_seed(seed)
        out = sample(lm, SAMPLE_PROMPTS, 2, sampling, PAD, EOS)
        return out.completion_ids, out.truncated

    assert draw(3) == draw(3)
    assert draw(3) != draw(4)


def test_only_the_native_engine_keeps_caches_and_it_samples_what_sample_samples(lm):
    """sample_resuming is `sample` plus each completion's cache (the native engine); hf, and auto where the
    native engine does not apply, keep none (None: the caller prefills whole contexts)."""
    sampling = Sampling(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=4, engine="native")
    torch.manual_seed(3)
    plain = sample(lm, SAMPLE_PROMPTS, 2, sampling, PAD, EOS)
    torch.manual_seed(3)
    kept, caches = sample_resuming(lm, SAMPLE_PROMPTS, [None] * len(SAMPLE_PROMPTS), 2, sampling, PAD, EOS)
    assert kept.engine == "native" and kept.completion_ids == plain.completion_ids and kept.prompt_ids == plain.prompt_ids
    for a, b in zip(kept.sampler_logps, plain.sampler_logps):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert [c.length for c in caches] == [len(p) + len(ids) - 1 for p, ids in zip(kept.prompt_ids, kept.completion_ids)]
    assert sample_resuming(lm, SAMPLE_PROMPTS, [None] * len(SAMPLE_PROMPTS), 2, Sampling(1.0, 1.0, 0, 4, "hf"), PAD, EOS) is None
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=24, n_embd=16, n_layer=1, n_head=2, n_positions=32)).eval()
    assert sample_resuming(gpt2, SAMPLE_PROMPTS, [None] * len(SAMPLE_PROMPTS), 2, Sampling(1.0, 1.0, 0, 4, "auto"), PAD, EOS) is None


# ------------------------------------------------------------------------- response_token_logps
def _alone_logits(lm, prompt, response) -> torch.Tensor:
    """Logits at the positions that predict each response token, the row run alone and unpadded."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = lm(input_ids=ids).logits[0]
    return logits[len(prompt) - 1 : len(prompt) + len(response) - 1]


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_response_token_logps_match_a_naive_forward(lm, temperature):
    batch = left_padded_batch(PROMPTS, RESPONSES, PAD)
    with torch.no_grad():
        per_token, keep, entropy = response_token_logps(lm, batch, temperature=temperature, with_entropy=True)
    width = max(len(r) for r in RESPONSES)
    assert per_token.shape == keep.shape == entropy.shape == (2, width)
    for row, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES)):
        log_probs = torch.log_softmax(_alone_logits(lm, prompt, response).double() / temperature, dim=-1)
        expected = log_probs[torch.arange(len(response)), torch.tensor(response)]
        n = len(response)
        torch.testing.assert_close(per_token[row, -n:].double(), expected, atol=1e-5, rtol=1e-5)
        assert keep[row].tolist() == [0.0] * (width - n) + [1.0] * n
        assert per_token[row, : width - n].abs().sum().item() == 0.0
        expected_entropy = -(log_probs.exp() * log_probs).sum(-1)
        torch.testing.assert_close(entropy[row, -n:].double(), expected_entropy, atol=1e-5, rtol=1e-5)
        assert entropy[row, : width - n].abs().sum().item() == 0.0


def test_temperature_changes_the_log_probs(lm):
    batch = left_padded_batch(PROMPTS, RESPONSES, PAD)
    with torch.no_grad():
        cold, keep, none = response_token_logps(lm, batch)
        hot, _, _ = response_token_logps(lm, batch, temperature=2.0)
    assert none is None
    assert (cold - hot)[keep.bool()].abs().min().item() > 1e-4


# ----------------------------------------------------------------------------- response_values
def _prefix_values(classifier, prompt, response) -> torch.Tensor:
    """V(s_t) for each response token t: the classifier's own (pooled) score of the prefix before t."""
    sequence = prompt + response
    with torch.no_grad():
        return torch.stack(
            [
                classifier(input_ids=torch.tensor([sequence[:j]])).logits[0, 0]
                for j in range(len(prompt), len(sequence))
            ]
        )


def test_response_values_are_the_head_at_the_positions_before_each_token(classifier):
    batch = left_padded_batch(PROMPTS, RESPONSES, PAD)
    with torch.no_grad():
        values = response_values(classifier, batch)
    width = max(len(r) for r in RESPONSES)
    assert values.shape == (2, width) and values.dtype == torch.float32
    for row, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES)):
        n = len(response)
        with torch.no_grad():
            hidden = classifier.model(input_ids=torch.tensor([prompt + response])).last_hidden_state
            full = classifier.score(hidden)[0, :, 0]
        expected = full[len(prompt) - 1 : len(prompt) + n - 1]
        torch.testing.assert_close(values[row, -n:], expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            values[row, -n:], _prefix_values(classifier, prompt, response), atol=1e-5, rtol=1e-5
        )


def test_response_values_of_a_lora_wrapped_classifier(classifier):
    from peft import LoraConfig, get_peft_model

    base_values = response_values(classifier, left_padded_batch(PROMPTS, RESPONSES, PAD))
    torch.manual_seed(2)
    config = LoraConfig(
        task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    wrapped = get_peft_model(copy.deepcopy(classifier), config).eval()
    with torch.no_grad():  # the trainable copy of the head differs from the original too
        wrapped.get_base_model().score.modules_to_save["default"].weight.mul_(-2.0)
    batch = left_padded_batch(PROMPTS, RESPONSES, PAD)
    with torch.no_grad():
        values = response_values(wrapped, batch)
    for row, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES)):
        n = len(response)
        torch.testing.assert_close(
            values[row, -n:], _prefix_values(wrapped, prompt, response), atol=1e-5, rtol=1e-5
        )
        assert (values[row, -n:] - base_values[row, -n:]).abs().min().item() > 1e-3  # the adapter is in use
