"""SFT loss masks on SmolLM2's ChatML template (tokenizer only, no forward pass).

SmolLM2 renders every turn as ``<|im_start|>role\\ncontent<|im_end|>\\n`` and inserts its own system
message ("You are a helpful AI assistant named SmolLM, ...") into a conversation that has none. Trained
tokens: each assistant turn's content and the ``<|im_end|>`` (EOS) that ends it. Masked: the system
and user turns, the ``<|im_start|>assistant\\n`` headers and the ``\\n`` after each ``<|im_end|>``."""

from __future__ import annotations

import pytest
from datasets import Dataset

from alignctl.data.encode import IGNORE, encode_rows, preference_example, sft_example
from alignctl.data.loading import with_system_prompt

DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
CHAT = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "It is 6."},
]


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def encoded(tok, row: dict, max_length: int = 1024) -> dict:
    columns = ("messages",) if "messages" in row else ("prompt", "completion")
    return sft_example(tok, row, columns, max_length, completion_only=True, overlong="error", where="row 0")


def trained_runs(tok, example: dict) -> list[str]:
    """The decoded runs of consecutive tokens that carry the loss."""
    runs, current = [], []
    for label in example["labels"] + [IGNORE]:
        if label != IGNORE:
            current.append(label)
        elif current:
            runs.append(tok.decode(current))
            current = []
    return runs


def test_every_assistant_turn_trains_through_its_im_end_and_nothing_else_does(tok):
    example = encoded(tok, {"messages": CHAT})
    assert trained_runs(tok, example) == ["4<|im_end|>", "It is 6.<|im_end|>"]
    # The token sequence is the template's own rendering of the whole conversation, token for token.
    assert example["input_ids"] == tok.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"]
    masked = tok.decode([i for i, label in zip(example["input_ids"], example["labels"], strict=True) if label == IGNORE])
    assert masked.startswith(f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n")
    assert masked.count("<|im_start|>assistant\n") == 2 and "And 3+3?" in masked


def test_the_newline_after_each_im_end_is_in_the_row_but_masked(tok):
    example = encoded(tok, {"messages": CHAT})
    ids, labels = example["input_ids"], example["labels"]
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    assert len(newline) == 1
    ends = [i for i, (token, label) in enumerate(zip(ids, labels, strict=True)) if token == tok.eos_token_id and label != IGNORE]
    assert len(ends) == 2  # one trained <|im_end|> per assistant turn
    for end in ends:
        assert ids[end + 1] == newline[0] and labels[end + 1] == IGNORE


def test_a_conversational_completion_trains_its_content_and_im_end_only(tok):
    example = encoded(tok, {"prompt": CHAT[:1], "completion": CHAT[1:2]})
    assert trained_runs(tok, example) == ["4<|im_end|>"]
    assert tok.decode(example["input_ids"]).endswith("<|im_start|>assistant\n4<|im_end|>\n")
    assert example["labels"][-1] == IGNORE and example["labels"][-2] == tok.eos_token_id


def test_system_prompt_replaces_the_template_default_and_stays_masked(tok):
    rows = Dataset.from_list([{"messages": CHAT}])
    given = encoded(tok, with_system_prompt(rows, "Answer with a number.", ("messages",), "chat.jsonl")[0])
    text = tok.decode(given["input_ids"])
    assert text.startswith("<|im_start|>system\nAnswer with a number.<|im_end|>\n<|im_start|>user\n")
    assert DEFAULT_SYSTEM not in text
    assert trained_runs(tok, given) == ["4<|im_end|>", "It is 6.<|im_end|>"]

    empty = encoded(tok, with_system_prompt(rows, "", ("messages",), "chat.jsonl")[0])
    assert tok.decode(empty["input_ids"]).startswith("<|im_start|>system\n<|im_end|>\n<|im_start|>user\n")
    assert len(empty["input_ids"]) < len(encoded(tok, {"messages": CHAT})["input_ids"])  # the default's tokens are gone


def test_a_row_with_its_own_system_message_keeps_it(tok):
    own = [{"role": "system", "content": "Be terse."}, *CHAT]
    row = with_system_prompt(Dataset.from_list([{"messages": own}]), "Answer with a number.", ("messages",), "chat.jsonl")[0]
    text = tok.decode(encoded(tok, row)["input_ids"])
    assert text.startswith("<|im_start|>system\nBe terse.<|im_end|>") and "Answer with a number." not in text


def test_a_completion_cut_by_max_length_is_counted(tok, capsys):
    rows = Dataset.from_list([{"messages": CHAT[:2]}, {"messages": [CHAT[0], {"role": "assistant", "content": "four " * 40}]}])
    short = len(encoded(tok, {"messages": CHAT[:2]})["input_ids"])
    kept = encode_rows(rows, lambda row, i: encoded(tok, row, max_length=short), {"input_ids": [], "labels": []}, None, "chat.jsonl", short)
    assert len(kept) == 2 and max(len(ids) for ids in kept["input_ids"]) == short
    out = " ".join(capsys.readouterr().out.split())
    assert f"chat.jsonl: 1 of 2 rows have a completion cut short by recipe.max_length={short}" in out


def test_preference_sides_end_at_im_end_and_the_reward_model_keeps_the_tail(tok):
    """DPO and KTO sum log-probs over what a sampler produces (through <|im_end|>, as rollouts end);
    the reward model is read after the turn's closing newline, as rollout scoring reads it."""
    row = {"prompt": CHAT[:1], "chosen": CHAT[1:2], "rejected": [{"role": "assistant", "content": "5"}]}
    sampled = preference_example(tok, row, 1024, "error", "row 0")
    assert [tok.decode(sampled[k]) for k in ("chosen_ids", "rejected_ids")] == ["4<|im_end|>", "5<|im_end|>"]
    scored = preference_example(tok, row, 1024, "error", "row 0", turn_tail=True)
    assert [tok.decode(scored[k]) for k in ("chosen_ids", "rejected_ids")] == ["4<|im_end|>\n", "5<|im_end|>\n"]


@pytest.mark.slow
def test_the_readme_real_model_example_trains_with_the_defaults(smollm2_dir, alignctl, tmp_path):
    """`recipe=sft model=... data=hf` on chat rows: the real-model defaults fit them (no row cut or refused)."""
    import json

    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"What is {i} plus {i}? Answer with the number only."},
                                                     {"role": "assistant", "content": str(2 * i)}]}) + "\n" for i in range(20)))
    run_dir = tmp_path / "run"
    result = alignctl("train", "recipe=sft", "model=smollm2", "data=hf", f"data.path={data}", "data.eval_split=null",
                      "recipe.max_steps=1", "recipe.batch_size=2", "hardware.num_threads=1", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.describe()
    assert "cut short" not in result.output and "dropped and" not in result.output
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 1
    assert metrics[-1]["learning_rate"] > 0 and metrics[-1]["loss"] < 10  # lr 2e-5 schedule, a sane chat-model loss
