import random
from itertools import islice

import pytest
import torch

from alignctl.data.batching import BatchStream, collate_lm, pad


def random_lengths(n: int, seed: int = 1) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(1, 200) for _ in range(n)]


def take(stream: BatchStream, n: int) -> list[list[int]]:
    return list(islice(stream, n))


def test_same_seed_gives_the_same_batches_and_another_seed_does_not():
    lengths = random_lengths(300)
    assert take(BatchStream(lengths, 8, seed=3), 80) == take(BatchStream(lengths, 8, seed=3), 80)
    assert take(BatchStream(lengths, 8, seed=3), 80) != take(BatchStream(lengths, 8, seed=4), 80)


@pytest.mark.parametrize("group_by_length", [True, False])
def test_an_epoch_covers_every_row_once_minus_the_ragged_tail(group_by_length):
    stream = BatchStream(random_lengths(103), 8, seed=0, group_by_length=group_by_length)
    epochs = [take(stream, 12), take(stream, 12)]  # 103 // 8 = 12 full batches per epoch
    for batches in epochs:
        rows = [i for batch in batches for i in batch]
        assert all(len(batch) == 8 for batch in batches)
        assert len(rows) == len(set(rows)) == 96
    assert stream.epoch == 1 and stream.fractional_epoch == 2.0
    assert epochs[0] != epochs[1]


def test_the_dropped_tail_is_random_so_every_row_is_eventually_seen():
    # 20 rows, batches of 8: 4 rows sit out each epoch. Under length grouping they must not be
    # the same 4 (the shortest) every time.
    stream = BatchStream(list(range(1, 21)), 8, seed=0)
    seen = {i for batch in take(stream, 2 * 10) for i in batch}
    assert seen == set(range(20))


def test_a_dataset_smaller_than_a_batch_gives_one_short_batch():
    assert take(BatchStream([3, 1, 2], 8, seed=0), 2) == [[0, 2, 1], [0, 2, 1]]


def test_length_grouping_cuts_padding_far_below_random_order():
    lengths = random_lengths(2000)

    def padding(group_by_length: bool) -> int:
        batches = take(BatchStream(lengths, 8, seed=0, group_by_length=group_by_length), 250)
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    assert padding(True) < padding(False) / 20  # about 2.7k against 154k padding tokens here


def test_length_grouping_keeps_the_epoch_order_random():
    lengths = random_lengths(2000)
    firsts = [max(lengths[i] for i in b) for b in take(BatchStream(lengths, 8, seed=0), 250)]
    assert firsts != sorted(firsts, reverse=True) and firsts != sorted(firsts)


@pytest.mark.parametrize("stop_after", [3, 10, 13])  # mid-epoch, exactly at the epoch end, next epoch
def test_resuming_from_state_dict_continues_the_uninterrupted_sequence(stop_after):
    lengths = random_lengths(83)  # 10 batches of 8 per epoch
    uninterrupted = take(BatchStream(lengths, 8, seed=7), 30)

    first = BatchStream(lengths, 8, seed=7)
    before = take(first, stop_after)
    resumed = BatchStream(lengths, 8, seed=7)
    resumed.load_state_dict(first.state_dict())
    assert before + take(resumed, 30 - stop_after) == uninterrupted


def test_state_dict_is_two_integers():
    stream = BatchStream(random_lengths(83), 8, seed=7)
    take(stream, 13)
    assert stream.state_dict() == {"epoch": 1, "position": 3}


@pytest.mark.parametrize("group_by_length", [True, False])
def test_two_ranks_of_b_see_the_rows_of_one_rank_of_2b_in_order(group_by_length):
    lengths = random_lengths(203)
    single = BatchStream(lengths, 8, seed=5, group_by_length=group_by_length)
    ranks = [BatchStream(lengths, 4, seed=5, group_by_length=group_by_length, rank=r, world_size=2) for r in (0, 1)]
    for _ in range(60):  # 25 steps per epoch: crosses two epoch boundaries
        rank0, rank1 = next(ranks[0]), next(ranks[1])
        assert len(rank0) == len(rank1) == 4
        assert rank0 + rank1 == next(single)


def test_pad_right_and_left():
    assert pad([[1, 2, 3], [4]], value=0).tolist() == [[1, 2, 3], [4, 0, 0]]
    assert pad([[1, 2, 3], [4]], value=0, side="left").tolist() == [[1, 2, 3], [0, 0, 4]]
    assert pad([[1], [2]], value=9).dtype == torch.long


def test_collate_lm_right_pads_ids_mask_and_labels():
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = collate_lm(rows, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_column_lengths_read_from_arrow_equal_python_lengths_after_a_filter():
    from datasets import Dataset

    from alignctl.data.batching import column_lengths

    rows = Dataset.from_dict({"ids": [[1] * (i % 5 + 1) for i in range(40)]}).filter(lambda row, i: i % 3 != 0, with_indices=True)
    assert column_lengths(rows, "ids").tolist() == [len(ids) for ids in rows["ids"]]  # the filter's index mapping applies
