"""Turn dataset rows into token ids and loss masks, for standard and conversational rows.

Prompts and completions are tokenised separately and concatenated, so the prompt tokens seen in
training are exactly those a generation call starts from. Conversational rows go through the
tokenizer's chat template; the completion is what the template adds after the generation prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from alignctl.core.console import console
from alignctl.core.errors import DataError

IGNORE = -100  # label of positions that carry no loss (prompt, padding)

Messages = list[dict]


def _template(tokenizer: PreTrainedTokenizerBase, messages: Messages, generation_prompt: bool, tools: list[dict] | None = None) -> str:
    if tokenizer.chat_template is None:
        raise DataError(
            "conversational data needs a chat template, and this tokenizer has none; "
            "use a chat/instruct model or standard (string) columns"
        )
    if tools:  # only then: a template may render an empty tool list differently from none
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _ids(tokenizer: PreTrainedTokenizerBase, text: str, special: bool = False) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def _with_eos(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> list[int]:
    return ids if ids and ids[-1] == tokenizer.eos_token_id else ids + [tokenizer.eos_token_id]


def through_eos(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> list[bool]:
    """Which of an assistant turn's tokens carry the loss: everything up to and including the first EOS.

    A template whose end of turn is EOS may follow it with more text (ChatML's ``<|im_end|>\\n``): the
    model stops generating at EOS and never produces what comes after it, so training it would teach a
    token no rollout contains."""
    eos = tokenizer.eos_token_id
    end = ids.index(eos) + 1 if eos in ids else len(ids)
    return [i < end for i in range(len(ids))]


def sampled_part(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> list[int]:
    """The tokens of a completion a sampler can produce: through its first EOS, where generation stops.

    Preference losses (DPO, KTO) sum the policy's log-probs over these, as PPO and GRPO do over their
    rollouts; the template's tail after EOS (ChatML's ``\\n``) is text the policy never chooses, and
    its log-prob ratio would only add noise to the margin. Reward models keep the tail: their score is
    read after it, in training and in rollout scoring alike (alignctl/rl/scored_text.py)."""
    return ids[: sum(through_eos(tokenizer, ids))]


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str | Messages, tools: list[dict] | None = None) -> list[int]:
    """Token ids a generation call starts from (chat prompts end with the assistant header); `tools`:
    declarations the chat template renders (``apply_chat_template(tools=...)``), for a conversation only."""
    if isinstance(prompt, str):
        return _ids(tokenizer, prompt, special=True)
    return _ids(tokenizer, _template(tokenizer, prompt, generation_prompt=True, tools=tools))


def encode_completion(tokenizer: PreTrainedTokenizerBase, prompt: str | Messages, completion: str | Messages) -> list[int]:
    """Token ids of a completion that follows `prompt`, ending with EOS (and whatever the template
    writes after it to close the turn, ChatML's ``\\n``: see `sampled_part`)."""
    if isinstance(completion, str):
        return _with_eos(tokenizer, _ids(tokenizer, completion))
    head = _template(tokenizer, prompt if isinstance(prompt, list) else [], generation_prompt=True)
    full = _template(tokenizer, (prompt if isinstance(prompt, list) else []) + completion, generation_prompt=False)
    if not full.startswith(head):
        raise DataError("the chat template renders the prompt differently once a completion follows it")
    ids = _ids(tokenizer, full[len(head) :])
    # A template whose end of turn is EOS may follow it with more text ("<|im_end|>\n"): the turn is
    # already closed, and a second EOS would teach the model a spurious token.
    return ids if tokenizer.eos_token_id in ids else ids + [tokenizer.eos_token_id]


def encode_episode_turns(tokenizer: PreTrainedTokenizerBase, turns: Sequence[str]) -> tuple[list[int], list[bool]]:
    """A demonstrated multi-turn episode after a plain-text prompt, as a rollout lays it out
    (alignctl/rl/multi_turn.py): model turns (even positions) each end with EOS and carry the loss; the
    environment's replies (odd positions) are tokenised on their own and carry none."""
    ids: list[int] = []
    trainable: list[bool] = []
    for position, text in enumerate(turns):
        model_turn = position % 2 == 0
        turn_ids = _with_eos(tokenizer, _ids(tokenizer, text)) if model_turn else _ids(tokenizer, text)
        ids += turn_ids
        trainable += [model_turn] * len(turn_ids)
    return ids, trainable


def encode_messages(tokenizer: PreTrainedTokenizerBase, messages: Messages) -> tuple[list[int], list[bool]]:
    """A whole conversation; the mask marks assistant turns (the tokens that carry the loss)."""
    ids: list[int] = []
    trainable: list[bool] = []
    rendered, piece = "", []  # piece ends up holding the last assistant turn's ids
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        head = _template(tokenizer, messages[:i], generation_prompt=True)
        turn = _template(tokenizer, messages[: i + 1], generation_prompt=False)
        if not (head.startswith(rendered) and turn.startswith(head)):
            raise DataError("the chat template is not prefix-consistent across turns; cannot mask assistant turns")
        context = _ids(tokenizer, head[len(rendered) :])
        piece = _ids(tokenizer, turn[len(head) :])
        ids += context + piece
        trainable += [False] * len(context) + through_eos(tokenizer, piece)
        rendered = turn
    tail = _ids(tokenizer, _template(tokenizer, messages, generation_prompt=False)[len(rendered) :])
    ids, trainable = ids + tail, trainable + [False] * len(tail)
    # Like a completion (encode_completion), a conversation that ends with a reply ends with EOS:
    # generation stops only at EOS, so a template whose turns end otherwise must still teach it.
    if messages and messages[-1]["role"] == "assistant" and tokenizer.eos_token_id not in piece:
        ids, trainable = ids + [tokenizer.eos_token_id], trainable + [True]
    return ids, trainable


def fit_prompt(prompt_ids: list[int], max_length: int, overlong: str, where: str, completion_room: int = 1) -> list[int] | None:
    """Apply data.overlong to a prompt that leaves fewer than `completion_room` tokens of max_length
    for the completion (None: drop the row)."""
    limit = max_length - completion_room
    if len(prompt_ids) <= limit:
        return prompt_ids
    if overlong == "drop":
        return None
    if overlong == "truncate":  # keep the end of the prompt, nearest the answer
        _ROW["cut"] = True  # counted by encode_rows
        return prompt_ids[len(prompt_ids) - limit :]  # not [-limit:]: -0 keeps all
    room = f" minus recipe.max_new_tokens ({completion_room}) leaves {limit}" if completion_room > 1 else ""
    raise DataError(
        f"{where}: the prompt is {len(prompt_ids)} tokens and recipe.max_length is {max_length}{room}; "
        "raise recipe.max_length or set data.overlong=drop or data.overlong=truncate"
    )


def sft_example(
    tokenizer: PreTrainedTokenizerBase,
    row: dict,
    columns: Sequence[str],
    max_length: int,
    completion_only: bool,
    overlong: str,
    where: str,
) -> dict | None:
    """input_ids and labels for one SFT row (None when data.overlong=drop removes it)."""
    if tuple(columns) == ("prompt", "completion"):
        prompt_ids = fit_prompt(encode_prompt(tokenizer, row["prompt"]), max_length, overlong, where)
        if prompt_ids is None:
            return None
        if row.get("completion_turns") and isinstance(row["prompt"], str):  # an episode with environment replies
            completion_ids, completion_trainable = encode_episode_turns(tokenizer, row["completion_turns"])
        else:
            completion_ids = encode_completion(tokenizer, row["prompt"], row["completion"])
            completion_trainable = through_eos(tokenizer, completion_ids)
        ids = prompt_ids + completion_ids
        trainable = [False] * len(prompt_ids) + completion_trainable
    elif tuple(columns) == ("messages",):
        ids, trainable = encode_messages(tokenizer, row["messages"])
        # Everything before the first assistant turn plays the prompt's part for data.overlong.
        head = trainable.index(True) if True in trainable else len(ids)
        kept_head = fit_prompt(ids[:head], max_length, overlong, where)
        if kept_head is None:
            return None
        cut = head - len(kept_head)
        ids, trainable = ids[cut:], trainable[cut:]
    else:  # ("text",): plain language modelling on every token
        ids = _with_eos(tokenizer, _ids(tokenizer, row["text"], special=True))
        trainable = [True] * len(ids)
    if any(trainable[max_length:]):  # a trained token does not fit: counted, never silent (encode_rows)
        _ROW["completion_cut"] = True
    ids, trainable = ids[:max_length], trainable[:max_length]
    if not completion_only:
        trainable = [True] * len(ids)
    labels = [token if train else IGNORE for token, train in zip(ids, trainable, strict=True)]
    return {"input_ids": ids, "labels": labels}


def preference_example(
    tokenizer: PreTrainedTokenizerBase, row: dict, max_length: int, overlong: str, where: str, turn_tail: bool = False
) -> dict | None:
    """prompt_ids, chosen_ids, rejected_ids for one preference row (None when data.overlong=drop removes it).

    Each side ends at its EOS (`sampled_part`), unless `turn_tail` keeps what the template writes after
    it (the reward model, which is read there).

    Rows without a prompt column must be conversational: the prompt is the turns before the last
    message, which chosen and rejected must share (TRL's implicit-prompt format).
    """
    prompt, chosen, rejected = row.get("prompt"), row["chosen"], row["rejected"]
    if prompt is None:
        if not (isinstance(chosen, list) and isinstance(rejected, list) and chosen[:-1] == rejected[:-1]):
            raise DataError(f"{where}: without a prompt column, chosen and rejected must be conversations sharing every turn but the last")
        prompt, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]
    if chosen == rejected:
        raise DataError(f"{where}: chosen and rejected are identical, so the pair says nothing")
    prompt_ids = fit_prompt(encode_prompt(tokenizer, prompt), max_length, overlong, where)
    if prompt_ids is None:
        return None
    room = max_length - len(prompt_ids)

    def side(completion: str | Messages) -> list[int]:
        ids = encode_completion(tokenizer, prompt, completion)
        return fit_completion(tokenizer, ids if turn_tail else sampled_part(tokenizer, ids), room)

    return {"prompt_ids": prompt_ids, "chosen_ids": side(chosen), "rejected_ids": side(rejected)}


