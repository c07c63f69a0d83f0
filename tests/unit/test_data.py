import json

import pytest
from datasets import Dataset, DatasetDict

from alignctl.core.errors import DataError
from alignctl.data.loading import check_columns, load_split

# Numeric-looking answers on purpose: CSV must keep them as text.
ROWS = [{"prompt": "1+2=", "completion": "3"}, {"prompt": "20+22=", "completion": "42"}]
TEST_ROWS = [{"prompt": "5+5=", "completion": "10"}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def saved_dict(tmp_path):
    path = tmp_path / "dd"
    DatasetDict({"train": Dataset.from_list(ROWS), "test": Dataset.from_list(TEST_ROWS)}).save_to_disk(str(path))
    return path


def load_error(config, fmt="sft", split="train") -> str:
    with pytest.raises(DataError) as err:
        load_split(config, fmt, split)
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv"])
def test_loads_a_single_data_file(tmp_path, data_config, suffix):
    path = tmp_path / f"train{suffix}"
    if suffix == ".jsonl":
        write_jsonl(path, ROWS)
    elif suffix == ".json":
        path.write_text(json.dumps(ROWS))
    elif suffix == ".parquet":
        Dataset.from_list(ROWS).to_parquet(str(path))
    else:
        path.write_text("prompt,completion\n1+2=,3\n20+22=,42\n")
    assert load_split(data_config(path), "sft", "train").to_list() == ROWS


def test_a_single_file_has_no_eval_split(tmp_path, data_config):
    path = write_jsonl(tmp_path / "train.jsonl", ROWS)
    message = load_error(data_config(path, eval_split="test"), split="test")
    assert "only one split" in message and "data.eval_split=null" in message


def test_loads_both_splits_of_a_saved_dataset_dict(saved_dict, data_config):
    config = data_config(saved_dict, eval_split="test")
    assert load_split(config, "sft", "train").to_list() == ROWS
    assert load_split(config, "sft", "test").to_list() == TEST_ROWS


def test_an_unknown_split_of_a_saved_dataset_dict_lists_the_available_ones(saved_dict, data_config):
    message = load_error(data_config(saved_dict), split="validation")
    assert message == f"{saved_dict}: no split 'validation'; available: train, test"


def test_loads_a_saved_single_dataset_but_not_as_an_eval_split(tmp_path, data_config):
    Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    config = data_config(tmp_path / "ds", eval_split="test")
    assert load_split(config, "sft", "train").to_list() == ROWS
    assert "only one split" in load_error(config, split="test")  # not the train rows again


def test_loads_a_directory_of_data_files_by_split_name(tmp_path, data_config):
    write_jsonl(tmp_path / "train.jsonl", ROWS)
    write_jsonl(tmp_path / "test.jsonl", TEST_ROWS)
    config = data_config(tmp_path, eval_split="test")
    assert load_split(config, "sft", "train").to_list() == ROWS
    assert load_split(config, "sft", "test").to_list() == TEST_ROWS


def test_loads_conversational_rows(tmp_path, data_config):
    rows = [{"messages": [{"role": "user", "content": "1+2="}, {"role": "assistant", "content": "3"}]}]
    dataset = load_split(data_config(write_jsonl(tmp_path / "chat.jsonl", rows)), "sft", "train")
    assert dataset.to_list() == rows


@pytest.mark.parametrize("name", ["nope.jsonl", "nope"])
def test_a_missing_path_says_it_does_not_exist(tmp_path, data_config, name):
    path = str(tmp_path / name)
    assert load_error(data_config(path)) == f"data.path: file or directory {path!r} does not exist"


def test_a_missing_column_names_the_needed_and_found_columns(tmp_path, data_config):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "1+2=", "answer": "3"}])
    expected = f"{path}: needs columns prompt/completion or messages or text; found question, answer"
    assert load_error(data_config(path)) == expected


def test_an_empty_split_is_an_error():
    with pytest.raises(DataError, match="^where.jsonl: the split is empty$"):
        check_columns(Dataset.from_dict({"text": []}), "sft", "where.jsonl")


def test_a_non_string_field_names_the_row_and_column(tmp_path, data_config):
    path = write_jsonl(tmp_path / "train.jsonl", [ROWS[0], {"prompt": "2+2=", "completion": None}])
    assert load_error(data_config(path)).startswith(f"{path}: row 1, column 'completion': expected a string")


def test_a_messages_column_holding_a_string_is_rejected(tmp_path, data_config):
    path = write_jsonl(tmp_path / "train.jsonl", [{"messages": "user: hi"}])
    assert load_error(data_config(path)) == (
        f"{path}: row 0, column 'messages': expected a list of {{role, content}} messages, got 'user: hi'"
    )


