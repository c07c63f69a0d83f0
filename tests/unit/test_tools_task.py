"""The built-in tool-use task (builtin:arithmetic_tools): shipped SFT split is a fresh generation, its
rows are well formed, SFT trains the model's turns but never the calculator's reply, and the
demonstrated call, run by CalculatorEnv, gives the right sum."""

from __future__ import annotations

import json

from alignctl.data import loading
from alignctl.data.encode import IGNORE, sft_example
from alignctl.data.tasks import arithmetic
from alignctl.data.tasks import arithmetic_tools as task
from alignctl.rl.environments import CalculatorEnv, EnvironmentFailure


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_shipped_sft_split_equals_a_fresh_generation():
    fresh = task.generate_splits(seed=0)
    assert sorted(p.stem for p in task.DATA_DIR.glob("*.jsonl")) == ["sft"]
    assert read_jsonl(task.DATA_DIR / "sft.jsonl") == fresh["sft"], "sft.jsonl is stale: run python scripts/make_task_data.py"


def test_rows_are_the_arithmetic_problems_about_half_calling_the_calculator():
    rows = task.generate_splits(seed=0)["sft"]
    plain = arithmetic.generate_splits(seed=0)["sft"]
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in plain]
    calls = [r for r in rows if len(r["completion_turns"]) == 3]
    assert 0.45 < len(calls) / len(rows) < 0.55
    for row, original in zip(rows[:2000], plain[:2000]):
        assert row["completion"] == "".join(row["completion_turns"])
        if len(row["completion_turns"]) == 1:  # the teacher's direct answer, mistakes and all
            assert row["completion_turns"] == [original["completion"]]
        else:
            a, b = arithmetic.parse_prompt(row["prompt"])
            call, reply, answer = row["completion_turns"]
            assert (call, reply, answer) == (f"<tool>calculator: {row['prompt'][:-1]}</tool>", f"<result>{a + b:04d}</result>", f"{a + b:04d}")


def test_the_demonstrated_call_runs_in_calculator_env_and_its_reply_is_the_demonstrated_one():
    for row in [r for r in task.generate_splits(seed=0)["sft"] if len(r["completion_turns"]) == 3][:50]:
        env = CalculatorEnv(width=task.RESULT_WIDTH)  # as recipes/tools.yaml builds it
        env.reset(row)
        call, reply, answer = row["completion_turns"]
        assert env.step(call) == (answer, False, 0.0)  # the reply's text, which the rollout wraps in <result>
        assert reply == f"<result>{answer}</result>"
        assert env.step(answer).done  # the answer has no call: the episode ends
        a, b = arithmetic.parse_prompt(row["prompt"])
        assert task.verify(answer, arithmetic.format_answer(a + b))


def test_sft_trains_the_model_turns_and_masks_the_calculator_reply(tok):
    row = {"prompt": "347+089=", "completion": "", "completion_turns": task.tool_turns("347+089=")}
    encoded = sft_example(tok, row, ("prompt", "completion"), 80, True, "error", "row 0")
    ids, labels = encoded["input_ids"], encoded["labels"]
    eos = tok.eos_token
    assert tok.decode(ids) == f"347+089=<tool>calculator: 347+089</tool>{eos}<result>0436</result>0436{eos}"
    trained = tok.decode([t for t in labels if t != IGNORE])
    assert trained == f"<tool>calculator: 347+089</tool>{eos}0436{eos}"
    reply = tok("<result>0436</result>", add_special_tokens=False)["input_ids"]
    start = next(i for i in range(len(ids)) if ids[i : i + len(reply)] == reply)
    assert all(label == IGNORE for label in labels[start : start + len(reply)])


def test_a_direct_answer_row_encodes_as_a_plain_completion(tok):
    with_turns = {"prompt": "430+041=", "completion": "0471", "completion_turns": ["0471"]}
    without = {"prompt": "430+041=", "completion": "0471"}
    assert sft_example(tok, with_turns, ("prompt", "completion"), 32, True, "error", "r") == \
        sft_example(tok, without, ("prompt", "completion"), 32, True, "error", "r")


def test_a_turn_that_only_calls_the_tool_is_no_answer():
    assert task.verify(" 0436\nmore", "0436") and not task.verify("<tool>calculator: 347+089</tool>", "0436")


def test_builtin_path_loads_the_tool_rows_and_the_arithmetic_prompts(data_config):
    data = data_config("builtin:arithmetic_tools")
    assert loading.load_split(data, "sft", "train")[0]["completion_turns"] is not None
    assert loading.load_split(data, "prompt", "train")[0] == json.loads(arithmetic.split_path("rl").read_text().splitlines()[0])


def test_calculator_env_pads_integer_results_to_its_width_and_leaves_other_replies_alone():
    env = CalculatorEnv(width=4)
    env.reset({})
    assert env.step("<tool>calculator: 7+5</tool>").reply == "0012"
    assert env.step("<tool>calculator: 12345+1</tool>").reply == "12346"  # wider than width: never cut
    assert env.step("<tool>calculator: 3-10</tool>").reply == "-0007"
    assert env.step("<tool>calculator: 1/0</tool>").reply.startswith("error:")  # / is not integer arithmetic
    assert CalculatorEnv().step("<tool>calculator: 7+5</tool>").reply == "12"  # no width: the bare value


def test_calculator_env_refuses_a_width_that_is_not_a_positive_integer():
    for width in (0, -1, "4", 2.5, True):
        try:
            CalculatorEnv(width=width)
        except EnvironmentFailure as err:
            assert "recipe.environment_kwargs.width" in str(err)
        else:
            raise AssertionError(f"width={width!r} was accepted")
