"""inputs.data=<run>: a stage trains on the data.jsonl that run generated, and keeps the task's evaluation."""

from __future__ import annotations

import pytest

from alignctl.cli import app as hydra_app
from alignctl.config import validation
from alignctl.core.errors import ConfigError
from alignctl.data import loading as data_lib


def _run(*overrides: str):
    return validation.validate(hydra_app.compose_config(list(overrides)))


def test_generated_data_replaces_the_path_and_keeps_the_builtin_task_for_evaluation(tmp_path):
    run = _run("recipe=dpo", f"inputs.data={tmp_path}")
    assert run.data.path == str(tmp_path / "data.jsonl")
    assert run.data.eval_split is None  # one generated file: no eval split in it
    assert run.data.eval_task == "builtin:arithmetic"
    assert data_lib.eval_task_path(run.data) == "builtin:arithmetic"
    assert data_lib.task_eval_rows(run.data)  # held-out prompts still come from the built-in task


def test_without_generated_data_nothing_changes():
    run = _run("recipe=dpo")
    assert run.data.path == "builtin:arithmetic" and run.data.eval_split == "eval" and run.data.eval_task is None


def test_other_data_has_no_task_unless_asked(tmp_path):
    other = _run("recipe=sft", "data=hf", f"data.path={tmp_path / 'x.jsonl'}")
    assert data_lib.eval_task_path(other.data) is None and data_lib.task_eval_rows(other.data) is None
    asked = _run("recipe=sft", "data=hf", f"data.path={tmp_path / 'x.jsonl'}", "data.eval_task=builtin:arithmetic")
    assert len(data_lib.task_eval_rows(asked.data)) == 1000


def test_eval_task_must_be_a_builtin_task():
    with pytest.raises(ConfigError, match="data.eval_task: must name a built-in task"):
        _run("recipe=sft", "data.eval_task=my_file.jsonl")
