"""DAPO's dynamic sampling (Yu et al. 2025, "DAPO", sec. 3.2 and eq. 11): a group whose K completions
all got the same reward has zero group-relative advantage, so it carries no gradient and only dilutes
the batch. Such groups are dropped and more prompts are sampled until the rollout holds as many
informative groups as it was meant to, drawing at most `max_draws` batches of prompts in all (an
untrained policy may get every prompt wrong for a long time). When the bound is reached the rollout is
topped up with dropped groups, which keeps its shape and, having zero advantage, changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from alignctl.rl.online_rl import ScoredRollout
from alignctl.rl.rollout import Completions


def informative_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(groups,) bool: the groups whose rewards are not all equal."""
    groups = rewards.view(-1, group_size)
    return (groups != groups[:, :1]).any(-1)


def select_groups(rollout: ScoredRollout, groups: list[int], group_size: int) -> ScoredRollout:
    """The rollout restricted to `groups` (indices of its prompts), in that order."""
    rows = [g * group_size + k for g in groups for k in range(group_size)]
    c = rollout.completions
    completions = Completions([c.prompt_ids[i] for i in rows], [c.completion_ids[i] for i in rows], [c.truncated[i] for i in rows], c.engine,
                              None if c.sampler_logps is None else [c.sampler_logps[i] for i in rows],
                              None if c.token_masks is None else [c.token_masks[i] for i in rows])
    index = torch.tensor(rows, dtype=torch.long)
    return ScoredRollout(
        {name: [values[g] for g in groups] for name, values in rollout.rows.items()},
        [rollout.prompts[i] for i in rows],
        [rollout.texts[i] for i in rows],
        completions,
        rollout.rewards[index],
        {name: values[index] for name, values in rollout.per_source.items()},
        dict(rollout.times),
    )


def concatenate(parts: list[ScoredRollout]) -> ScoredRollout:
    """One rollout of `parts` end to end (their times added up)."""
    first = parts[0]
    completions = Completions(
        [ids for p in parts for ids in p.completions.prompt_ids],
        [ids for p in parts for ids in p.completions.completion_ids],
        [t for p in parts for t in p.completions.truncated],
        first.completions.engine,
        # The sampler's log-probs travel with their completions (None if any part has none).
        None if any(p.completions.sampler_logps is None for p in parts) else [x for p in parts for x in p.completions.sampler_logps],
        # So do multi-turn episodes' masks of sampled tokens (the parts of one run all have them or none does).
        None if first.completions.token_masks is None else [x for p in parts for x in p.completions.token_masks],
    )
    times: dict[str, float] = {}
    for part in parts:
        for name, seconds in part.times.items():
            times[name] = times.get(name, 0.0) + seconds
    return ScoredRollout(
        {name: [v for p in parts for v in p.rows[name]] for name in first.rows},
        [x for p in parts for x in p.prompts],
        [x for p in parts for x in p.texts],
        completions,
        torch.cat([p.rewards for p in parts]),
        {name: torch.cat([p.per_source[name] for p in parts]) for name in first.per_source},
        times,
    )


def fill_with_informative_groups(first: ScoredRollout, draw: Callable[[], ScoredRollout], group_size: int,
                                 max_draws: int) -> tuple[ScoredRollout, dict[str, float]]:
    """The rollout to train on, and its statistics: `dynamic_sampling/kept_groups` (the share of its
    groups that are informative: 1 unless the bound was reached), `dynamic_sampling/informative`
    (the share of all drawn groups that were) and `dynamic_sampling/draws` (batches of prompts sampled)."""
    wanted = first.rewards.numel() // group_size
    kept: list[ScoredRollout] = []
    dropped: list[ScoredRollout] = []
    kept_count, informative_count, drawn_groups, draws, rollout = 0, 0, 0, 0, first
    while True:
        draws += 1
        informative = informative_groups(rollout.rewards, group_size).tolist()
        informative_count, drawn_groups = informative_count + sum(informative), drawn_groups + len(informative)
        keep = [g for g, useful in enumerate(informative) if useful][: wanted - kept_count]
        kept.append(select_groups(rollout, keep, group_size))
        dropped.append(select_groups(rollout, [g for g, useful in enumerate(informative) if not useful], group_size))
        kept_count += len(keep)
        if kept_count == wanted or draws >= max_draws:
            break
        rollout = draw()
    top_up = select_groups(concatenate(dropped), list(range(wanted - kept_count)), group_size) if kept_count < wanted else None
    batch = concatenate([part for part in [*kept, top_up] if part is not None and part.rewards.numel()] or kept)
    stats = {"dynamic_sampling/kept_groups": kept_count / wanted, "dynamic_sampling/informative": informative_count / drawn_groups,
             "dynamic_sampling/draws": float(draws)}
    return batch, stats
