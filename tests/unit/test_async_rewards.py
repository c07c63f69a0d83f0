"""Async reward functions (a remote reward model, an LLM judge): an ``async def`` is awaited, a plain
function's list of awaitables too, at most recipe.reward_concurrency at a time; the timeout and the
one-line errors are those of sync functions, and async sources of one step run at once."""

from __future__ import annotations

import gc
import sys
import time

import pytest
import torch

from alignctl.rl.reward_sources import RewardError, combined_rewards, function_sources

# A fake remote judge: each completion costs JUDGE_SECONDS of waiting, asyncio-style, so that the
# time a batch takes tells how many calls were in flight together.
ASYNC_REWARDS = """
import asyncio
import time

JUDGE_SECONDS = 0.2
in_flight = 0
most_in_flight = 0


async def _judge(completion):
    global in_flight, most_in_flight
    in_flight += 1
    most_in_flight = max(most_in_flight, in_flight)
    try:
        await asyncio.sleep(JUDGE_SECONDS)
        return float(len(completion))
    finally:
        in_flight -= 1


def per_completion(prompts, completions, **_):
    return [_judge(c) for c in completions]


async def whole_batch(prompts, completions, **_):
    await asyncio.sleep(JUDGE_SECONDS)
    return [1.0] * len(completions)


async def gathered(prompts, completions, **_):
    return await asyncio.gather(*(_judge(c) for c in completions))


def one_awaitable(prompts, completions, **_):
    return whole_batch(prompts, completions)


async def never_answers(prompts, completions, **_):
    await asyncio.sleep(3600)


async def blocks_the_loop(prompts, completions, **_):
    time.sleep(2)  # sync work inside async def: no timeout of the loop can fire while it runs
    return [0.0] * len(completions)


async def boom(prompts, completions, **_):
    await asyncio.sleep(0)
    raise ConnectionError("judge unreachable")


def one_fails(prompts, completions, **_):
    return [_judge(c) for c in completions[1:]] + [boom(prompts, completions)]


def fails_first(prompts, completions, **_):
    return [boom(prompts, completions)] + [_judge(c) for c in completions[1:]]


async def too_few(prompts, completions, **_):
    return [1.0] * (len(completions) - 1)


async def not_a_number(prompts, completions, **_):
    return ["good"] * len(completions)


def sync_length(prompts, completions, **_):
    return [float(len(c)) for c in completions]


def sync_boom(prompts, completions, **_):
    raise ValueError("no")
"""

COMPLETIONS = ["a", "bb", "ccc", "dddd", "eeeee", "ffffff", "ggggggg", "hhhhhhhh"]
N = len(COMPLETIONS)
LENGTHS = torch.tensor([float(len(c)) for c in COMPLETIONS])


@pytest.fixture
def judge(module_from_source):
    return module_from_source("async_judge_rewards", ASYNC_REWARDS)


def _scored(path: str, timeout: float | None = None, concurrency: int | None = None) -> tuple[torch.Tensor, float]:
    (source,) = function_sources([path], None, timeout, concurrency)
    started = time.monotonic()
    rewards = source.score(["p"] * N, list(COMPLETIONS), {})
    return rewards, time.monotonic() - started


def test_an_async_def_is_awaited(judge):
    rewards, _ = _scored(f"{judge}.whole_batch")
    torch.testing.assert_close(rewards, torch.ones(N))
    rewards, _ = _scored(f"{judge}.gathered")
    torch.testing.assert_close(rewards, LENGTHS)


def test_a_single_awaitable_from_a_plain_function_is_awaited(judge):
    rewards, _ = _scored(f"{judge}.one_awaitable")
    torch.testing.assert_close(rewards, torch.ones(N))


def test_a_list_of_awaitables_runs_concurrently(judge):
    rewards, _ = _scored(f"{judge}.per_completion", concurrency=N)
    torch.testing.assert_close(rewards, LENGTHS)
    assert sys.modules[judge].most_in_flight == N  # all of them awaited at once, not one after another


def test_the_concurrency_bound_is_honoured(judge):
    _scored(f"{judge}.per_completion", concurrency=N)
    module = sys.modules[judge]
    assert module.most_in_flight == N
    module.most_in_flight = 0
    rewards, _ = _scored(f"{judge}.per_completion", concurrency=1)
    torch.testing.assert_close(rewards, LENGTHS)
    assert module.most_in_flight == 1
    module.most_in_flight = 0
    _scored(f"{judge}.per_completion", concurrency=3)
    assert module.most_in_flight == 3


def test_an_async_function_that_outlasts_the_timeout_is_one_line(judge):
    started = time.monotonic()
    with pytest.raises(RewardError) as caught:
        _scored(f"{judge}.never_answers", timeout=0.3)
    assert time.monotonic() - started < 3
    message = str(caught.value)
    assert f"reward function {judge}.never_answers did not return within recipe.reward_timeout=0.3 seconds" in message
    assert "\n" not in message


