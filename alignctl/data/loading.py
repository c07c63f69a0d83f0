"""Load datasets and check that they have the columns a stage needs.

Sources (`data.path`): the built-in task (``builtin:<task>``), a single .jsonl/.json/.parquet/.csv
file, a directory written by ``datasets.save_to_disk``, a directory of data files, or a hub id.
Formats follow TRL: standard (``text``; ``prompt``/``completion``; ``prompt``/``chosen``/``rejected``;
``prompt``/``completion``/``label``) and conversational (``messages``, or the same columns holding
lists of ``{"role", "content"}`` messages). Every problem is a `DataError` naming file, row and column.
"""

from __future__ import annotations

import math
from pathlib import Path

import datasets
from datasets import Dataset, DatasetDict

from alignctl.config.schema import DataConfig
from alignctl.core.errors import DataError
from alignctl.data.files import check_file
from alignctl.data.tasks import arithmetic, arithmetic_tools, chat_arithmetic

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# CSV has no types and pandas would read an answer such as "42" as a number: text columns stay text.
TEXT_COLUMNS = ("text", "prompt", "completion", "chosen", "rejected")

# Which columns each stage format accepts, as alternatives (the first match wins).
FORMATS: dict[str, list[tuple[str, ...]]] = {
    "sft": [("prompt", "completion"), ("messages",), ("text",)],
    "preference": [("prompt", "chosen", "rejected"), ("chosen", "rejected")],
    "feedback": [("prompt", "completion", "label")],
    "prompt": [("prompt",)],
}
# The built-in task's file for each format's training data.
BUILTIN_TRAIN_SPLITS = {"sft": "sft", "preference": "preference", "feedback": "feedback", "prompt": "rl"}
BUILTIN_EVAL_SPLITS = {"sft": "eval", "preference": "eval_preference", "feedback": "eval_preference", "prompt": "eval"}
BUILTIN_TASKS = {"arithmetic": arithmetic, "chat_arithmetic": chat_arithmetic, "arithmetic_tools": arithmetic_tools}


def builtin_task(path: str):
    """The task module for ``builtin:<name>``, or None for any other path."""
    if not path.startswith("builtin:"):
        return None
    name = path.split(":", 1)[1]
    if name not in BUILTIN_TASKS:
        raise DataError(f"data.path: unknown built-in task {name!r}; valid: {', '.join(BUILTIN_TASKS)}")
    return BUILTIN_TASKS[name]


def _load_file(path: Path) -> Dataset:
    builder = FILE_BUILDERS.get(path.suffix)
    if builder is None:
        raise DataError(f"{path}: unsupported file type; use one of {', '.join(FILE_BUILDERS)}")
    options = {"converters": {column: str for column in TEXT_COLUMNS}} if builder == "csv" else {}
    if path.stat().st_size < 4096 and not path.read_bytes().strip():  # blank: datasets would fail without a message
        raise DataError(f"{path}: the file is empty, so the split is empty; give a file with at least one row")
    check_file(path)  # encoding, syntax, rows that are not objects, a column changing type: named by line
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train", **options)
    except Exception as err:  # datasets wraps parser errors in several types
        raise DataError(f"{path}: cannot be read as {builder} ({_first_line(err)})") from None


def _first_line(err: BaseException) -> str:
    """The first line of the innermost cause: datasets wraps a parser's error in its own vague one
    ("An error occurred while generating the dataset")."""
    while err.__cause__ is not None:
        err = err.__cause__
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _pick_split(loaded: DatasetDict, split: str, where: str) -> Dataset:
    if split not in loaded:
        raise DataError(f"{where}: no split {split!r}; available: {', '.join(loaded)}")
    return loaded[split]


def _unpair(pairs: Dataset) -> Dataset:
    """Preference pairs as unpaired feedback: chosen is labelled True, rejected False (as TRL does)."""
    return Dataset.from_list(
        [{"prompt": r["prompt"], "completion": r[k], "label": k == "chosen"} for r in pairs for k in ("chosen", "rejected")]
    )


