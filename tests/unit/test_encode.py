import pytest

from alignctl.core.errors import DataError
from alignctl.data.encode import IGNORE, encode_completion, encode_messages, fit_prompt, sft_example

PC = ("prompt", "completion")
USER = {"role": "user", "content": "1+1="}
REPLY = {"role": "assistant", "content": "2"}
HI_YO = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]


def example(tok, row, columns=PC, max_length=64, completion_only=True, overlong="error"):
    return sft_example(tok, row, columns, max_length, completion_only, overlong, "data.jsonl: row 3")


def text_of(tok, ids) -> str:
    return tok.decode(ids)


def trained_runs(tok, ex) -> list[str]:
    """The decoded runs of consecutive tokens that carry a loss."""
    runs, current = [], []
    for label in ex["labels"] + [IGNORE]:
        if label != IGNORE:
            current.append(label)
        elif current:
            runs.append(text_of(tok, current))
            current = []
    return runs


def test_prompt_completion_masks_exactly_the_prompt_and_ends_with_eos(tok):
    ex = example(tok, {"prompt": "12+34=", "completion": "46"})
    assert text_of(tok, ex["input_ids"]) == "12+34=46</s>"
    assert ex["input_ids"][-1] == tok.eos_token_id
    assert ex["labels"] == [IGNORE] * len("12+34=") + ex["input_ids"][6:]  # one char is one token


def test_completion_only_false_trains_every_token(tok):
    ex = example(tok, {"prompt": "12+34=", "completion": "46"}, completion_only=False)
    assert ex["labels"] == ex["input_ids"]


def test_text_rows_train_every_token_and_end_with_eos(tok):
    ex = example(tok, {"text": "hi there"}, columns=("text",))
    assert text_of(tok, ex["input_ids"]) == "hi there</s>"
    assert ex["labels"] == ex["input_ids"]


def test_conversational_prompt_completion_goes_through_the_chat_template(tok):
    ex = example(tok, {"prompt": [USER], "completion": [REPLY]})
    assert text_of(tok, ex["input_ids"]) == "<|user|>1+1=<|end|><|assistant|>2<|end|></s>"
    assert trained_runs(tok, ex) == ["2<|end|></s>"]
    assert ex["labels"][: len(ex["labels"]) - 3] == [IGNORE] * (len(ex["labels"]) - 3)


def test_messages_train_only_the_assistant_turn_of_a_two_turn_conversation(tok):
    ex = example(tok, {"messages": HI_YO}, columns=("messages",))
    assert text_of(tok, ex["input_ids"]) == "<|user|>hi<|end|><|assistant|>yo<|end|></s>"
    assert trained_runs(tok, ex) == ["yo<|end|></s>"]


def test_messages_train_every_assistant_turn_and_nothing_else(tok):
    messages = [
        {"role": "system", "content": "add"},
        {"role": "user", "content": "1+1="},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "2+2="},
        {"role": "assistant", "content": "4"},
    ]
    ex = example(tok, {"messages": messages}, columns=("messages",))
    assert text_of(tok, ex["input_ids"]) == (
        "<|system|>add<|end|><|user|>1+1=<|end|><|assistant|>2<|end|><|user|>2+2=<|end|><|assistant|>4<|end|></s>"
    )
    assert trained_runs(tok, ex) == ["2<|end|>", "4<|end|></s>"]


def test_messages_ending_with_a_user_turn_get_no_eos(tok):
    ids, trainable = encode_messages(tok, [USER, REPLY, {"role": "user", "content": "ok"}])
    assert text_of(tok, ids) == "<|user|>1+1=<|end|><|assistant|>2<|end|><|user|>ok<|end|>"
    assert sum(trainable) == len(["2", "<|end|>"])


def test_a_template_that_ends_turns_with_eos_gets_no_second_eos(tok):
    # Like Qwen's "<|im_end|>\n": the end-of-turn token is EOS and text follows it.
    tok.chat_template = (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '</s>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
    )
    assert text_of(tok, encode_completion(tok, [USER], [REPLY])) == "2</s>\n"
    ids, trainable = encode_messages(tok, [USER, REPLY])
    assert text_of(tok, ids).endswith("2</s>\n")
    # EOS ends the turn and is trained; the "\n" after it is never generated, so it carries no loss.
    assert text_of(tok, [i for i, t in zip(ids, trainable, strict=True) if t]) == "2</s>"
    row = example(tok, {"prompt": [USER], "completion": [REPLY]})
    assert text_of(tok, [i for i, label in zip(row["input_ids"], row["labels"], strict=True) if label != IGNORE]) == "2</s>"


def test_conversational_data_without_a_chat_template_is_a_data_error(tok):
    tok.chat_template = None
    with pytest.raises(DataError, match="chat template"):
        example(tok, {"messages": [USER, REPLY]}, columns=("messages",))
    with pytest.raises(DataError, match="chat template"):
        example(tok, {"prompt": [USER], "completion": [REPLY]})


