"""recipe=distill through the real CLI: the student samples, the teacher (inputs.teacher) scores.

Mechanics run on a teacher trained a few SFT steps from the tiny model; the learning test (slow tier)
distills the shared SFT run from a GRPO teacher trained on it and must beat that SFT run on held-out
exact match.
"""

from __future__ import annotations

import json
import shutil
import sys
import textwrap

import pytest
from stage_runs import StageRun

from tests.integration.conftest import run_cli
from tests.integration.test_resume import assert_same_trajectory, rewind

SMALL = ["recipe.batch_size=16", "recipe.eval_every=0", "data.eval_limit=20"]


def _train(run_dir, *overrides):
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    result = run_cli(["train", *overrides, f"hydra.run.dir={run_dir}"], cwd=run_dir.parent)
    return StageRun(run_dir.name, run_dir, result)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A teacher that differs from the untrained tiny student: a few SFT steps at a high rate."""
    run = _train(tmp_path_factory.mktemp("distill") / "teacher", "recipe=sft", "recipe.max_steps=4", "recipe.lr=3e-3", *SMALL)
    run.assert_finished()
    return run.dir


def test_distill_trains_toward_the_teacher_and_records_it(teacher, tmp_path, run_cmd):
    run = _train(tmp_path / "distill", "recipe=distill", f"inputs.teacher={teacher}", "recipe.max_steps=3", "recipe.lr=1e-3", *SMALL)
    run.assert_finished()
    train = run.train_records()
    assert [r["step"] for r in train] == [1, 2, 3]
    for record in train:
        assert record["loss"] > 0 and record["loss"] == pytest.approx(record["distill/divergence"])
        assert 0 <= record["distill/teacher_agreement"] <= 1 and record["completions/mean_length"] > 0
    lineage = json.loads((run.dir / "lineage.json").read_text())
    assert lineage["stage"] == "distill" and lineage["parents"]["teacher"]["stage"] == "sft"
    assert "reverse KL(student||teacher)" in run.flat_output
    script = textwrap.dedent(f"""
        import sys
        from transformers import AutoModelForCausalLM, AutoTokenizer
        path = {str(run.dir / "checkpoint")!r}
        model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
        out = model.generate(**tok(["123+456="], return_tensors="pt"), max_new_tokens=5, do_sample=False)
        print(tok.decode(out[0], skip_special_tokens=True))
        assert "alignctl" not in sys.modules
    """)
    result = run_cmd([sys.executable, "-c", script])
    assert result.returncode == 0 and "123+456=" in result.stdout, result.describe()


@pytest.mark.parametrize("beta_jsd", ["1.0", "0.5", "0.0"])
def test_loss_is_zero_when_the_student_is_the_teacher(teacher, tmp_path, beta_jsd):
    run = _train(tmp_path / "same", "recipe=distill", f"inputs.policy={teacher}", f"inputs.teacher={teacher}", f"recipe.beta_jsd={beta_jsd}",
                 "recipe.max_steps=1", *SMALL)
    run.assert_finished()
    assert [r["loss"] for r in run.train_records()] == [0.0]
    assert run.train_records()[0]["distill/teacher_agreement"] == 1.0


def test_chunked_output_layer_trains_as_the_full_logits(teacher, tmp_path):
    """recipe.lm_head_chunk > 0 (the default) forms the two vocabularies' logits a few positions at a time."""
    losses = {}
    for chunk in ("5", "0"):
        run = _train(tmp_path / f"chunk{chunk}", "recipe=distill", f"inputs.teacher={teacher}", f"recipe.lm_head_chunk={chunk}", "recipe.max_steps=2",
                     "recipe.lr=1e-3", *SMALL)
        run.assert_finished()
        losses[chunk] = [v for r in run.train_records() for v in (r["loss"], r["distill/teacher_agreement"])]
    assert losses["5"] == pytest.approx(losses["0"], rel=1e-5) and losses["5"][2] != losses["5"][0]  # step 2's loss moved


def test_lora_student(teacher, tmp_path):
    run = _train(tmp_path / "lora", "recipe=distill", "adapter=lora", f"inputs.teacher={teacher}", "recipe.max_steps=2", "recipe.lr=1e-2", *SMALL)
    run.assert_finished()
    assert (run.dir / "checkpoint" / "adapter_config.json").exists()
    assert all(r["loss"] > 0 for r in run.train_records())


def test_teacher_with_another_tokenizer_is_refused(teacher, tmp_path, alignctl):
    other = tmp_path / "other_teacher"
    shutil.copytree(teacher / "checkpoint", other)
    config = json.loads((other / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps(config | {"eos_token": "<unk>"}))
    result = alignctl("train", "recipe=distill", f"inputs.teacher={other}", "recipe.max_steps=1", *SMALL)
    assert result.returncode == 2 and "Traceback" not in result.output, result.describe()
    lines = result.stderr_lines()
    assert len(lines) == 1 and "inputs.teacher" in lines[0] and str(other) in lines[0] and "student" in lines[0], result.describe()


def test_distill_without_a_teacher_is_refused(alignctl):
    result = alignctl("train", "recipe=distill", "recipe.max_steps=1", *SMALL)
    assert result.returncode == 2 and "inputs.teacher" in result.stderr and "Traceback" not in result.output, result.describe()


def test_resume_equals_uninterrupted(teacher, tmp_path, alignctl):
    # One rollout feeds 2 steps: the step-3 checkpoint holds the second rollout's last step.
    overrides = ["recipe=distill", f"inputs.teacher={teacher}", "recipe.max_steps=6", "recipe.save_every=3", "recipe.steps_per_generation=2",
                 "recipe.lr=1e-3", "recipe.keep_last=10", *SMALL]
    whole = StageRun("whole", tmp_path / "whole", alignctl("train", *overrides, f"hydra.run.dir={tmp_path / 'whole'}"))
    whole.assert_finished()
    stopped = tmp_path / "stopped"
    rewind(whole.dir, stopped, 3)
    resumed = StageRun("resumed", stopped, alignctl("train", f"resume={stopped}"))
    resumed.assert_finished()
    assert "resumed from" in resumed.flat_output
    assert_same_trajectory(whole.dir, stopped, 3)


@pytest.mark.slow
def test_distilled_student_beats_its_sft(learned_sft_run, tmp_path_factory):
    """The demo's chain: the shared SFT run (~64 % held-out) is the student, GRPO from it (~80 %) the teacher."""
    sft_dir, sft_result = learned_sft_run
    assert sft_result.returncode == 0, sft_result.describe()
    root = tmp_path_factory.mktemp("distill_learns")
    teacher = _train(root / "teacher", "recipe=grpo", f"inputs.policy={sft_dir}", "recipe.eval_every=0", "data.eval_limit=400")
    teacher.assert_finished()
    run = _train(root / "student", "recipe=distill", f"inputs.policy={sft_dir}", f"inputs.teacher={teacher.dir}", "recipe.eval_every=0",
                 "data.eval_limit=400")
    run.assert_finished()
    evals = [r for r in run.records() if "eval_exact_match" in r]
    before, after = evals[0], evals[-1]
    assert (before["step"], after["step"]) == (0, 100)
    # Counted in prompts (400 of them): at least +5 points over the SFT student it started as.
    assert round(400 * after["eval_exact_match"]) >= round(400 * before["eval_exact_match"]) + 20, evals
    train = run.train_records()
    assert sum(r["distill/divergence"] for r in train[-10:]) < sum(r["distill/divergence"] for r in train[:10]), "the student should near the teacher"
