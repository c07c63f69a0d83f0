"""`alignctl eval run=<dir>`: re-evaluates a run's checkpoint without training and agrees with the
evaluation the run itself made at its last step: the same model (the run's base, its trained
weights) against the same reference (its parent, or its base with the adapter off), never the
checkpoint against itself. It writes no checkpoint and no merged base into <run>/eval/<time>/."""

from __future__ import annotations

import json
import math

import pytest

QUICK = ["recipe.eval_every=0", "data.eval_limit=16", "recipe.max_length=16", "recipe.batch_size=8"]
DPO_METRICS = ("eval_loss", "eval_rewards/chosen", "eval_rewards/rejected", "eval_rewards/margins", "eval_logps/chosen")


def evaluated(alignctl, run, *overrides):
    """Run `alignctl eval run=<run>` and return (its eval dir, eval.json)."""
    result = alignctl("eval", f"run={run}", *overrides)
    assert result.returncode == 0, result.describe()
    [eval_dir] = (run / "eval").iterdir()
    return eval_dir, json.loads((eval_dir / "eval.json").read_text())


def test_eval_reproduces_the_runs_final_evaluation(alignctl, tmp_path):
    run = tmp_path / "sft"
    trained = alignctl("train", "recipe.max_steps=15", "recipe.eval_every=0", "data.eval_limit=40", f"hydra.run.dir={run}")
    assert trained.returncode == 0, trained.describe()
    final = json.loads((run / "eval.json").read_text())

    eval_dir, again = evaluated(alignctl, run)
    assert again["step"] == 0
    assert again["eval_exact_match"] == final["eval_exact_match"]
    assert abs(again["eval_loss"] - final["eval_loss"]) < 1e-6
    lineage = json.loads((eval_dir / "lineage.json").read_text())
    assert lineage["parents"]["evaluated"]["run_dir"] == str(run.resolve())
    assert lineage["parents"]["evaluated"]["step"] == 15  # the checkpoint it loaded
    assert not (eval_dir / "checkpoint").exists()  # nothing was trained, nothing is saved


@pytest.fixture(scope="module")
def dpo_runs(tmp_path_factory):
    """A full DPO run from a full SFT run (reference: that parent, a separate model) and a LoRA DPO
    run from the model itself (reference: the same base with the adapter switched off)."""
    from tests.integration.conftest import run_cli

    root = tmp_path_factory.mktemp("eval_dpo")
    plan = {
        "sft_full": ["recipe=sft", "recipe.max_steps=6", "recipe.lr=3e-3"],
        # A relative parent, as typed from the runs' directory: eval (started elsewhere) must find it.
        "dpo_full": ["recipe=dpo", "recipe.max_steps=6", "recipe.lr=1e-3", "inputs.policy=sft_full"],
        "dpo_lora": ["recipe=dpo", "adapter=lora", "recipe.max_steps=6", "recipe.lr=1e-2"],
    }
    for name, args in plan.items():
        done = run_cli(["train", *args, *QUICK, f"hydra.run.dir={root / name}"], cwd=root)
        assert done.returncode == 0, done.describe()
    return root


@pytest.mark.parametrize("name", ["dpo_full", "dpo_lora"])
def test_eval_of_a_dpo_run_measures_it_against_its_own_reference(alignctl, dpo_runs, name):
    run = dpo_runs / name
    final = json.loads((run / "eval.json").read_text())
    # Against itself the loss would be ln 2 and every reward 0: the run moved away from its reference.
    assert abs(final["eval_loss"] - math.log(2)) > 1e-3 and abs(final["eval_rewards/margins"]) > 1e-3, final

    eval_dir, again = evaluated(alignctl, run)
    for key in DPO_METRICS:
        assert again[key] == pytest.approx(final[key], abs=1e-5), key
    assert again["eval_rewards/accuracies"] == final["eval_rewards/accuracies"]
    # The evaluation loads the run's adapter over its base: no merged copy of that base is written.
    assert not (eval_dir / "base_model").exists()
    assert sum(f.stat().st_size for f in eval_dir.rglob("*") if f.is_file()) < 1_000_000


def test_eval_of_a_run_without_an_eval_split_is_one_line(alignctl, dpo_runs):
    result = alignctl("eval", f"run={dpo_runs / 'sft_full'}", "data.eval_split=null")
    assert result.returncode == 2 and len(result.stderr_lines()) == 1, result.describe()
    assert "data.eval_split" in result.stderr and "nothing to evaluate" in result.stderr
    assert not (dpo_runs / "sft_full" / "eval").exists()


def test_eval_of_a_directory_that_is_not_a_run_is_one_line(alignctl, tmp_path):
    result = alignctl("eval", f"run={tmp_path}")
    assert result.returncode == 2 and len(result.stderr_lines()) == 1, result.describe()
    assert "not an alignctl run directory" in result.stderr


def test_eval_json_prints_one_object_with_the_evaluation(alignctl, tmp_path):
    run = tmp_path / "sft"
    trained = alignctl("train", "recipe.max_steps=2", *QUICK, f"hydra.run.dir={run}")
    assert trained.returncode == 0, trained.describe()
    result = alignctl("eval", f"run={run}", "--json")
    assert result.returncode == 0, result.describe()
    report = json.loads(result.stdout)  # stdout is the JSON alone: the tables went to stderr
    [eval_dir] = (run / "eval").iterdir()
    assert report == {"eval_dir": str(eval_dir), "run": str(run.resolve()), **json.loads((eval_dir / "eval.json").read_text())}
    assert "eval_exact_match" in report and "evaluation (no training)" in result.stderr
    after = alignctl("plan", "recipe=sft")  # the console prints to stdout again afterwards
    assert "trainable" in after.stdout, after.describe()
