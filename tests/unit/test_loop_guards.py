"""The loop's guards, on a two-parameter model: a non-finite step stops the run or is skipped (and
counted) without touching the weights, and a signal ends the run after the step with a save."""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch

from alignctl.config.schema import GuardMode, NonFinite, Scheduler, TrainConfig
from alignctl.runs.interrupt import Interrupted
from alignctl.train.loop import LoopContext, NonFiniteLoss, train_loop
from alignctl.train.metrics import MetricsLogger, keep_until_step


def recipe(max_steps: int, nonfinite: NonFinite, save_every: int = 0) -> TrainConfig:
    return TrainConfig(stage="sft", max_steps=max_steps, lr=0.1, batch_size=1, grad_accum=1, max_length=8, scheduler=Scheduler.constant,
                       warmup_ratio=0.0, weight_decay=0.0, max_grad_norm=None, optimizer={"_target_": "torch.optim.SGD"}, eval_every=0,
                       save_every=save_every, keep_last=1, eval_batch_size=1, eval_max_new_tokens=1, nonfinite=nonfinite, lm_head_chunk=0, fused_mlp=False, fused_rms_norm=False, trim_top_layer=False,
                       guard=GuardMode.off, guard_drop=0.05, guard_kl_max=None, guard_length_corr=None, guard_min_evals=3, guard_window=5)


def run(tmp_path, steps: int, nonfinite: NonFinite, poison: set[int], on_step=None, save_every: int = 0):
    """Train w to minimise (w - 1)^2; the loss of the steps in `poison` is multiplied by nan."""
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    saved, weights = [], []
    logger = MetricsLogger(tmp_path, steps, 0, tensorboard=False, log_every=1, enabled=True)
    ctx = LoopContext(model, optimizer, scheduler, logger, evaluate=lambda step: {}, save=saved.append)
    counter = iter(range(1, steps + 1))

    def next_step():
        step = next(counter)
        if on_step:
            on_step(step)
        return [{"step": step, "num_items": 1, "num_tokens": 1}]

    def step_fn(batch, num_items):
        loss = (model.weight.sum() - 1) ** 2
        if batch["step"] in poison:
            loss = loss * float("nan")
        weights.append(float(model.weight.detach()))
        return loss, {}

    try:
        train_loop(ctx, recipe(steps, nonfinite, save_every), next_step, step_fn)
    finally:
        logger.close()
    return ctx, saved, weights, float(model.weight.detach())


def test_a_nan_loss_stops_the_run_naming_the_step(tmp_path):
    with pytest.raises(NonFiniteLoss, match="step 3: the loss is nan"):
        run(tmp_path, 5, NonFinite.stop, poison={3})


def test_skip_leaves_the_weights_and_counts(tmp_path):
    ctx, _, weights, final = run(tmp_path, 5, NonFinite.skip, poison={2, 4})
    assert ctx.skipped_steps == 2
    # The weight seen by step 3 is the one after step 1: step 2 changed nothing.
    assert weights[2] == weights[1] and weights[4] == weights[3]
    (tmp_path / "clean").mkdir()
    _, _, _, clean_final = run(tmp_path / "clean", 3, NonFinite.skip, poison=set())
    assert final == pytest.approx(clean_final)  # 5 steps with 2 skipped = 3 clean steps (constant lr)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in lines] == [0, 1, 1, 2, 2]
    assert math.isnan(lines[1]["loss"])


def test_a_signal_ends_the_run_after_the_step_with_a_save(tmp_path):
    def signal_at_step_2(step: int) -> None:
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives while step 2 is being computed

    with pytest.raises(Interrupted) as stopped:
        run(tmp_path, 5, NonFinite.stop, poison=set(), on_step=signal_at_step_2, save_every=0)
    assert stopped.value.step == 2 and stopped.value.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the loop put the handler back


def test_keep_until_step_drops_later_lines_and_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1}\n{"step": 2, "loss": 2}\n{"step": 2, "eval_loss": 3}\n{"step": 3, "loss": 4}\n{"step": 4, "lo')
    keep_until_step(path, 2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 2]
