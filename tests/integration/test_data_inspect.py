"""`alignctl data inspect`: the trained tokens it reports are those the training encoding marks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from alignctl.data.batching import collate_lm
from alignctl.data.encode import IGNORE, sft_example
from alignctl.models.tokenizer import build_char_tokenizer

ROWS = [
    {"messages": [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}]},
    {"messages": [{"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"},
                  {"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "6"}]},
    {"messages": [{"role": "user", "content": "say something long"}, {"role": "assistant", "content": "x" * 60}]},
]
MAX_LENGTH = 40
ARGS = ["recipe=sft", "data=hf", "data.eval_split=null", f"recipe.max_length={MAX_LENGTH}"]


def test_trained_tokens_equal_the_training_encoding(alignctl, tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    result = alignctl("data", "inspect", *ARGS, f"data.path={data}", "rows=3", "--json")
    assert result.returncode == 0, result.describe()
    report = json.loads(result.stdout)

    tokenizer = build_char_tokenizer()  # the tiny model's tokenizer
    examples = [sft_example(tokenizer, row, ("messages",), MAX_LENGTH, True, "error", "test") for row in ROWS]
    labels = collate_lm(examples, tokenizer.pad_token_id)["labels"]
    expected = [int((row != IGNORE).sum()) for row in labels]
    assert [row["sequences"][0]["trained_tokens"] for row in report["shown"]] == expected
    assert report["trained_tokens"] == sum(expected)
    assert report["rows"] == len(ROWS)
    assert report["completions_cut"] == 1  # the long answer does not fit in recipe.max_length
    assert report["completion_tokens"]["max"] > MAX_LENGTH
    # The trained text of the two-turn row is both answers, and nothing the user wrote.
    trained = "".join(s["text"] for s in report["shown"][1]["sequences"][0]["spans"] if s["trained"])
    assert "4" in trained and "6" in trained and "+" not in trained


def test_piped_output_marks_trained_text(alignctl, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+{a}=", "completion": str(2 * a)}) + "\n" for a in range(10, 20)))
    result = alignctl("data", "inspect", *ARGS, f"data.path={data}", "rows=1")
    assert result.returncode == 0, result.describe()
    row = next(line for line in result.stdout.splitlines() if "=" in line and "[[" in line)
    prompt, _, trained = row.partition("[[")
    assert prompt.endswith("=") and trained.endswith("]]")  # the answer trains, the question does not
    assert "completions cut" in result.stdout


def test_recipes_without_completions_and_bad_rows_value_exit_2(alignctl):
    for args in (["recipe=grpo"], ["recipe=sft", "rows=many"], ["recipe=sft", "recipe.nope=1"]):
        result = alignctl("data", "inspect", *args)
        assert result.returncode == 2, result.describe()
        assert len(result.stderr_lines()) == 1 and "Traceback" not in result.stderr


@pytest.mark.parametrize("args", [["chat", "run=x", "temprature=1"], ["generate", "run=x"], ["data", "inspect", "recipe=sft", "rows=-1"], ["data", "show"]])
def test_bad_input_to_the_tools_does_not_import_torch(args):
    code = (
        "import sys\n"
        "import alignctl.cli.main\n"
        f"sys.argv = ['alignctl', *{args!r}]\n"
        "try:\n"
        "    alignctl.cli.main.main()\n"
        "except SystemExit as exit:\n"
        "    assert exit.code == 2, exit.code\n"
        "assert 'torch' not in sys.modules, 'refusing bad input imported torch'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env={**os.environ, "ALIGNCTL_ALLOCATOR": "system"})
    assert done.returncode == 0, done.stderr
    assert done.stderr.startswith("alignctl: error: ") and len(done.stderr.strip().splitlines()) == 1, done.stderr