def test_long_completions_are_cut_to_max_length(tok):
    ex = example(tok, {"prompt": "12+34=", "completion": "4600000"}, max_length=8)
    assert text_of(tok, ex["input_ids"]) == "12+34=46"
    assert ex["labels"] == [IGNORE] * 6 + ex["input_ids"][6:]


def test_messages_are_cut_to_max_length(tok):
    ex = example(tok, {"messages": HI_YO}, columns=("messages",), max_length=6)
    assert text_of(tok, ex["input_ids"]) == "<|user|>hi<|end|><|assistant|>y"
    assert trained_runs(tok, ex) == ["y"]


def test_messages_whose_first_turns_fill_max_length_follow_data_overlong(tok):
    """The turns before the first assistant reply play the prompt's part (5 tokens here)."""
    with pytest.raises(DataError, match="row 3: the prompt is 5 tokens"):
        example(tok, {"messages": HI_YO}, columns=("messages",), max_length=5)
    assert example(tok, {"messages": HI_YO}, columns=("messages",), max_length=5, overlong="drop") is None
    kept = example(tok, {"messages": HI_YO}, columns=("messages",), max_length=5, overlong="truncate")
    assert text_of(tok, kept["input_ids"]) == "hi<|end|><|assistant|>y"
    assert trained_runs(tok, kept) == ["y"]


def test_overlong_prompt_error_names_the_row_and_the_fixes(tok):
    with pytest.raises(DataError) as err:
        example(tok, {"prompt": "12+34=", "completion": "46"}, max_length=6)
    message = str(err.value)
    assert message.startswith("data.jsonl: row 3: the prompt is 6 tokens and recipe.max_length is 6")
    for fix in ("raise recipe.max_length", "data.overlong=drop", "data.overlong=truncate"):
        assert fix in message
    assert "\n" not in message


def test_a_prompt_one_shorter_than_max_length_fits(tok):
    ex = example(tok, {"prompt": "12+34=", "completion": "46"}, max_length=7)
    assert text_of(tok, ex["input_ids"]) == "12+34=4"


def test_overlong_drop_returns_none(tok):
    assert example(tok, {"prompt": "12+34=", "completion": "46"}, max_length=6, overlong="drop") is None


def test_overlong_truncate_keeps_the_end_of_the_prompt(tok):
    ex = example(tok, {"prompt": "12+34=", "completion": "46"}, max_length=4, overlong="truncate")
    assert text_of(tok, ex["input_ids"]) == "34=4"
    assert ex["labels"] == [IGNORE] * 3 + [tok.convert_tokens_to_ids("4")]


def test_truncate_to_max_length_one_leaves_an_empty_prompt():
    assert fit_prompt([5, 6, 7], max_length=1, overlong="truncate", where="w") == []


def test_completions_cut_by_max_length_are_counted_and_printed(tok, capsys):
    from datasets import Dataset

    from alignctl.data.encode import encode_rows, preference_example

    rows = Dataset.from_list([{"prompt": "1+1=", "completion": "2"}, {"prompt": "1+1=", "completion": "123456"}])
    # 4 prompt tokens + "2</s>" fit 8 tokens; "123456</s>" loses its last three, EOS included.
    kept = encode_rows(rows, lambda row, i: example(tok, row, max_length=8), {"input_ids": [], "labels": []}, None, "d.jsonl", 8)
    assert [len(ids) for ids in kept["input_ids"]] == [6, 8]
    out = " ".join(capsys.readouterr().out.split())
    assert "d.jsonl: 1 of 2 rows have a completion cut short by recipe.max_length=8" in out

    pairs = Dataset.from_list([{"prompt": "1+1=", "chosen": "2", "rejected": "3"}, {"prompt": "1+1=", "chosen": "2", "rejected": "12345"}])
    encode_rows(pairs, lambda row, i: preference_example(tok, row, 7, "error", "w"), {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []},
                None, "p.jsonl", 7)
    assert "p.jsonl: 1 of 2 rows have a completion cut" in " ".join(capsys.readouterr().out.split())


def test_a_cut_that_removes_only_untrained_template_text_is_not_counted(tok, capsys):
    from datasets import Dataset

    from alignctl.data.encode import encode_rows

    tok.chat_template = (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '</s>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
    )
    rows = Dataset.from_list([{"messages": [USER, REPLY]}])  # <|user|>1+1=</s>\n<|assistant|>2</s>\n: 11 tokens
    kept = encode_rows(rows, lambda row, i: example(tok, row, columns=("messages",), max_length=10), {"input_ids": [], "labels": []},
                       None, "m.jsonl", 10)
    assert text_of(tok, kept[0]["input_ids"]).endswith("2</s>")  # only the masked "\n" went
    assert "cut short" not in capsys.readouterr().out