def _one_split(split: str, data: DataConfig, where: str) -> None:
    """A single file or saved Dataset is one split, 'train' (as datasets names it)."""
    if data.train_split != "train":
        raise DataError(f"data.train_split={data.train_split!r}: {where} has one split, 'train'; set data.train_split=train")
    if split != data.train_split:
        raise DataError(f"data.eval_split={split!r}: {where} has only one split; set data.eval_split=null")


def load_split(data: DataConfig, fmt: str, split: str) -> Dataset:
    """Load one split of `data` for a stage whose rows have format `fmt` (see FORMATS)."""
    task = builtin_task(data.path)
    if task is not None:
        if data.train_split != "train":  # each format's training file is picked by the format, not by name
            raise DataError(f"data.train_split={data.train_split!r}: {data.path} has one training split per format, named 'train'; set data.train_split=train")
        name = BUILTIN_TRAIN_SPLITS[fmt] if split == data.train_split else BUILTIN_EVAL_SPLITS[fmt]
        dataset = Dataset.from_json(str(task.split_path(name)))
        if fmt == "feedback" and name == "eval_preference":  # no held-out feedback split ships
            dataset = _unpair(dataset)
        where = f"{data.path} ({name})"
    else:
        path = Path(data.path).expanduser()
        where = str(path)
        if path.is_file():
            _one_split(split, data, f"the file {path}")
            dataset = _load_file(path)
        elif path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
            try:
                loaded = datasets.load_from_disk(str(path))
            except Exception as err:  # truncated arrow files, a damaged state.json: one line, not a traceback
                raise DataError(f"{path}: cannot be read as a saved dataset ({_first_line(err)})") from None
            if isinstance(loaded, DatasetDict):
                dataset = _pick_split(loaded, split, where)
            else:  # a single saved Dataset: without this check the eval split would be the train rows
                _one_split(split, data, f"the saved Dataset {path}")
                dataset = loaded
        elif path.is_dir():
            for file in sorted(f for f in path.rglob("*") if f.suffix in FILE_BUILDERS and f.is_file()):
                check_file(file)
            dataset = _load_dir_or_hub(str(path), data.config_name, split)
        elif path.suffix in FILE_BUILDERS or data.path.startswith((".", "/", "~")):
            raise DataError(f"data.path: file or directory {data.path!r} does not exist")
        else:
            dataset = _load_dir_or_hub(data.path, data.config_name, split)
    columns = check_columns(dataset, fmt, where)
    return with_system_prompt(dataset, data.system_prompt, columns, where)


def _load_dir_or_hub(path: str, config_name: str | None, split: str) -> Dataset:
    try:
        loaded = datasets.load_dataset(path, config_name)
    except Exception as err:  # offline, missing, private: all end the run the same way
        raise DataError(f"data.path: cannot load dataset {path!r} ({_first_line(err)})") from None
    return _pick_split(loaded, split, path)


def format_columns(dataset: Dataset, fmt: str, where: str) -> tuple[str, ...]:
    """The first column set of `fmt` the dataset has (no row is read); a DataError when none matches."""
    for columns in FORMATS[fmt]:
        if all(c in dataset.column_names for c in columns):
            return columns
    wanted = " or ".join("/".join(cols) for cols in FORMATS[fmt])
    raise DataError(f"{where}: needs columns {wanted}; found {', '.join(dataset.column_names)}")


def check_columns(dataset: Dataset, fmt: str, where: str) -> tuple[str, ...]:
    """The matching column set of `fmt`, after checking every row's values; a DataError names what is wrong."""
    if len(dataset) == 0:
        raise DataError(f"{where}: the split is empty")
    columns = format_columns(dataset, fmt, where)
    # A reward model reads an optional margin per pair: it must be a number too.
    optional = ("margin",) if fmt == "preference" and "margin" in dataset.column_names else ()
    _check_values(dataset, columns + optional, where)
    return columns


# Roles a chat template renders; anything else is most likely a typo ("assitant") or another
# dataset's convention ("human"/"gpt"), which a template would render wrongly or silently drop.
ROLES = ("system", "user", "assistant", "tool")
# Columns whose conversations are what the model learns to say: they must end with a reply.
REPLY_COLUMNS = ("messages", "completion", "chosen", "rejected")


