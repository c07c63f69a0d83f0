"""DAPO's dynamic sampling (alignctl/rl/dynamic_sampling.py): groups whose rewards are all equal are
dropped and refilled from further draws, at most max_draws of them."""

from __future__ import annotations

import torch

from alignctl.rl.dynamic_sampling import fill_with_informative_groups, informative_groups
from alignctl.rl.online_rl import ScoredRollout
from alignctl.rl.rollout import Completions

K = 2


def rollout(rewards: list[float], tag: str) -> ScoredRollout:
    """Prompts named tag0, tag1, ...; K completions each, rewarded as given."""
    n = len(rewards)
    prompts = [f"{tag}{i // K}" for i in range(n)]
    return ScoredRollout(
        {"prompt": prompts[::K], "answer": [f"a-{p}" for p in prompts[::K]]},
        prompts,
        [f"{p}/{i % K}" for i, p in enumerate(prompts)],
        Completions([[1]] * n, [[i, 9] for i in range(n)], [False] * n, "native"),
        torch.tensor(rewards),
        {"verifier": torch.tensor(rewards)},
        {"time/generation": 1.0},
    )


def draws_of(*parts: ScoredRollout):
    queue = list(parts)
    return lambda: queue.pop(0)


def test_informative_groups_are_those_whose_rewards_differ():
    assert informative_groups(torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5]), K).tolist() == [False, True, False]


def test_constant_groups_are_replaced_from_the_next_draws():
    first = rollout([1, 1, 0, 1, 0, 0], "a")  # only a1 informs
    batch, stats = fill_with_informative_groups(first, draws_of(rollout([0, 0, 1, 0], "b"), rollout([1, 0, 1, 1], "c")), K, 8)
    assert batch.rows["prompt"] == ["a1", "b1", "c0"]  # three groups, as wanted, in the order drawn
    assert not any(g for g in (~informative_groups(batch.rewards, K)).tolist())  # never a constant group
    assert batch.texts == ["a1/0", "a1/1", "b1/0", "b1/1", "c0/0", "c0/1"]
    assert batch.rows["answer"] == ["a-a1", "a-b1", "a-c0"] and batch.per_source["verifier"].tolist() == batch.rewards.tolist()
    assert batch.completions.completion_ids == [[2, 9], [3, 9], [2, 9], [3, 9], [0, 9], [1, 9]]
    assert batch.times["time/generation"] == 3.0  # the three draws' sampling time
    assert stats == {"dynamic_sampling/kept_groups": 1.0, "dynamic_sampling/informative": 3 / 7, "dynamic_sampling/draws": 3.0}


def test_at_the_bound_the_rollout_is_topped_up_with_dropped_groups():
    first = rollout([0, 0, 1, 0], "a")
    batch, stats = fill_with_informative_groups(first, draws_of(rollout([0, 0, 0, 0], "b")), K, 2)
    assert batch.rows["prompt"] == ["a1", "a0"] and batch.rewards.numel() == 4  # the shape is kept
    assert stats["dynamic_sampling/kept_groups"] == 0.5 and stats["dynamic_sampling/draws"] == 2.0


def test_a_rollout_that_is_all_informative_is_left_as_it_is():
    first = rollout([1, 0, 0, 1], "a")
    batch, stats = fill_with_informative_groups(first, draws_of(), K, 8)
    assert batch.texts == first.texts and torch.equal(batch.rewards, first.rewards) and stats["dynamic_sampling/draws"] == 1.0


def with_masks(part: ScoredRollout) -> ScoredRollout:
    """Multi-turn episodes: each completion's mask marks its first token (its index) as sampled, the EOS as not."""
    part.completions.token_masks = [torch.tensor([1.0, float(ids[0] % 2)]) for ids in part.completions.completion_ids]
    return part


def test_multi_turn_masks_travel_with_their_episodes():
    first = with_masks(rollout([1, 1, 0, 1, 0, 0], "a"))
    batch, _ = fill_with_informative_groups(first, draws_of(with_masks(rollout([0, 0, 1, 0], "b")), with_masks(rollout([1, 0, 1, 1], "c"))), K, 8)
    assert [m.tolist() for m in batch.completions.token_masks] == [[1.0, float(ids[0] % 2)] for ids in batch.completions.completion_ids]
