"""Conversational preference and feedback rows (lists of {role, content}) through the real CLI,
using the tiny tokenizer's chat template."""

from __future__ import annotations

import json

import pytest


def _messages(role: str, text: str) -> list[dict]:
    return [{"role": role, "content": text}]


@pytest.fixture
def chat_pairs(tmp_path):
    rows = []
    for a in range(16):
        prompt = _messages("user", f"{a:03d}+001=")
        rows.append({"prompt": prompt, "chosen": _messages("assistant", f"{a + 1:04d}"), "rejected": _messages("assistant", f"{a + 2:04d}")})
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("recipe", ["dpo", "reward"])
def test_conversational_pairs_train(alignctl, tmp_path, chat_pairs, recipe):
    run = tmp_path / recipe
    result = alignctl("train", f"recipe={recipe}", "data=hf", f"data.path={chat_pairs}", "recipe.max_steps=2",
                      "recipe.batch_size=4", "recipe.max_length=40", f"hydra.run.dir={run}")
    assert result.returncode == 0, result.describe()
    assert json.loads((run / "lineage.json").read_text())["status"] == "finished"


def test_implicit_prompt_pairs_share_every_turn_but_the_last(alignctl, tmp_path):
    user = _messages("user", "002+002=")
    rows = [{"chosen": user + _messages("assistant", "0004"), "rejected": user + _messages("assistant", "0005")}] * 8
    path = tmp_path / "implicit.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = alignctl("train", "recipe=dpo", "data=hf", f"data.path={path}", "recipe.max_steps=1", "recipe.batch_size=4",
                      "recipe.max_length=40", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.describe()
