"""The sampler/trainer mismatch: its metric, the importance-sampling correction (hand-worked values),
and `_max` metrics reduced by max, not summed."""

from __future__ import annotations

import math

import pytest
import torch

from alignctl.core import distributed
from alignctl.nn.losses import logprob_gap, rollout_correction
from alignctl.rl import decode
from alignctl.rl.rollout import Completions, completions_from

TRAINER = torch.tensor([[-0.5, -1.0, -2.0, 0.0], [-0.1, -0.2, -0.3, -0.4]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)


def test_the_mismatch_is_exactly_zero_when_the_sampler_is_the_trainer():
    gap = logprob_gap(TRAINER, TRAINER.clone(), MASK)
    assert gap["rollout/logprob_diff"].item() == 0.0
    assert gap["rollout/logprob_diff_max"].item() == 0.0


def test_the_mismatch_is_the_mean_and_max_absolute_gap_over_completion_tokens():
    sampler = TRAINER.clone()
    sampler[0, 1] = -1.5  # |Δ| 0.5
    sampler[1, 3] = -0.1  # |Δ| 0.3
    sampler[0, 3] = -9.0  # padding: not counted
    gap = logprob_gap(TRAINER, sampler, MASK)
    assert gap["rollout/logprob_diff"].item() == pytest.approx(0.8 / 7)  # 7 completion tokens
    assert gap["rollout/logprob_diff_max"].item() == pytest.approx(0.5)


@pytest.mark.parametrize("mode", ["off", "truncate", "mask"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_correction_is_the_identity_when_the_log_probs_agree(mode, level):
    weights, metrics = rollout_correction(TRAINER, TRAINER.clone(), MASK, mode, level, cap=2.0)
    assert torch.equal(weights, MASK.float())
    assert metrics["rollout/is_weight_mean"].item() == 1.0
    assert metrics["rollout/is_masked_frac"].item() == 0.0


def test_truncate_caps_the_ratio_per_token():
    # log π_old − log μ per token: 0, ln 3 (ratio 3, capped to 2), −ln 2 (ratio 0.5, kept as is)
    trainer = torch.tensor([[-1.0, -1.0, -1.0]])
    sampler = torch.tensor([[-1.0, -1.0 - math.log(3), -1.0 + math.log(2)]])
    weights, metrics = rollout_correction(trainer, sampler, torch.ones(1, 3, dtype=torch.bool), "truncate", "token", cap=2.0)
    assert weights[0].tolist() == pytest.approx([1.0, 2.0, 0.5])
    assert metrics["rollout/is_weight_mean"].item() == pytest.approx(3.5 / 3)
    assert metrics["rollout/is_weight_max"].item() == pytest.approx(2.0)


def test_mask_drops_tokens_whose_ratio_leaves_one_over_cap_to_cap():
    # ratios 1, 3 (> 2: out), 0.4 (< 1/2: out), 1.5 (in)
    trainer = torch.zeros(1, 4)
    sampler = -torch.log(torch.tensor([[1.0, 3.0, 0.4, 1.5]]))
    weights, metrics = rollout_correction(trainer, sampler, torch.ones(1, 4, dtype=torch.bool), "mask", "token", cap=2.0)
    assert weights.tolist() == [[1.0, 0.0, 0.0, 1.0]]
    assert metrics["rollout/is_masked_frac"].item() == pytest.approx(0.5)


def test_sequence_level_uses_the_product_of_the_token_ratios():
    # row 0: ratios 1.5 and 1.5 -> 2.25 > 2: truncated to 2 (mask: dropped whole); row 1: 1.5 and 1/1.5 -> 1
    trainer = torch.zeros(2, 2)
    sampler = -torch.log(torch.tensor([[1.5, 1.5], [1.5, 1 / 1.5]]))
    mask = torch.ones(2, 2, dtype=torch.bool)
    truncated, _ = rollout_correction(trainer, sampler, mask, "truncate", "sequence", cap=2.0)
    assert truncated.flatten().tolist() == pytest.approx([2.0, 2.0, 1.0, 1.0])
    masked, metrics = rollout_correction(trainer, sampler, mask, "mask", "sequence", cap=2.0)
    assert masked.tolist() == [[0.0, 0.0], [1.0, 1.0]]
    assert metrics["rollout/is_masked_frac"].item() == pytest.approx(0.5)
    # token level, the same log-probs: every token ratio lies in [1/2, 2], nothing is masked
    token, _ = rollout_correction(trainer, sampler, mask, "mask", "token", cap=2.0)
    assert token.tolist() == [[1.0, 1.0], [1.0, 1.0]]


def test_padding_neither_weighs_nor_counts_in_the_sequence_ratio():
    trainer = torch.tensor([[0.0, 0.0]])
    sampler = torch.tensor([[-50.0, 0.0]])  # the first column is padding: its huge log-ratio must not count
    weights, _ = rollout_correction(trainer, sampler, torch.tensor([[False, True]]), "mask", "sequence", cap=2.0)
    assert weights.tolist() == [[0.0, 1.0]]


def test_metrics_ending_in_max_are_reduced_by_max():
    assert distributed.is_max_metric("rollout/logprob_diff_max") and not distributed.is_max_metric("rollout/logprob_diff")
    reduced = distributed.reduce_metrics({"rollout/logprob_diff_max": 0.25, "loss": 1.5})  # one process: as given
    assert reduced == {"rollout/logprob_diff_max": 0.25, "loss": 1.5}


def test_completions_cut_the_sampler_log_probs_like_their_ids():
    tokens = torch.tensor([[5, 2, 0], [6, 7, 8]])  # EOS 2 ends the first row; the second is truncated
    logps = torch.tensor([[-0.1, -0.2, -0.3], [-1.0, -2.0, -3.0]])
    completions = completions_from(tokens, [[1]], 2, eos_id=2, logps=logps)
    assert [t.tolist() for t in completions.sampler_logps] == [pytest.approx([-0.1, -0.2]), pytest.approx([-1.0, -2.0, -3.0])]


def test_dynamic_sampling_carries_the_sampler_log_probs():
    from alignctl.rl.dynamic_sampling import concatenate, select_groups
    from alignctl.rl.online_rl import ScoredRollout

    logps = [torch.tensor([float(-i)]) for i in range(4)]
    completions = Completions([[1]] * 4, [[i] for i in range(4)], [False] * 4, "native", logps)
    rollout = ScoredRollout({"prompt": ["a", "b"]}, ["a", "a", "b", "b"], list("wxyz"), completions, torch.arange(4.0), {}, {})
    picked = select_groups(rollout, [1], 2)
    assert [t.item() for t in picked.completions.sampler_logps] == [-2.0, -3.0]
    both = concatenate([picked, select_groups(rollout, [0], 2)])
    assert [t.item() for t in both.completions.sampler_logps] == [-2.0, -3.0, -0.0, -1.0]


def test_native_engine_log_probs_are_those_of_the_warped_distribution():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)).eval()
    prompt = torch.tensor([[3, 4, 5]])
    tokens, logps = decode.sample(model, prompt, torch.ones_like(prompt), 2, 0.7, 5, 1.0, 4, eos_id=-1, pad_id=0, with_logps=True)
    ids = torch.cat([prompt.repeat(2, 1), tokens], 1)
    logits = model(input_ids=ids).logits[:, prompt.size(1) - 1 : -1].float() / 0.7
    top = logits.topk(5, dim=-1).values[..., -1:]
    trainer = torch.log_softmax(logits.masked_fill(logits < top, float("-inf")), -1).gather(-1, tokens[..., None]).squeeze(-1)
    assert torch.allclose(logps, trainer, atol=1e-4)
