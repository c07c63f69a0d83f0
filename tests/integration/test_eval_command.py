"""`alignctl eval run=<dir>`: re-evaluates a run's checkpoint without training and agrees with the
evaluation the run itself made at its last step."""

from __future__ import annotations

import json


def test_eval_reproduces_the_runs_final_evaluation(alignctl, tmp_path):
    run = tmp_path / "sft"
    trained = alignctl("train", "recipe.max_steps=15", "recipe.eval_every=0", "data.eval_limit=40", f"hydra.run.dir={run}")
    assert trained.returncode == 0, trained.describe()
    final = json.loads((run / "eval.json").read_text())

    evaluated = alignctl("eval", f"run={run}")
    assert evaluated.returncode == 0, evaluated.describe()
    [eval_dir] = (run / "eval").iterdir()
    again = json.loads((eval_dir / "eval.json").read_text())
    assert again["step"] == 0
    assert again["eval_exact_match"] == final["eval_exact_match"]
    assert abs(again["eval_loss"] - final["eval_loss"]) < 1e-6
    lineage = json.loads((eval_dir / "lineage.json").read_text())
    assert lineage["parents"]["policy"]["run_dir"] == str(run.resolve())
    assert not (eval_dir / "checkpoint").exists()  # nothing was trained, nothing is saved


def test_eval_of_a_directory_that_is_not_a_run_is_one_line(alignctl, tmp_path):
    result = alignctl("eval", f"run={tmp_path}")
    assert result.returncode == 2 and len(result.stderr_lines()) == 1, result.describe()
    assert "not an alignctl run directory" in result.stderr