def test_an_async_function_that_blocks_the_loop_is_abandoned_after_the_timeout(judge):
    started = time.monotonic()
    with pytest.raises(RewardError, match=f"{judge}.blocks_the_loop did not return within recipe.reward_timeout=0.2 seconds"):
        _scored(f"{judge}.blocks_the_loop", timeout=0.2)
    assert time.monotonic() - started < 1.9


def test_the_timeout_bounds_the_whole_list_of_awaitables(judge):
    with pytest.raises(RewardError, match=f"{judge}.per_completion did not return within recipe.reward_timeout=0.5 seconds"):
        _scored(f"{judge}.per_completion", timeout=0.5, concurrency=1)  # 8 x 0.2 s one at a time


@pytest.mark.parametrize(
    ("function", "detail"),
    [
        ("boom", "raised ConnectionError: judge unreachable"),
        ("one_fails", "raised ConnectionError: judge unreachable"),
        ("too_few", f"must return one number per completion ({N}), got {N - 1} values"),
        ("not_a_number", "returned 'good'; every reward must be a finite number"),
    ],
)
def test_a_misbehaving_async_function_is_one_line_naming_it(judge, function, detail):
    with pytest.raises(RewardError) as caught:
        _scored(f"{judge}.{function}", timeout=5, concurrency=4)
    assert f"reward function {judge}.{function} {detail}" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_async_sources_of_one_step_run_at_once_and_sum_with_sync_ones_by_weight(judge):
    entries = [f"{judge}.whole_batch", f"{judge}.sync_length", {"_target_": f"{judge}.gathered", "weight": 0.5}, f"{judge}.per_completion"]
    sources = function_sources(entries, [1.0, 1.0, 0.5, -1.0], timeout=5, concurrency=N)
    sys.modules[judge].most_in_flight = 0
    total, per_source = combined_rewards(sources, ["p"] * N, list(COMPLETIONS), {})
    # gathered's N calls and per_completion's N were all awaited together: the sources ran at once.
    assert sys.modules[judge].most_in_flight == 2 * N
    assert list(per_source) == ["whole_batch", "sync_length", "gathered", "per_completion"]
    torch.testing.assert_close(per_source["whole_batch"], torch.ones(N))
    for name in ["sync_length", "gathered", "per_completion"]:
        torch.testing.assert_close(per_source[name], LENGTHS)
    torch.testing.assert_close(total, torch.ones(N) + LENGTHS + 0.5 * LENGTHS - LENGTHS)


def test_an_error_in_one_source_cancels_the_others(judge):
    sources = function_sources([f"{judge}.never_answers", f"{judge}.boom"], None, timeout=30)
    started = time.monotonic()
    with pytest.raises(RewardError, match=f"{judge}.boom raised ConnectionError"):
        combined_rewards(sources, ["p"] * N, list(COMPLETIONS), {})
    assert time.monotonic() - started < 3  # never_answers was cancelled, not waited for


def test_a_failing_sync_source_closes_the_awaitables_already_made(judge, recwarn):
    sources = function_sources([f"{judge}.per_completion", f"{judge}.sync_boom"], None)
    with pytest.raises(RewardError, match=f"{judge}.sync_boom raised ValueError: no"):
        combined_rewards(sources, ["p"] * N, list(COMPLETIONS), {})
    gc.collect()
    assert not [w for w in recwarn if "never awaited" in str(w.message)]


# ------------------------------------------------------------------------------------ the config
@pytest.mark.parametrize("stage", ["grpo", "ppo", "distill", "pairs"])
def test_reward_concurrency_defaults_in_yaml_and_is_checked_in_one_line(stage):
    from alignctl.cli.app import compose_config
    from alignctl.config.validation import validate
    from alignctl.core.errors import ConfigError

    assert validate(compose_config([f"recipe={stage}"])).recipe.reward_concurrency == 16
    assert validate(compose_config([f"recipe={stage}", "recipe.reward_concurrency=4"])).recipe.reward_concurrency == 4
    with pytest.raises(ConfigError) as caught:
        validate(compose_config([f"recipe={stage}", "recipe.reward_concurrency=0"]))
    assert "reward_concurrency" in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize(("function", "timeout"), [("fails_first", 5), ("per_completion", 0.3)])
def test_awaitables_an_error_or_a_timeout_kept_from_starting_are_closed(judge, recwarn, function, timeout):
    with pytest.raises(RewardError, match=f"{judge}.{function}"):
        _scored(f"{judge}.{function}", timeout=timeout, concurrency=1)
    time.sleep(0.1)  # the loop's thread closes them as it ends
    gc.collect()
    assert not [w for w in recwarn if "never awaited" in str(w.message)]