def _is_conversation(value) -> bool:
    """A list of {"role", "content"} messages (datasets fills a key missing from one message with None)."""
    return isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    )


def _conversation_problem(messages: list[dict], column: str) -> str | None:
    """What is wrong with a well-formed conversation in `column`, or None."""
    if not messages:
        return "the conversation is empty"
    for index, message in enumerate(messages):
        if message["role"] not in ROLES:
            return f"message {index} has role {message['role']!r}; valid roles: {', '.join(ROLES)}"
    last = messages[-1]["role"]
    if column in REPLY_COLUMNS and last != "assistant":
        # Nothing after the last assistant turn carries a loss, and with no assistant turn at all
        # the loss is 0/0: the first step would be NaN without naming the row.
        return f"the conversation ends on a {last!r} turn; it must end with the assistant's reply (the loss is on assistant turns)"
    return None


def _check_values(dataset: Dataset, columns: tuple[str, ...], where: str) -> None:
    for row_number, row in enumerate(dataset.select_columns(list(columns))):
        for column in columns:
            value = row[column]
            if column == "label":
                ok, expected = isinstance(value, bool) or value in (0, 1), "a boolean"
            elif column == "margin":
                number = isinstance(value, int | float) and not isinstance(value, bool)
                ok, expected = number and math.isfinite(value), "a finite number (the reward margin this pair needs)"
            elif column == "messages":  # a string here would later be read character by character
                ok, expected = _is_conversation(value), "a list of {role, content} messages"
            else:
                ok = isinstance(value, str) or _is_conversation(value)
                expected = "a string or a list of {role, content} messages"
            problem = f"expected {expected}, got {value!r:.60}" if not ok else None
            if ok and isinstance(value, list):
                problem = _conversation_problem(value, column)
            if problem:
                raise DataError(f"{where}: row {row_number}, column {column!r}: {problem}")


def with_system_prompt(dataset: Dataset, system_prompt: str | None, columns: tuple[str, ...], where: str) -> Dataset:
    """data.system_prompt: this system message opens every conversation that has none (null: rows as
    they are, and the chat template may add its own default; "": an empty system message, which keeps
    a template such as SmolLM2's from inserting its default one)."""
    if system_prompt is None:
        return dataset
    # The conversation that opens a row: its prompt, its messages, or (without a prompt column) both sides of a pair.
    targets = [c for c in ("prompt", "messages") if c in columns] or [c for c in ("chosen", "rejected") if c in columns]
    if not all(isinstance(dataset[0][c], list) for c in targets):
        raise DataError(f"data.system_prompt: {where} has plain-text prompts, which do not go through the chat template; "
                        "give conversational rows (lists of {role, content} messages) or leave data.system_prompt=null")

    def add(row: dict) -> dict:
        out = {}
        for column in targets:
            messages = row[column]
            if messages and messages[0]["role"] == "system":
                out[column] = messages
            else:  # the same keys as the row's messages, so datasets keeps one message type
                out[column] = [{**dict.fromkeys(messages[0] if messages else ()), "role": "system", "content": system_prompt}, *messages]
        return out

    return dataset.map(add)


def load_eval_split(data: DataConfig, fmt: str) -> Dataset | None:
    """The eval split for `fmt` (first data.eval_limit rows), or None when data.eval_split is null."""
    if not data.eval_split:
        return None
    dataset = load_split(data, fmt, data.eval_split)
    return dataset.select(range(min(data.eval_limit, len(dataset)))) if data.eval_limit else dataset


def eval_task_path(data: DataConfig) -> str | None:
    """The built-in task that measures held-out exact match: data.eval_task, else data.path when it is one."""
    if data.eval_task:
        return data.eval_task
    return data.path if data.path.startswith("builtin:") else None


def task_eval_rows(data: DataConfig) -> list[dict] | None:
    """Held-out prompt/answer rows of the eval task (first data.eval_limit), or None when there is none."""
    path = eval_task_path(data)
    if path is None or not (data.eval_task or data.eval_split):
        return None
    task = builtin_task(path)
    rows = Dataset.from_json(str(task.split_path("eval"))).to_list()
    return rows[: data.eval_limit] if data.eval_limit else rows
