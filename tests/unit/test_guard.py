"""recipe.guard: hand-made metric sequences that trip each signal and ones that must not, the guard in
the loop (stop ends the run at a step boundary with a save; warn trains on), and its config errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from alignctl.cli.app import compose_config
from alignctl.config.schema import GuardMode, NonFinite, Scheduler, TrainConfig
from alignctl.config.validation import validate
from alignctl.core.errors import ConfigError
from alignctl.rl.online_rl import correlation
from alignctl.train.guard import Guard
from alignctl.train.loop import LoopContext, train_loop
from alignctl.train.metrics import MetricsLogger


def guard(drop=0.05, kl_max=None, length_corr_max=None, min_evals=3, window=2) -> Guard:
    return Guard(drop, kl_max, length_corr_max, min_evals, window)


def feed(g: Guard, steps: list[tuple[int, dict, dict | None]]) -> list[tuple[int, str, str]]:
    """(step, step metrics, eval metrics or None) in order; what tripped, as (step, signal, message)."""
    tripped = []
    for step, metrics, evaluation in steps:
        tripped += [(step, t.signal, t.message) for t in g.after_step(step, metrics)]
        if evaluation is not None:
            tripped += [(step, t.signal, t.message) for t in g.after_eval(step, evaluation)]
    return tripped


def over_optimising(exact_match: list[float], scores: list[float]) -> list[tuple[int, dict, dict | None]]:
    """An eval every 5 steps; the training reward `scores` (one per eval interval) held for its 5 steps."""
    steps = []
    for index, (em, score) in enumerate(zip(exact_match, scores)):
        for step in range(5 * index + 1, 5 * index + 6):
            steps.append((step, {"objective/scores": score}, {"eval_exact_match": em} if step % 5 == 0 else None))
    return steps


def test_held_out_falling_while_the_reward_rises_trips_once_naming_both():
    g = guard()
    g.after_eval(0, {"eval_exact_match": 0.64})
    tripped = feed(g, over_optimising([0.80, 0.86, 0.84, 0.80, 0.70], [0.1, 0.2, 0.3, 0.4, 0.5]))
    assert [(step, signal) for step, signal, _ in tripped] == [(20, "held-out")]  # 86 -> 80: 6 points; and only once
    message = tripped[0][2]
    assert "eval_exact_match fell 6.0 points from its best 86.0 % (step 10; threshold 5)" in message
    assert "objective/scores rose (0.2 -> 0.4)" in message


def test_noise_below_the_drop_does_not_trip():
    tripped = feed(guard(), over_optimising([0.80, 0.86, 0.83, 0.85, 0.82, 0.84], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]))
    assert tripped == []


def test_too_few_evaluations_do_not_trip():
    # A fall of 20 points at the second evaluation: min_evals=3 waits for a third.
    tripped = feed(guard(min_evals=3), over_optimising([0.80, 0.60], [0.1, 0.5]))
    assert tripped == []
    assert [s for s, _, _ in feed(guard(min_evals=2), over_optimising([0.80, 0.60], [0.1, 0.5]))] == [10]


def test_a_fall_with_the_reward_falling_too_is_not_over_optimisation():
    assert feed(guard(), over_optimising([0.80, 0.86, 0.70, 0.60], [0.4, 0.4, 0.3, 0.2])) == []


def test_a_best_at_step_0_compares_with_the_first_steps_reward():
    g = guard(min_evals=2)
    g.after_eval(0, {"eval_exact_match": 0.60})
    tripped = feed(g, over_optimising([0.50], [0.3]) + [(6, {"objective/scores": 0.9}, None), (7, {"objective/scores": 0.9}, {"eval_exact_match": 0.5})])
    # Step 5: the reward stands where it started (0.3), no trip; step 7: it has risen (0.9).
    assert [(s, signal) for s, signal, _ in tripped] == [(7, "held-out")]


def test_other_held_out_and_reward_names_are_read_in_their_units():
    g = guard(drop=0.5, min_evals=2)
    tripped = feed(g, [(1, {"reward": 1.0}, {"eval_reward": 3.0}), (2, {"reward": 2.0}, None), (3, {"reward": 3.0}, {"eval_reward": 2.2})])
    assert tripped and "held-out eval_reward fell 0.8 from its best 3 (step 1; threshold 0.5) while reward rose" in tripped[0][2]
    g = guard(min_evals=2)  # DPO: pair accuracy on held-out pairs against the training margins
    tripped = feed(g, [(1, {"rewards/margins": 0.1}, {"eval_rewards/accuracies": 0.9}), (2, {"rewards/margins": 0.5}, {"eval_rewards/accuracies": 0.8})])
    assert tripped and "eval_rewards/accuracies fell 10.0 points" in tripped[0][2] and "rewards/margins rose" in tripped[0][2]


def test_kl_above_its_ceiling_over_a_full_window_trips():
    spike = [(1, {"objective/kl": 1.0}, None), (2, {"objective/kl": 30.0}, None), (3, {"objective/kl": 1.0}, None)]
    assert feed(guard(kl_max=20.0, window=3), spike) == []  # one spike, a mean of 10.7: no
    climbing = [(s, {"objective/kl": 5.0 * s}, None) for s in range(1, 8)]
    tripped = feed(guard(kl_max=20.0, window=3), climbing)
    assert [(s, signal) for s, signal, _ in tripped] == [(6, "kl")]  # step 5: (15 + 20 + 25) / 3 = 20, not above; step 6: 25
    assert "objective/kl averaged 25 over the last 3 steps, above recipe.guard_kl_max=20" in tripped[0][2]
    assert feed(guard(kl_max=None, window=3), climbing) == []


def test_length_correlated_with_reward_trips_and_noise_does_not():
    biased = [(s, {"completions/length_reward_corr": 0.8}, None) for s in range(1, 4)]
    tripped = feed(guard(length_corr_max=0.5, window=2), biased)
    assert [(s, signal) for s, signal, _ in tripped] == [(2, "length")]
    assert "correlate at 0.80 over the last 2 steps, above recipe.guard_length_corr=0.5" in tripped[0][2]
    noisy = [(s, {"completions/length_reward_corr": c}, None) for s, c in enumerate([0.7, -0.2, 0.6, 0.1, 0.3], start=1)]
    assert feed(guard(length_corr_max=0.5, window=2), noisy) == []


def test_correlation_is_pearsons_and_zero_for_equal_lengths():
    lengths, rewards = [1.0, 2.0, 3.0, 7.0], [2.0, 4.0, 6.5, 1.0]
    assert correlation(torch.tensor(lengths), torch.tensor(rewards)) == pytest.approx(float(np.corrcoef(lengths, rewards)[0, 1]))
    assert correlation(torch.tensor([4.0, 4.0, 4.0]), torch.tensor([0.0, 1.0, 0.0])) == 0.0


def test_a_guard_restored_from_its_state_trips_where_the_uninterrupted_one_does(tmp_path):
    """A resume rebuilds the guard from the checkpoint: the best evaluation, the window and what already
    tripped come back through trainer_state.pt (loaded weights_only), so the trip is the same step."""
    steps = over_optimising([0.80, 0.86, 0.84, 0.80, 0.70], [0.1, 0.2, 0.3, 0.4, 0.5])
    whole = guard(kl_max=1.0)
    whole.after_eval(0, {"eval_exact_match": 0.64})
    expected = feed(whole, steps)
    assert [s for s, _, _ in expected] == [20]
    before = guard(kl_max=1.0)
    before.after_eval(0, {"eval_exact_match": 0.64})
    assert feed(before, steps[:12]) == []  # stopped after step 12: the best (step 10) is behind it
    torch.save({"guard": before.state()}, tmp_path / "state.pt")
    resumed = guard(kl_max=1.0)
    resumed.load_state(torch.load(tmp_path / "state.pt", weights_only=True)["guard"])
    assert feed(resumed, steps[12:]) == expected
    fresh = feed(guard(kl_max=1.0), steps[12:])  # one that forgot the best at step 10 trips later, or not at all
    assert [s for s, _, _ in fresh] != [20]


# ------------------------------------------------------------------------------------- in the loop
def recipe(mode: GuardMode, max_steps: int = 10) -> TrainConfig:
    return TrainConfig(stage="ppo", max_steps=max_steps, lr=0.1, batch_size=1, grad_accum=1, max_length=8, scheduler=Scheduler.constant,
                       warmup_ratio=0.0, weight_decay=0.0, max_grad_norm=None, optimizer={"_target_": "torch.optim.SGD"}, eval_every=2,
                       save_every=0, keep_last=1, eval_batch_size=1, eval_max_new_tokens=1, nonfinite=NonFinite.stop, lm_head_chunk=0,
                       fused_mlp=False, fused_rms_norm=False, trim_top_layer=False, guard=mode, guard_drop=0.05, guard_kl_max=None, guard_length_corr=None,
                       guard_min_evals=3, guard_window=1)


def run_guarded(tmp_path, mode: GuardMode, capsys):
    """Ten steps whose training reward climbs while the held-out score peaks at step 4 and falls."""
    model = torch.nn.Linear(1, 1, bias=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    logger = MetricsLogger(tmp_path, 10, 0, tensorboard=False, log_every=1, enabled=True)
    held_out = {0: 0.5, 2: 0.7, 4: 0.8, 6: 0.77, 8: 0.7, 10: 0.6}
    saved, steps = [], iter(range(1, 11))
    ctx = LoopContext(model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0), logger,
                      evaluate=lambda step: {"eval_exact_match": held_out.get(step, 0.6)}, save=saved.append)

    def step_fn(batch, num_items):
        return model.weight.sum() ** 2, {"objective/scores": torch.tensor(0.1 * batch["step"])}

    try:
        last = train_loop(ctx, recipe(mode), lambda: [{"step": next(steps), "num_items": 1, "num_tokens": 1}], step_fn)
    finally:
        logger.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    guard_lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("guard:")]
    return ctx, last, saved, records, guard_lines


def test_stop_ends_the_run_at_the_step_that_tripped_with_a_save(tmp_path, capsys):
    ctx, last, saved, records, lines = run_guarded(tmp_path, GuardMode.stop, capsys)
    assert (ctx.step, saved) == (8, [8])  # 80 -> 70 at step 8
    assert last["eval_exact_match"] == 0.7
    assert len(lines) == 1 and lines[0].endswith("stopping at step 8") and ctx.guard_stop == lines[0]
    assert [r["guard"] for r in records if "guard" in r] == ["held-out"]
    assert max(r["step"] for r in records) == 8


def test_warn_says_it_once_and_trains_on(tmp_path, capsys):
    ctx, _, saved, records, lines = run_guarded(tmp_path, GuardMode.warn, capsys)
    assert (ctx.step, saved, ctx.guard_stop) == (10, [10], None)
    assert len(lines) == 1 and lines[0].endswith("training on (recipe.guard=warn)")
    assert [r["step"] for r in records if "guard" in r] == [8]


# ------------------------------------------------------------------------------------- config
def _validate(*overrides: str):
    return validate(OmegaConf.create(OmegaConf.to_container(compose_config(list(overrides)), resolve=True)))


def test_a_kl_ceiling_is_taken_where_objective_kl_is_logged():
    assert _validate("recipe=ppo", "recipe.guard=stop", "recipe.guard_kl_max=5").recipe.guard_kl_max == 5
    assert _validate("recipe=grpo", "recipe.guard=warn", "recipe.guard_kl_max=5", "recipe.beta=0.1").recipe.guard_kl_max == 5
    assert _validate("recipe=dpo", "recipe.guard_kl_max=5").recipe.guard_kl_max == 5  # guard off: nothing is watched anyway


def test_the_guard_is_off_by_default_and_typed():
    recipe = _validate("recipe=ppo", "recipe.guard=stop").recipe
    assert recipe.guard == GuardMode.stop and recipe.guard_drop == 0.05
    assert _validate("recipe=dpo").recipe.guard == GuardMode.off


@pytest.mark.parametrize("overrides, culprits", [
    (["recipe=ppo", "recipe.guard=halt"], ["recipe.guard", "halt", "off", "warn", "stop"]),
    (["recipe=grpo", "recipe.guard_drop=0"], ["recipe.guard_drop", "(0, 1000000000]"]),
    (["recipe=ppo", "recipe.guard_length_corr=1.5"], ["recipe.guard_length_corr", "(0, 1]"]),
    (["recipe=dpo", "recipe.guard_min_evals=1"], ["recipe.guard_min_evals", "[2, 1000000]"]),
    (["recipe=sft", "recipe.guard=warn"], ["recipe.guard", "sft has no training reward", "valid here: off"]),
    (["recipe=reward", "recipe.guard=stop"], ["recipe.guard", "reward has no training reward"]),
    (["recipe=kto", "recipe.guard=stop"], ["recipe.guard", "kto has no training reward"]),
    # A KL ceiling where no objective/kl is logged would never be read: refused, not silently ignored.
    (["recipe=grpo", "recipe.guard=warn", "recipe.guard_kl_max=5", "recipe.beta=0"], ["recipe.guard_kl_max", "beta=0", "valid here: null"]),
    (["recipe=dpo", "recipe.guard=stop", "recipe.guard_kl_max=5"], ["recipe.guard_kl_max", "dpo logs no objective/kl"]),
])
def test_bad_guard_settings_are_one_line_naming_what_is_valid(overrides, culprits):
    with pytest.raises(ConfigError) as caught:
        _validate(*overrides)
    message = str(caught.value)
    assert "\n" not in message
    for culprit in culprits:
        assert culprit in message, message
