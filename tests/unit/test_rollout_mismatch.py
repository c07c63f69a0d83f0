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


def test_the_loop_takes_the_max_of_micro_batches_for_max_metrics_and_adds_the_rest(tmp_path):
    """Three micro-batches of one step: `x_max` 0.2, 0.7, 0.4 -> 0.7 (a sum would say 1.3); `share` 0.25 each adds up to 0.75."""
    from alignctl.config.schema import GuardMode, NonFinite, Scheduler, TrainConfig
    from alignctl.train.loop import LoopContext, train_loop
    from alignctl.train.metrics import MetricsLogger

    model = torch.nn.Linear(1, 1, bias=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    logger = MetricsLogger(tmp_path, 1, 0, tensorboard=False, log_every=1, enabled=True)
    ctx = LoopContext(model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0), logger, evaluate=lambda step: {}, save=lambda *a: None)
    recipe = TrainConfig(stage="sft", max_steps=1, lr=0.1, batch_size=1, grad_accum=3, max_length=8, scheduler=Scheduler.constant, warmup_ratio=0.0,
                         weight_decay=0.0, max_grad_norm=None, optimizer={"_target_": "torch.optim.SGD"}, eval_every=0, save_every=0, keep_last=1,
                         eval_batch_size=1, eval_max_new_tokens=1, nonfinite=NonFinite.stop, lm_head_chunk=0, fused_mlp=False, fused_rms_norm=False, trim_top_layer=False,
                         guard=GuardMode.off, guard_drop=0.05, guard_kl_max=None, guard_length_corr=None, guard_min_evals=3, guard_window=5)

    def step_fn(batch, num_items):
        return model.weight.sum() ** 2 / 3, {"x_max": torch.tensor(batch["x"]), "share": torch.tensor(0.25)}

    try:
        last = train_loop(ctx, recipe, lambda: [{"x": x, "num_items": 1, "num_tokens": 1} for x in (0.2, 0.7, 0.4)], step_fn)
    finally:
        logger.close()
    assert last["x_max"] == pytest.approx(0.7) and last["share"] == pytest.approx(0.75)


def test_the_hf_engine_returns_the_trainer_log_probs_in_float32():
    from transformers import LlamaConfig, LlamaForCausalLM

    from alignctl.nn.logprobs import response_token_logps
    from alignctl.rl.rollout import Sampling, per_token_values, sample

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         pad_token_id=0, eos_token_id=2, bos_token_id=1)).eval()
    completions = sample(model, [[1, 5, 6], [1, 7]], 2, Sampling(0.8, 1.0, 0, 5, "hf"), pad_id=0, eos_id=2)
    assert completions.engine == "hf" and [len(v) for v in completions.sampler_logps] == [len(c) for c in completions.completion_ids]
    trainer = per_token_values(lambda b: response_token_logps(model, b, 0.8)[0], completions, 0, torch.device("cpu"), 4)
    for ours, theirs in zip(completions.sampler_logps, trainer):
        assert torch.allclose(ours, theirs, atol=1e-5)


class _Logprob:
    def __init__(self, value: float):
        self.logprob = value


def test_vllm_asks_for_processed_log_probs_and_falls_back_on_an_older_vllm(monkeypatch):
    import sys
    import types
    from types import SimpleNamespace

    from alignctl.rl import vllm_engine

    asked = []

    def params(**kwargs):
        asked.append(kwargs)
        if "logprobs_mode" in kwargs and old:
            raise TypeError("unexpected keyword argument 'logprobs_mode'")
        return kwargs

    module = types.ModuleType("vllm")
    module.SamplingParams = params
    monkeypatch.setitem(sys.modules, "vllm", module)
    outputs = [SimpleNamespace(token_ids=(7, 2), finish_reason="stop", logprobs=[{7: _Logprob(-0.5)}, {2: _Logprob(-1.25)}]),
               SimpleNamespace(token_ids=(8,), finish_reason="stop", logprobs=[{8: _Logprob(-0.75)}])]  # its EOS left out: put back, log-prob 0
    engine = object.__new__(vllm_engine.VLLMRollouts)
    engine.llm = SimpleNamespace(generate=lambda prompts, sampling_params, use_tqdm: [SimpleNamespace(outputs=outputs)])
    for old in (False, True):
        asked.clear()
        ids, logps = engine.sample([[1]], 2, 1.0, 1.0, 0, 4, eos_id=2, with_logps=True)
        assert ids == [[7, 2], [8, 2]] and logps == [[-0.5, -1.25], [-0.75, 0.0]]
        assert asked[-1]["logprobs"] == 0 and ("logprobs_mode" in asked[-1]) is not old
        assert asked[0]["logprobs_mode"] == "processed_logprobs"


def _reduce_on_two_ranks(rank: int, port: int, out) -> None:
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    distributed.setup("cpu")
    try:
        out.put((rank, distributed.reduce_metrics({"rollout/logprob_diff_max": [0.3, 0.9][rank], "share": [0.25, 0.5][rank]})))
    finally:
        distributed.teardown()


@pytest.mark.slow  # two spawned processes import torch: ~30 s on two cores
def test_max_metrics_are_the_max_over_ranks_the_rest_the_sum():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    context = mp.get_context("spawn")
    out = context.Queue()
    workers = [context.Process(target=_reduce_on_two_ranks, args=(rank, port, out)) for rank in range(2)]
    for worker in workers:
        worker.start()
    results = dict(out.get(timeout=120) for _ in workers)
    for worker in workers:
        worker.join(timeout=60)
    assert results[0] == results[1] == pytest.approx({"rollout/logprob_diff_max": 0.9, "share": 0.75})


def test_the_hf_engine_log_probs_are_those_of_the_warped_distribution():
    """top-k 5 at temperature 0.7: each sampled token's log-prob is log softmax over the 5 largest logits / 0.7."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from alignctl.rl.rollout import Sampling, sample

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         pad_token_id=0, eos_token_id=2, bos_token_id=1)).eval()
    completions = sample(model, [[3, 4, 5]], 2, Sampling(0.7, 1.0, 5, 4, "hf"), pad_id=0, eos_id=31)
    for ids, logps in zip(completions.completion_ids, completions.sampler_logps):
        full = torch.tensor([[3, 4, 5, *ids]])
        logits = model(input_ids=full).logits[0, 2:-1].float() / 0.7
        top = logits.topk(5, dim=-1).values[:, -1:]
        expected = torch.log_softmax(logits.masked_fill(logits < top, float("-inf")), -1).gather(-1, torch.tensor(ids)[:, None]).squeeze(-1)
        assert torch.allclose(logps, expected, atol=1e-4)


def test_the_probe_verdict_follows_the_gap():
    from alignctl.rl.probe import verdict

    assert "float32 rounding" in verdict(2e-7, 1e-6, 2.0, "off")
    assert "low-precision rounding" in verdict(6e-4, 4e-3, 2.0, "off")
    assert "cheap insurance" in verdict(5e-3, 0.2, 2.0, "off")
    assert "consider recipe.rollout_is=truncate" in verdict(5e-3, math.log(2.0) + 0.01, 2.0, "off")  # a token past the cap
    assert "recipe.rollout_is=mask corrects" in verdict(5e-3, 1.0, 2.0, "mask")
