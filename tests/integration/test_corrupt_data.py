"""Randomly corrupted data files, fed to the data loader: every one is refused with a one-line
UserError naming the file (and the row, where a row is to blame), never a traceback.

Seeded, so a failure reproduces: each case starts from valid rows of one format (SFT prompt/completion,
conversations, preference pairs with margins, unpaired feedback) written as .jsonl or .json, and
applies one corruption that is certain to make the file invalid: cut it inside a row, put a Latin-1
byte in a value, give one row's column another type, drop a needed key from one row, replace a row
by something that is not an object, or break a conversation (unknown role, ending on a user turn).
One case in each kind also goes through the real CLI (one line on stderr, exit 2).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from alignctl.config.schema import DataConfig, Overlong
from alignctl.core.errors import UserError
from tests.integration.test_cli_errors import assert_nothing_half_written, assert_one_line_error

ROWS_PER_FILE = 12
FORMATS = {  # fmt -> a valid row
    "sft": lambda i: {"prompt": f"{i}+1=", "completion": str(i + 1)},
    "sft-chat": lambda i: {"messages": [{"role": "user", "content": f"{i}+1="}, {"role": "assistant", "content": str(i + 1)}]},
    "preference": lambda i: {"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": str(i), "margin": 0.5},
    "feedback": lambda i: {"prompt": f"{i}+1=", "completion": str(i + 1), "label": i % 2 == 0},
}
LOADER_FORMAT = {"sft": "sft", "sft-chat": "sft", "preference": "preference", "feedback": "feedback"}
WRONG_VALUES = [7, 2.5, True, ["a", "b"], {"nested": 1}]


def _data_config(path: Path) -> DataConfig:
    return DataConfig(path=str(path), config_name=None, train_split="train", eval_split=None, overlong=Overlong.error,
                      num_proc=None, eval_limit=None, eval_task=None, system_prompt=None)


def _write(path: Path, rows: list) -> bytes:
    if path.suffix == ".json":
        return json.dumps(rows, indent=1).encode()
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _needed(row: dict) -> list[str]:
    return [k for k in row if k != "margin"]


def corrupt(rng: random.Random, kind: str, fmt: str, suffix: str) -> tuple[bytes, int | None]:
    """(file bytes, the row to blame or None) for one corruption of a valid file."""
    rows = [FORMATS[fmt](i) for i in range(ROWS_PER_FILE)]
    culprit = rng.randrange(ROWS_PER_FILE)
    if kind == "truncate":  # cut strictly inside a row: no prefix of a JSON value is complete
        text = _write(Path(f"x{suffix}"), rows)
        starts = [i + 1 for i, b in enumerate(text) if b == ord("\n")]
        start = [0, *starts][culprit] if suffix == ".jsonl" else 0
        end = text.index(b"\n", start) if suffix == ".jsonl" else len(text.rstrip())
        return text[: rng.randrange(start + 1, end)], None
    if kind == "encoding":  # a Latin-1 byte inside a string value
        text = _write(Path(f"x{suffix}"), rows)
        marker = json.dumps(_needed(rows[culprit])[0]).encode()  # the key of a string column, quoted
        at = [i for i in range(len(text)) if text.startswith(marker, i)][culprit] + 1
        return text[:at] + b"\xe9" + text[at:], None
    if kind == "wrong type":
        column = rng.choice(_needed(rows[culprit]))
        wrong = [v for v in WRONG_VALUES if type(v) is not type(rows[culprit][column])]
        rows[culprit][column] = rng.choice(wrong)
    elif kind == "missing key":
        del rows[culprit][rng.choice(_needed(rows[culprit]))]
    elif kind == "not an object":
        rows[culprit] = rng.choice([[1, 2], "a row", 42, None])
    elif kind == "bad conversation":
        fmt_rows = rows[culprit]["messages"]
        if rng.random() < 0.5:
            fmt_rows[rng.randrange(len(fmt_rows))]["role"] = rng.choice(["human", "gpt", "bot", "Assistant"])
        else:
            del fmt_rows[-1]  # ends on the user's turn
    return _write(Path(f"x{suffix}"), rows), culprit


KINDS = ["truncate", "encoding", "wrong type", "missing key", "not an object"]


def _cases(count: int = 26) -> list[tuple[int, str, str, str]]:
    rng = random.Random(20)
    cases = [(seed, kind, fmt, suffix) for seed, kind in enumerate(KINDS) for fmt, suffix in [("sft", ".jsonl")]]
    while len(cases) < count:
        fmt = rng.choice(list(FORMATS))
        kind = rng.choice(KINDS + (["bad conversation"] * 2 if fmt == "sft-chat" else []))
        cases.append((rng.randrange(10**6), kind, fmt, rng.choice([".jsonl", ".jsonl", ".json"])))
    return cases


@pytest.mark.parametrize("seed, kind, fmt, suffix", _cases(), ids=lambda v: str(v))
def test_a_corrupted_data_file_is_one_line_naming_it(tmp_path, seed, kind, fmt, suffix):
    content, culprit = corrupt(random.Random(seed), kind, fmt, suffix)
    path = tmp_path / f"data{suffix}"
    path.write_bytes(content)
    from alignctl.data.loading import load_split

    with pytest.raises(UserError) as caught:
        load_split(_data_config(path), LOADER_FORMAT[fmt], "train")
    message = str(caught.value)
    assert "\n" not in message and str(path) in message, message
    if culprit is not None:  # the row to blame, not the first one that disagrees with it
        assert re.match(rf"{re.escape(str(path))}: row {culprit}\b", message), f"row {culprit} is to blame: {message}"


@pytest.mark.parametrize("kind", ["truncate", "encoding", "wrong type"])
def test_through_the_cli(alignctl, tmp_path, kind):
    content, culprit = corrupt(random.Random(3), kind, "sft", ".jsonl")
    path = tmp_path / "data.jsonl"
    path.write_bytes(content)
    run_dir = tmp_path / "run"
    result = alignctl("train", "data=hf", f"data.path={path}", "recipe.max_steps=2", "data.eval_limit=8", "recipe.eval_every=0",
                      f"hydra.run.dir={run_dir}")
    line = assert_one_line_error(result, str(path))
    if culprit is not None:
        assert re.search(rf"row {culprit}\b", line), line
    assert_nothing_half_written(run_dir)
