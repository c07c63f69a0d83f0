"""Online-RL batches without padding, each prompt once for its completions (``recipe.padding_free``).

GRPO samples K completions of each prompt (and a DPO pair is one prompt with two responses). As left-padded rows, every completion carries its own copy
of the prompt and pads to the batch's longest completion: at K = 4, a 55-token prompt and 32-token
completions, more than half of the rows' tokens are copies of the prompt. Here a batch is one packed
row: each distinct prompt once, followed by its completions, whose position ids continue the prompt's.
The linear layers, MLPs and norms, most of a step, then see every token once.

Attention cannot run over that row as it is (a completion must see its prompt and itself, not its
siblings), so `alignctl.nn.varlen_attention` takes an explicit layout from here: each completion's
sequence, its prompt's positions then its own, gathered into a right-padded batch for causal
attention. A prompt's queries are read from one copy; the gradients of its keys and values from every
copy add up, as the gradients of the K prompt copies add up in the padded layout. So log-probs and
gradients are the padded rows' up to float rounding (tests/unit/test_prompt_groups.py).

`prompt_group_fields` builds the layout with the batch (alignctl/rl/rollout.py `training_batch`);
`alignctl.nn.logprobs.response_token_logps` runs it where the stage asks for it and the model's
attention is one `varlen_attention` stands in for. Under a flash kernel, whose varlen path keeps packed
sequences apart by their position ids alone, it runs `rows_end_to_end` instead: no padding, but each
completion with its own copy of the prompt. Padded rows elsewhere (gradient checkpointing or sliding
windows without a flash kernel).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def prompt_group_fields(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
    """The packed layout of prompt + response rows (row b: prompts[b] then responses[b]).

    Returns, with N packed tokens, M response tokens and W the longest response:
        packed_ids, packed_positions: (1, N) the packed row and its position ids;
        packed_gather: (B * L,) for each slot of the right-padded (B, L) attention batch (one
            sequence per row, prompt then response), the packed position it reads; padding slots
            repeat the sequence's last token;
        packed_real: (N,) for each packed position, the flat slot whose attention output it takes;
        packed_longest: () L;
        packed_targets, packed_predictors: (M,) each response token's packed position and the one
            whose hidden state scores it (the prompt's last token for a response's first);
        packed_slots: (M,) where each response token's value goes in a (B, W) right-aligned tensor,
            flattened (the layout of `response_token_logps`);
        packed_rows: (M,) each response token's row, num_rows: () B (for sums per row: DPO's sequence
            log-probs).
    An empty dict when a prompt is empty (its first response token would have nothing to be scored
    from): the batch then runs padded.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        return {}
    groups: dict[tuple[int, ...], list[int]] = {}
    for row, prompt in enumerate(prompts):
        groups.setdefault(tuple(prompt), []).append(row)
    width = max(len(r) for r in responses)
    ids: list[int] = []
    positions: list[int] = []
    owners: list[tuple[int, int]] = []  # per packed position: (row, slot) whose attention output it takes
    sequences: list[list[int]] = [[] for _ in prompts]
    targets: list[int] = []
    predictors: list[int] = []
    slots: list[int] = []
    row_of: list[int] = []
    for prompt, rows in groups.items():
        prompt_start, length = len(ids), len(prompt)
        ids += prompt
        positions += range(length)
        owners += [(rows[0], slot) for slot in range(length)]
        for row in rows:
            response, start = responses[row], len(ids)
            ids += response
            positions += range(length, length + len(response))
            owners += [(row, length + i) for i in range(len(response))]
            sequences[row] = [*range(prompt_start, prompt_start + length), *range(start, start + len(response))]
            targets += range(start, start + len(response))
            predictors += [prompt_start + length - 1, *range(start, start + len(response) - 1)][: len(response)]
            slots += range(row * width + width - len(response), (row + 1) * width)
            row_of += [row] * len(response)
    longest = max(len(s) for s in sequences)
    gather = [s[min(slot, len(s) - 1)] for s in sequences for slot in range(longest)]
    return {
        "packed_ids": torch.tensor([ids]),
        "packed_positions": torch.tensor([positions]),
        "packed_gather": torch.tensor(gather),
        "packed_real": torch.tensor([row * longest + slot for row, slot in owners]),
        "packed_longest": torch.tensor(longest),
        "packed_targets": torch.tensor(targets, dtype=torch.long),
        "packed_predictors": torch.tensor(predictors, dtype=torch.long),
        "packed_slots": torch.tensor(slots, dtype=torch.long),
        "packed_rows": torch.tensor(row_of, dtype=torch.long),
        "num_rows": torch.tensor(len(prompts)),
    }


def rows_end_to_end(batch: dict[str, torch.Tensor], width: int) -> dict[str, torch.Tensor] | None:
    """The batch's left-padded rows end to end without their padding, each row keeping its own prompt,
    position ids restarting at 0 at each row: the packed row a varlen flash kernel takes (it finds the rows
    in the position ids; it cannot attend a completion to a prompt shared with its siblings). The keys of
    `prompt_group_fields` that say where the targets are (ids, positions, targets, predictors, slots, rows;
    W = `width`), worked out on the batch's device; None when a row has no prompt token (its first response
    token would be scored from the row before it)."""
    real, response = batch["attention_mask"].bool(), batch["response_mask"].bool()
    if bool((real.sum(-1) == response.sum(-1)).any()):
        return None
    rows, columns = response.nonzero(as_tuple=True)  # row-major, as the packed row runs
    targets = response[real].nonzero().squeeze(1)
    return {
        "packed_ids": batch["input_ids"][real][None],
        "packed_positions": batch["position_ids"][real][None],
        "packed_targets": targets,
        "packed_predictors": targets - 1,
        "packed_slots": rows * width + columns - (response.size(1) - width),
        "packed_rows": rows,
        "num_rows": torch.tensor(real.size(0)),
    }


def attention_layout(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(gather, real, longest) of a batch with `prompt_group_fields`, as `varlen_attention` takes it."""
    return batch["packed_gather"], batch["packed_real"], int(batch["packed_longest"])
