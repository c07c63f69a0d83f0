"""recipe=pairs (on-policy pairs ranked by the verifier) and a DPO stage that trains on them (inputs.data)."""

from __future__ import annotations

import json

import pytest
from stage_runs import StageRun

from alignctl.data.tasks.arithmetic import format_answer, parse_prompt, verify
from tests.integration.conftest import run_cli


def _trainer(root):
    def train(name, *overrides):
        result = run_cli(["train", *overrides, f"hydra.run.dir={root / name}"], cwd=root)
        return StageRun(name, root / name, result)

    return train


@pytest.fixture(scope="module")
def runs(learned_sft_run, tmp_path_factory):
    """Pairs sampled from the ~65 % policy and ranked by the task verifier (make test-slow)."""
    sft_dir, sft_result = learned_sft_run
    assert sft_result.returncode == 0, sft_result.describe()
    train = _trainer(tmp_path_factory.mktemp("pairs"))
    return train("pairs", "recipe=pairs", f"inputs.policy={sft_dir}", "recipe.num_prompts=200", "recipe.num_generations=4")


@pytest.fixture(scope="module")
def chained(quick_sft_run, tmp_path_factory):
    """Pairs from a short SFT run ranked by length (samples differ in length long before they are right),
    then a DPO stage on them: the chain's mechanics and lineage, in seconds."""
    sft_dir, sft_result = quick_sft_run
    assert sft_result.returncode == 0, sft_result.describe()
    root = tmp_path_factory.mktemp("pairs_chain")
    train = _trainer(root)
    pairs = train("pairs", "recipe=pairs", f"inputs.policy={sft_dir}", "recipe.num_prompts=32", "recipe.num_generations=4",
                  "recipe.reward_funcs=[{_target_: alignctl.rewards.length_penalty, max_chars: 4}]")
    dpo = train("dpo", "recipe=dpo", f"inputs.policy={sft_dir}", f"inputs.data={root / 'pairs'}", "recipe.max_steps=3",
                "recipe.batch_size=8", "recipe.eval_every=0", "data.eval_limit=16")
    return pairs, dpo


@pytest.mark.slow
def test_pairs_are_right_against_wrong_answers_sampled_from_the_policy(runs):
    pairs = runs
    pairs.assert_finished()
    rows = [json.loads(line) for line in (pairs.dir / "data.jsonl").read_text().splitlines()]
    stats = json.loads((pairs.dir / "eval.json").read_text())
    assert stats["pairs"] == len(rows) and stats["prompts"] == 200
    # A ~65 % policy sampled 4 times: many prompts are all right (no pair), many give a right and a wrong answer.
    assert 20 <= len(rows) < 200, stats
    assert 0.3 < stats["sampled_reward"] < 0.95, stats
    for row in rows:
        answer = format_answer(sum(parse_prompt(row["prompt"])))
        assert verify(row["chosen"], answer) and not verify(row["rejected"], answer), row
        assert row["margin"] == 1.0
    assert json.loads((pairs.dir / "lineage.json").read_text())["parents"]["policy"]["stage"] == "sft"


def test_dpo_trains_on_generated_pairs_and_still_measures_the_task(chained):
    pairs, dpo = chained
    pairs.assert_finished()
    dpo.assert_finished()
    lineage = json.loads((dpo.dir / "lineage.json").read_text())
    assert lineage["parents"]["data"]["run_dir"] == str(pairs.dir.resolve())
    assert lineage["parents"]["data"]["stage"] == "pairs"
    assert "eval_exact_match" in json.loads((dpo.dir / "eval.json").read_text())  # the built-in task still evaluates
    assert [r["step"] for r in dpo.train_records()] == [1, 2, 3]


def test_pairs_without_a_policy_that_ever_differs_is_one_line(alignctl, tmp_path):
    # A constant reward ranks nothing: every prompt's completions tie.
    result = alignctl("train", "recipe=pairs", "recipe.num_prompts=8", "recipe.reward_funcs=[{_target_: alignctl.rewards.length_penalty, max_chars: 100}]",
                      f"hydra.run.dir={tmp_path / 'p'}")
    assert result.returncode == 2, result.describe()
    assert "nothing to prefer" in result.stderr and len(result.stderr_lines()) == 1


def test_pairs_of_chat_prompts_are_conversations_in_trls_form(alignctl, tmp_path):
    data = tmp_path / "chat_prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"{i:03d}+001="}]}) + "\n" for i in range(12)))
    run_dir = tmp_path / "chat"
    result = alignctl("train", "recipe=pairs", "data=hf", f"data.path={data}", "data.eval_split=null", "recipe.num_prompts=8",
                      "recipe.reward_funcs=[{_target_: alignctl.rewards.length_penalty, max_chars: 2}]", f"hydra.run.dir={run_dir}")
    StageRun("chat", run_dir, result).assert_finished()
    pairs = [json.loads(line) for line in (run_dir / "data.jsonl").read_text().splitlines()]
    assert pairs
    for pair in pairs:  # scored and written as assistant turns, so DPO and reward training render them as turns too
        assert pair["prompt"][0]["role"] == "user"
        for side in ("chosen", "rejected"):
            assert [m["role"] for m in pair[side]] == ["assistant"] and isinstance(pair[side][0]["content"], str)
        assert len(pair["chosen"][0]["content"]) < len(pair["rejected"][0]["content"])  # length_penalty prefers the shorter
