import json
import random

import pytest

from alignctl.data.tasks.arithmetic import (
    DATA_DIR,
    SLOPPY_RATE,
    add_forgetting_rippled_carries,
    format_answer,
    format_prompt,
    generate_splits,
    has_rippling_carry,
    parse_prompt,
    plausible_wrong_answer,
    verify,
    write_splits,
)


@pytest.fixture(scope="module")
def fresh() -> dict[str, list[dict]]:
    return generate_splits(seed=0)


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


STALE = "{}.jsonl is stale: regenerate with python scripts/make_task_data.py"


def test_shipped_splits_equal_a_fresh_generation(fresh):
    assert sorted(p.stem for p in DATA_DIR.glob("*.jsonl")) == sorted(fresh)
    for name, rows in fresh.items():
        assert read_jsonl(DATA_DIR / f"{name}.jsonl") == rows, STALE.format(name)


def test_write_splits_reproduces_the_shipped_bytes(tmp_path):
    for name, path in write_splits(tmp_path, seed=0).items():
        assert path.read_bytes() == (DATA_DIR / f"{name}.jsonl").read_bytes(), STALE.format(name)


def test_another_seed_gives_other_problems(fresh):
    assert generate_splits(seed=1)["eval"] != fresh["eval"]


def test_splits_share_no_prompt(fresh):
    seen: set[str] = set()
    for rows in fresh.values():
        prompts = {row["prompt"] for row in rows}
        assert len(prompts) == len(rows) and prompts.isdisjoint(seen)
        seen |= prompts


def test_eval_split_is_big_enough_to_measure_accuracy(fresh):
    assert len(fresh["eval"]) >= 500
    assert all(row["completion"] == row["answer"] == format_answer(sum(parse_prompt(row["prompt"]))) for row in fresh["eval"])


@pytest.mark.parametrize("name", ["preference", "eval_preference"])
def test_rejected_answers_are_wrong_but_plausible(fresh, name):
    for row in fresh[name]:
        right = sum(parse_prompt(row["prompt"]))
        assert row["chosen"] == format_answer(right)
        assert row["rejected"] != row["chosen"] and row["rejected"].isdigit()
        assert len(row["rejected"]) == len(row["chosen"]) == 4, row


def test_feedback_label_says_whether_the_completion_is_right(fresh):
    labels = [row["completion"] == format_answer(sum(parse_prompt(row["prompt"]))) for row in fresh["feedback"]]
    assert labels == [row["label"] for row in fresh["feedback"]]
    assert 0.45 < sum(labels) / len(labels) < 0.55


def test_the_sft_teacher_is_wrong_only_on_rippling_carries_at_the_sloppy_rate(fresh):
    rippling, wrong = 0, 0
    for row in fresh["sft"]:
        a, b = parse_prompt(row["prompt"])
        if has_rippling_carry(a, b):
            rippling += 1
            wrong += row["completion"] == format_answer(add_forgetting_rippled_carries(a, b))
        else:
            assert row["completion"] == format_answer(a + b)
    assert abs(wrong / rippling - SLOPPY_RATE) < 0.03


@pytest.mark.parametrize(
    "a, b, ripples, sloppy",
    [
        (12, 34, False, 46),  # no carry at all
        (15, 5, False, 20),  # one carry, into a column that does not carry
        (58, 47, True, 95),  # 8+7 carries; 5+4+1 = 10 carries again; the teacher writes 9, carries nothing
        (95, 5, True, 90),
        (999, 1, True, 990),  # the carry is forgotten in the tens; the hundreds then do not carry
        (0, 0, False, 0),
    ],
)
def test_hand_checked_rippling_carries(a, b, ripples, sloppy):
    assert has_rippling_carry(a, b) is ripples
    assert add_forgetting_rippled_carries(a, b) == sloppy


def test_the_sloppy_sum_differs_exactly_when_a_carry_ripples():
    for a in range(0, 1000, 7):
        for b in range(0, 1000, 3):
            sloppy = add_forgetting_rippled_carries(a, b)
            assert (sloppy != a + b) is has_rippling_carry(a, b), (a, b)
            assert sloppy <= a + b


def test_plausible_wrong_answers_are_wrong_and_near_in_length():
    rng = random.Random(0)
    for _ in range(2000):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        wrong = plausible_wrong_answer(a, b, rng)
        assert wrong != a + b and 0 <= wrong <= 9999
        # Either the sloppy teacher's dropped carry, or exactly one digit off by one.
        diffs = [abs(int(x) - int(y)) for x, y in zip(format_answer(wrong), format_answer(a + b)) if x != y]
        assert wrong == add_forgetting_rippled_carries(a, b) or diffs == [1], (a, b, wrong)


@pytest.mark.parametrize("completion", ["936", " 936 ", "936\n", "\n 936\t\n", "936\n12+3=15"])
def test_verify_accepts_the_exact_answer_on_the_first_line(completion):
    assert verify(completion, "936")


@pytest.mark.parametrize("completion", ["", "93", "9360", "936.0", "the answer is 936", "1\n936", "0936"])
def test_verify_rejects_anything_else(completion):
    assert not verify(completion, "936")


def test_prompt_format_round_trips():
    assert format_prompt(347, 589) == "347+589="
    assert format_prompt(7, 89) == "007+089="
    assert format_answer(96) == "0096"
    assert parse_prompt("347+589=") == (347, 589)
