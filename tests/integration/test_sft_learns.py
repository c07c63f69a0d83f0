"""The foundation's promise: SFT through the real CLI teaches the tiny model the built-in task.

One real training run (a few hundred steps, about a minute on two cores; the `learned_sft_run`
fixture, which the RL stage tests then start from): held-out exact-match accuracy, greedy, must
rise far above the untrained model's (which the run itself measures at step 0).
"""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow  # a learning curve: make test-slow

SFT_STEPS = 600  # the recipe default, as conftest's learned_sft_run trains


def test_sft_raises_held_out_accuracy_well_above_the_untrained_model(learned_sft_run):
    run_dir, result = learned_sft_run
    assert result.returncode == 0, result.describe()
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if "eval_exact_match" in e]
    before, after = evals[0], evals[-1]
    assert before["step"] == 0 and after["step"] == SFT_STEPS
    assert before["eval_exact_match"] < 0.02
    assert after["eval_exact_match"] > before["eval_exact_match"] + 0.25, evals
    assert after["eval_loss"] < 0.5 * before["eval_loss"]
    assert json.loads((run_dir / "eval.json").read_text())["eval_exact_match"] == after["eval_exact_match"]
