"""Deterministic, resumable batch order with length grouping, and padding into tensors.

`BatchStream` yields lists of row indices. Its order depends only on (seed, epoch), and its state is
two integers, so a resumed run draws exactly the batches the interrupted one would have drawn. The
stream yields *global* batches (batch_size x world_size rows) and hands each rank its own slice, so
2 processes x B rows see the same rows as 1 process x 2B.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import numpy as np
import torch

# Rows are sorted by length within windows of this many batches (TRL's group_by_length idea):
# batches hold rows of similar length (little padding) while the epoch order stays random.
LENGTH_GROUP_BATCHES = 64


class BatchStream:
    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        seed: int,
        group_by_length: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.group_by_length = group_by_length
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position = 0, 0
        self._batches = self._epoch_batches(0)

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        global_size = self.batch_size * self.world_size
        # Drop a ragged tail so every step sees the same number of rows; a dataset smaller than one
        # global batch still gives one (short) batch. Dropped before grouping, so the dropped rows are
        # random ones, not always the shortest rows of the last window.
        order = order[: max(len(order) // global_size, 1) * global_size]
        if self.group_by_length:
            window = global_size * LENGTH_GROUP_BATCHES
            order = [
                i
                for start in range(0, len(order), window)
                for i in sorted(order[start : start + window], key=lambda j: -self.lengths[j])
            ]
        batches = [order[i : i + global_size] for i in range(0, len(order), global_size)]
        rng.shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return self

    def __next__(self) -> list[int]:
        if self.position >= len(self._batches):
            self.epoch, self.position = self.epoch + 1, 0
            self._batches = self._epoch_batches(self.epoch)
        batch = self._batches[self.position]
        self.position += 1
        return batch[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    @property
    def fractional_epoch(self) -> float:
        return self.epoch + self.position / len(self._batches)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._batches = self._epoch_batches(self.epoch)


def split_micro(indices: list[int], parts: int) -> list[list[int]]:
    """Cut one step's rows into `parts` micro-batches. The stream draws whole steps, so batch B with
    accumulation A sees exactly the rows of batch A*B (and in the same micro-batch order each time)."""
    size = -(-len(indices) // parts)
    return [indices[i : i + size] for i in range(0, len(indices), size)]


def pad(sequences: Sequence[Sequence[int]], value: int, side: str = "right") -> torch.Tensor:
    """Stack lists of ids into a (B, T) tensor padded with `value` to the longest."""
    longest = max(len(s) for s in sequences)
    out = torch.full((len(sequences), longest), value, dtype=torch.long)
    for row, seq in enumerate(sequences):
        if side == "right":
            out[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        else:
            out[row, longest - len(seq) :] = torch.tensor(seq, dtype=torch.long)
    return out


def collate_lm(rows: Sequence[dict], pad_id: int, ignore_index: int = -100) -> dict[str, torch.Tensor]:
    """input_ids / attention_mask / labels for causal-LM rows, right-padded."""
    ids = [r["input_ids"] for r in rows]
    input_ids = pad(ids, pad_id)
    attention_mask = pad([[1] * len(s) for s in ids], 0)
    labels = pad([r["labels"] for r in rows], ignore_index)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def column_lengths(dataset, column: str) -> np.ndarray:
    """Each row's list length in a token-id column of a `datasets.Dataset`, read from its Arrow data:
    indexing the column in Python builds one list per row (seconds for 60k rows), this does not."""
    import pyarrow.compute as pc

    return pc.list_value_length(dataset.with_format("arrow")[column]).to_numpy(zero_copy_only=False)


def column_counts_other_than(dataset, column: str, value: int) -> np.ndarray:
    """Each row's count of entries other than `value` in a token-id column (the labelled tokens, with
    value the ignore index), read from its Arrow data as column_lengths reads its lengths."""
    import pyarrow as pa
    import pyarrow.compute as pc

    lists = dataset.with_format("arrow")[column]
    if isinstance(lists, pa.ChunkedArray):
        lists = lists.combine_chunks()
    other = pc.not_equal(pc.list_flatten(lists), value).to_numpy(zero_copy_only=False)
    rows = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False)
    return np.bincount(rows[other], minlength=len(lists))