def fit_completion(tokenizer: PreTrainedTokenizerBase, completion_ids: list[int], room: int) -> list[int]:
    """The first `room` tokens of a completion; cutting into it (up to its EOS) is counted by encode_rows."""
    if any(through_eos(tokenizer, completion_ids)[room:]):
        _ROW["completion_cut"] = True
    return completion_ids[:room]


# Set by fit_prompt when it cuts the prompt of the row being encoded, and by sft_example/fit_completion
# when max_length cuts into its completion; read by encode_rows. A plain dict: every worker process of
# a parallel map has its own, and datasets can pickle it to fingerprint the map (it is reset before
# each map, so the fingerprint does not depend on the previous one).
_ROW = {"cut": False, "completion_cut": False}


def encode_rows(dataset, encode, empty: dict, num_proc: int | None, where: str, max_length: int, minimum: int = 1):
    """Map `encode(row, index) -> dict | None` over a datasets.Dataset, dropping the rows it returns
    None for (data.overlong=drop). `empty` gives the columns a dropped row holds until it is filtered.
    Prints how many rows data.overlong dropped or truncated and how many completions max_length cut
    (never silent). Raises a DataError when fewer than `minimum` rows remain."""

    def wrapped(row: dict, index: int) -> dict:
        _ROW.update(cut=False, completion_cut=False)
        example = encode(row, index)
        flags = {"cut": _ROW["cut"], "completion_cut": _ROW["completion_cut"]}
        return {**empty, "keep": False, "cut": False, "completion_cut": False} if example is None else {**example, "keep": True, **flags}

    _ROW.update(cut=False, completion_cut=False)
    encoded = dataset.map(wrapped, with_indices=True, remove_columns=dataset.column_names, num_proc=num_proc)
    truncated, completions_cut = sum(encoded["cut"]), sum(encoded["completion_cut"])
    kept = encoded.filter(lambda row: row["keep"]).remove_columns(["keep", "cut", "completion_cut"])
    if truncated or len(kept) < len(dataset):
        console.print(f"{where}: {len(dataset) - len(kept)} rows dropped and {truncated} prompts truncated from the left "
                      f"to fit recipe.max_length={max_length} (data.overlong)")
    if completions_cut:
        console.print(f"{where}: {completions_cut} of {len(dataset)} rows have a completion cut short by recipe.max_length={max_length} "
                      "(it loses its end, EOS included); raise recipe.max_length to keep them whole")
    if len(kept) < minimum:
        raise DataError(f"{where}: {len(kept)} rows fit recipe.max_length={max_length}; at least {minimum} needed")
    return kept