def test_a_message_without_content_is_rejected(tmp_path, data_config):
    path = write_jsonl(tmp_path / "train.jsonl", [{"messages": [{"role": "user", "text": "hi"}]}])
    assert "row 0, column 'messages'" in load_error(data_config(path))


def test_a_label_that_is_not_boolean_is_rejected(tmp_path, data_config):
    path = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": "1+2=", "completion": "3", "label": "yes"}])
    assert "row 0, column 'label': expected a boolean, got 'yes'" in load_error(data_config(path), fmt="feedback")


def test_a_malformed_jsonl_line_names_file_and_line(tmp_path, data_config):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + '{"prompt": "2+2=", completion: "4"}\n')
    assert load_error(data_config(path)).startswith(f"{path}:3: malformed JSON")


def test_an_unsupported_file_type_lists_the_supported_ones(tmp_path, data_config):
    path = tmp_path / "train.txt"
    path.write_text("1+2=3\n")
    assert load_error(data_config(path)) == f"{path}: unsupported file type; use one of .jsonl, .json, .parquet, .csv"


@pytest.mark.parametrize(
    "fmt, train_columns, eval_columns",
    [
        ("sft", ["prompt", "completion"], ["prompt", "answer", "completion"]),
        ("preference", ["prompt", "chosen", "rejected"], ["prompt", "chosen", "rejected"]),
        ("feedback", ["prompt", "completion", "label"], ["prompt", "completion", "label"]),
        ("prompt", ["prompt", "answer"], ["prompt", "answer", "completion"]),
    ],
)
def test_the_builtin_task_gives_each_format_its_columns(data_config, fmt, train_columns, eval_columns):
    config = data_config("builtin:arithmetic", eval_split="eval")
    train, held_out = load_split(config, fmt, "train"), load_split(config, fmt, "eval")
    assert train.column_names == train_columns and held_out.column_names == eval_columns
    assert set(train["prompt"]).isdisjoint(held_out["prompt"])


def test_builtin_feedback_eval_unpairs_the_held_out_preference_pairs(data_config):
    config = data_config("builtin:arithmetic", eval_split="eval")
    pairs = load_split(config, "preference", "eval")
    feedback = load_split(config, "feedback", "eval")
    assert len(feedback) == 2 * len(pairs)
    first = pairs[0]
    assert feedback.select(range(2)).to_list() == [
        {"prompt": first["prompt"], "completion": first["chosen"], "label": True},
        {"prompt": first["prompt"], "completion": first["rejected"], "label": False},
    ]


def test_an_unknown_builtin_task_lists_the_valid_ones(data_config):
    assert load_error(data_config("builtin:nope")) == "data.path: unknown built-in task 'nope'; valid: arithmetic, chat_arithmetic, arithmetic_tools"


SYSTEM = {"role": "system", "content": "Answer in digits."}
CHAT = [{"role": "user", "content": "1+2="}, {"role": "assistant", "content": "3"}]


def test_system_prompt_opens_every_conversation_without_one(tmp_path, data_config):
    own = {"role": "system", "content": "Be terse."}
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}, {"messages": [own, *CHAT]}])
    rows = load_split(data_config(path, system_prompt="Answer in digits."), "sft", "train")["messages"]
    assert rows == [[SYSTEM, *CHAT], [own, *CHAT]]  # a row's own system message is kept
    assert load_split(data_config(path), "sft", "train")["messages"][0] == CHAT  # null: rows as they are
    assert load_split(data_config(path, system_prompt=""), "sft", "train")["messages"][0][0] == {"role": "system", "content": ""}


def test_system_prompt_goes_into_the_prompt_or_both_sides_of_an_implicit_pair(tmp_path, data_config):
    prompted = write_jsonl(tmp_path / "p.jsonl", [{"prompt": CHAT[:1], "chosen": CHAT[1:], "rejected": [{"role": "assistant", "content": "4"}]}])
    row = load_split(data_config(prompted, system_prompt="Answer in digits."), "preference", "train")[0]
    assert row["prompt"] == [SYSTEM, CHAT[0]] and row["chosen"] == CHAT[1:]
    implicit = write_jsonl(tmp_path / "i.jsonl", [{"chosen": CHAT, "rejected": [CHAT[0], {"role": "assistant", "content": "4"}]}])
    row = load_split(data_config(implicit, system_prompt="Answer in digits."), "preference", "train")[0]
    assert row["chosen"][0] == SYSTEM and row["rejected"][0] == SYSTEM


def test_system_prompt_with_plain_text_prompts_is_an_error(tmp_path, data_config):
    path = write_jsonl(tmp_path / "train.jsonl", ROWS)
    message = load_error(data_config(path, system_prompt="Answer in digits."))
    assert "data.system_prompt" in message and "plain-text prompts" in message and "data.system_prompt=null" in message
