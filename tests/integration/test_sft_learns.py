"""The foundation's promise: SFT through the real CLI teaches the tiny model the built-in task.

One real training run (a few hundred steps, about a minute on two cores): held-out exact-match
accuracy, greedy, must rise far above the untrained model's (which the run itself measures at step 0).
"""

from __future__ import annotations

import json

STEPS = 600  # the recipe default


def test_sft_raises_held_out_accuracy_well_above_the_untrained_model(alignctl, tmp_path, monkeypatch):
    # This test is about learning, not about sharing the CPU: let torch use both cores.
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    run_dir = tmp_path / "sft"
    result = alignctl(
        "train",
        "recipe=sft",
        f"recipe.max_steps={STEPS}",
        "recipe.eval_every=0",
        "data.eval_limit=500",
        f"hydra.run.dir={run_dir}",
    )
    assert result.returncode == 0, result.describe()
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if "eval_exact_match" in e]
    before, after = evals[0], evals[-1]
    assert before["step"] == 0 and after["step"] == STEPS
    assert before["eval_exact_match"] < 0.02
    assert after["eval_exact_match"] > before["eval_exact_match"] + 0.25, evals
    assert after["eval_loss"] < 0.5 * before["eval_loss"]
    assert json.loads((run_dir / "eval.json").read_text())["eval_exact_match"] == after["eval_exact_match"]
