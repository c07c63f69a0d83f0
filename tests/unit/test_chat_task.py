"""The built-in chat task (builtin:chat_arithmetic): shipped splits are a fresh generation, problems
are disjoint across splits, and the rejected answers are wrong."""

from __future__ import annotations

import json

from alignctl.data.tasks import chat_arithmetic as task


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_shipped_splits_equal_a_fresh_generation():
    fresh = task.generate_splits(seed=0)
    assert sorted(p.stem for p in task.DATA_DIR.glob("*.jsonl")) == sorted(fresh)
    for name, rows in fresh.items():
        assert read_jsonl(task.DATA_DIR / f"{name}.jsonl") == rows, f"{name}.jsonl is stale: run python scripts/make_task_data.py"


def test_splits_share_no_problem_and_answers_are_sums():
    seen: set[str] = set()
    for name, rows in task.generate_splits(seed=0).items():
        questions = {row["prompt"][0]["content"] for row in rows}
        assert len(questions) == len(rows) and not questions & seen, name
        seen |= questions
    row = task.generate_splits(seed=0)["eval"][0]
    a, b = (int(x) for x in row["prompt"][0]["content"].removeprefix("What is ").split("?")[0].split(" + "))
    assert row["answer"] == str(a + b) and task.verify(f" {a + b}\nmore", row["answer"])


def test_rejected_answers_are_wrong_and_plausible():
    for row in task.generate_splits(seed=0)["preference"][:500]:
        chosen, rejected = int(row["chosen"]), int(row["rejected"])
        assert rejected != chosen and rejected >= 0 and abs(rejected - chosen) in {1, 10, 100}
