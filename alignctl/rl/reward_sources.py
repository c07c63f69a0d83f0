"""Rewards for online RL: a trained reward model and plain Python functions, combined with weights.

A reward function is any callable named by dotted path in ``recipe.reward_funcs`` (the only way
user code enters a run). It is called as TRL calls its reward functions::

    fn(prompts=[...], completions=[...], completion_ids=[...], trainer_state=..., **columns) -> list[float]

one number per completion, where ``columns`` holds the dataset's other columns (``answer`` for the
built-in task), one value per completion; ``completion_ids`` are the sampled token ids (through EOS)
and ``trainer_state`` (`RewardState`) says where training is, for rewards that follow a schedule.
A function should take ``**kwargs`` for what it does not use, as TRL asks; a call that has not
returned after ``recipe.reward_timeout`` seconds stops the run, naming the function. As in TRL, a
completion is a string after a plain-text prompt and a list of one message,
``[{"role": "assistant", "content": text}]``, after a conversational prompt (a list of
messages); the built-ins take either. An entry may also be a mapping ``{_target_: dotted.path, weight: 0.5, **kwargs}``:
Hydra builds a partial with the extra keyword arguments, so one function serves several settings.
The built-ins (alignctl/rewards.py) cover the built-in task: the verifier, a format check and a length penalty.

A function for a remote reward model or an LLM judge may be asynchronous, as TRL allows: an ``async def``
(its coroutine is awaited), or a plain function returning one awaitable or a list of them, one per
completion. The awaitables of one step run in one event loop in a helper thread: every async function
at once, and the awaitables of a list ``recipe.reward_concurrency`` at a time. ``recipe.reward_timeout``
bounds each function's whole call, awaiting included; a timeout or an error cancels what is still running.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import math
import numbers
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from alignctl.core.errors import UserError
from alignctl.rl.scored_text import padded, scored_ids, sequence_scores

RewardFn = Callable[..., Sequence[float]]


class RewardError(UserError):
    """A reward function that cannot be loaded or that returned something unusable."""


@dataclass(frozen=True)
class RewardState:
    """Passed as ``trainer_state``: the fields of TRL's TrainerState that reward functions read."""

    global_step: int  # optimiser steps taken before these completions were sampled
    max_steps: int


# -------------------------------------------------------------------------------------- sources
@dataclass
class Pending:
    """What an async reward function returned, still to be awaited: a coroutine or awaitable, or a list
    holding awaitables (one per completion), with the seconds left of its timeout."""

    name: str
    value: Any
    count: int  # completions, the number of rewards it owes
    timeout: float | None  # recipe.reward_timeout, for the message
    seconds_left: float | None  # of that timeout, after the call that made the awaitables
    concurrency: int | None  # awaitables of a list in flight at once (None: all)
    done: bool = False

    def discard(self) -> None:
        """Close the coroutines that will never be awaited now, so none warns or holds resources."""
        _close_unstarted([self.value, *(self.value if isinstance(self.value, list) else [])])


def _close_unstarted(items: Iterable[Any]) -> None:
    for item in items:
        if inspect.iscoroutine(item) and inspect.getcoroutinestate(item) == inspect.CORO_CREATED:
            item.close()


@dataclass
class RewardSource:
    name: str
    weight: float
    score: Callable[[list, list, dict[str, list]], torch.Tensor]  # prompts, completions (either form), columns -> (N,)
    # The call without the await: rewards, or the Pending ones of an async function, which combined_rewards
    # awaits together with the other sources' (None: `score` is all there is).
    start: Callable[[list, list, dict[str, list]], torch.Tensor | Pending] | None = None


DOTTED_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*[.:][A-Za-z_]\w*")


def _import(dotted: str, where: str) -> Callable:
    """The function at a dotted path, found by import: user code is never evaluated from a string."""
    if not DOTTED_PATH.fullmatch(dotted):
        raise RewardError(f"{where}: {dotted!r} is not a dotted path; give module.function, e.g. alignctl.rewards.task_verifier")
    module_name, _, attribute = dotted.replace(":", ".").rpartition(".")
    try:
        function = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as err:
        raise RewardError(f"{where}: cannot import {dotted!r} ({type(err).__name__}: {err}); give module.function, e.g. alignctl.rewards.task_verifier") from None
    if not callable(function):
        raise RewardError(f"{where}: {dotted!r} is not callable")
    return function


def _build(entry: Any, where: str) -> tuple[str, Callable, float | None]:
    """(name, callable, weight or None) from a dotted path or a {_target_, weight, **kwargs} mapping."""
    if isinstance(entry, str):
        return entry, _import(entry, where), None
    if isinstance(entry, dict) and isinstance(entry.get("_target_"), str):
        options = {k: v for k, v in entry.items() if k not in ("_target_", "weight")}
        function = _import(entry["_target_"], where)
        if options:
            from hydra.utils import instantiate

            function = instantiate({"_target_": entry["_target_"], **options}, _partial_=True)
        return entry["_target_"], function, entry.get("weight")
    raise RewardError(f"{where}: expected a dotted path or {{_target_: path, weight: w, ...}}, got {entry!r}")


def _within(timeout: float | None, name: str, call: Callable[[], Any]) -> Any:
    """`call()`, refused in one line if it has not returned after `timeout` seconds (None: no limit).

    It runs in a daemon thread: Python cannot stop a thread, but a daemon one does not keep the
    process alive, so the run reports the error and exits while the hung call is abandoned."""
    if timeout is None:
        return call()
    outcome: dict[str, Any] = {}
    grad = torch.is_grad_enabled()  # thread-local in torch: the call runs as it would in the caller's thread

    def target() -> None:
        try:
            with torch.set_grad_enabled(grad):
                outcome["value"] = call()
        except BaseException as err:  # handed to the caller's thread, which reports it
            outcome["error"] = err

    worker = threading.Thread(target=target, name=f"reward {name}", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise RewardError(_timeout_message(name, timeout))
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _timeout_message(name: str, timeout: float) -> str:
    return (f"reward function {name} did not return within recipe.reward_timeout={timeout:g} seconds; "
            "fix the function, or raise recipe.reward_timeout if it is this slow by design")


def _rewards(name: str, values: Any, count: int) -> torch.Tensor:
    """The function's values as a (count,) tensor, or one line naming it when they are not `count` finite numbers."""
    if isinstance(values, Iterable) and not isinstance(values, str | bytes):
        values = list(values)
    if not isinstance(values, list) or len(values) != count:
        got = f"{len(values)} values" if isinstance(values, list) else repr(values)[:60]
        raise RewardError(f"reward function {name} must return one number per completion ({count}), got {got}")
    for value in values:  # bools count as 0/1
        if not isinstance(value, numbers.Real | np.bool_) or not math.isfinite(value):
            raise RewardError(f"reward function {name} returned {value!r}; every reward must be a finite number")
    return torch.tensor([float(v) for v in values])


def _awaitables_in(values: Any) -> Any:
    """`values` as a list when it holds an awaitable, itself when it is one, else None (plain rewards).
    A Future is iterable, so being awaitable is asked first."""
    if inspect.isawaitable(values):
        return values
    if isinstance(values, list | tuple) and any(inspect.isawaitable(v) for v in values):
        return list(values)
    return None


def _starter(name: str, function: RewardFn, timeout: float | None, concurrency: int | None) -> Callable[[list, list, dict[str, list]], torch.Tensor | Pending]:
    def start(prompts: list, completions: list, columns: dict[str, list]) -> torch.Tensor | Pending:
        began = time.monotonic()
        try:
            values = _within(timeout, name, lambda: function(prompts=prompts, completions=completions, **columns))
        except RewardError:
            raise
        except Exception as err:  # user code: any failure is reported with the function's name
            raise RewardError(f"reward function {name} raised {type(err).__name__}: {err}") from None
        awaitables = _awaitables_in(values)
        if awaitables is None:
            return _rewards(name, values, len(completions))
        seconds_left = None if timeout is None else max(0.0, timeout - (time.monotonic() - began))
        return Pending(name, awaitables, len(completions), timeout, seconds_left, concurrency)

    return start


def _checked(name: str, function: RewardFn, timeout: float | None = None, concurrency: int | None = None) -> Callable[[list, list, dict[str, list]], torch.Tensor]:
    start = _starter(name, function, timeout, concurrency)

    def score(prompts: list, completions: list, columns: dict[str, list]) -> torch.Tensor:
        return _resolved([start(prompts, completions, columns)])[0]

    return score


# ------------------------------------------------------------------------------- async rewards
async def _awaited(pending: Pending) -> Any:
    """The function's value with every awaitable in it awaited; a list's at most `concurrency` at a time."""
    value = pending.value
    while inspect.isawaitable(value):  # an async def's coroutine, which may itself give awaitables
        value = await value
    if not isinstance(value, list | tuple) or not any(inspect.isawaitable(v) for v in value):
        return value
    gate = asyncio.Semaphore(pending.concurrency or len(value))

    async def one(item: Any) -> Any:
        if not inspect.isawaitable(item):
            return item
        async with gate:
            return await item

    tasks = [asyncio.ensure_future(one(item)) for item in value]
    try:
        return await asyncio.gather(*tasks)
    finally:  # gather leaves the others running after an error: stop them
        for task in tasks:
            task.cancel()


async def _within_async(pending: Pending) -> torch.Tensor:
    """One function's rewards, refused in one line (its work cancelled) when it outlasts its timeout or fails."""
    task = asyncio.ensure_future(_awaited(pending))
    try:
        finished, _ = await asyncio.wait({task}, timeout=pending.seconds_left)
        if not finished:
            raise RewardError(_timeout_message(pending.name, pending.timeout))
        try:
            values = task.result()
        except Exception as err:  # user code: any failure is reported with the function's name
            raise RewardError(f"reward function {pending.name} raised {type(err).__name__}: {err}") from None
        return _rewards(pending.name, values, pending.count)
    finally:
        pending.done = True
        task.cancel()  # a no-op once it finished; otherwise nothing of this function keeps running


async def _all(pendings: list[Pending]) -> list[torch.Tensor]:
    tasks = [asyncio.ensure_future(_within_async(p)) for p in pendings]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:  # the first error ends the step: the other functions' work stops too
            task.cancel()


def _loop_limit(pendings: list[Pending]) -> float | None:
    """How long to wait for the event loop's thread: past every timeout, in case a function blocks the loop."""
    limits = [p.seconds_left for p in pendings]
    return None if None in limits else max(limits) + 1.0


def _settled(pendings: list[Pending]) -> list[torch.Tensor]:
    """Await every pending function at once in a fresh event loop of a helper thread (the caller may be
    inside a loop of its own); rewards in order. A function that blocks the loop past its timeout is
    abandoned with the thread (a daemon), as a hung sync function is."""
    outcome: dict[str, Any] = {}
    grad = torch.is_grad_enabled()

    def target() -> None:
        try:
            with torch.set_grad_enabled(grad):
                outcome["value"] = asyncio.run(_all(pendings))
        except BaseException as err:  # handed to the caller's thread, which reports it
            outcome["error"] = err
        finally:  # the loop is closed: what a timeout or an error kept from starting never will
            for pending in pendings:
                pending.discard()

    worker = threading.Thread(target=target, name="async reward functions", daemon=True)
    worker.start()
    worker.join(_loop_limit(pendings))
    if worker.is_alive():
        stuck = next((p for p in pendings if not p.done), pendings[0])
        raise RewardError(_timeout_message(stuck.name, stuck.timeout))
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _resolved(started: list[torch.Tensor | Pending]) -> list[torch.Tensor]:
    """Every source's rewards: the pending ones awaited together, the others as they are."""
    pendings = [s for s in started if isinstance(s, Pending)]
    settled = iter(_settled(pendings) if pendings else [])
    return [next(settled) if isinstance(s, Pending) else s for s in started]


def function_sources(entries: Sequence[Any], weights: Sequence[float] | None, timeout: float | None = None,
                     concurrency: int | None = None) -> list[RewardSource]:
    """Reward sources from recipe.reward_funcs (and recipe.reward_weights, which must match in length);
    a call that has not returned after `timeout` seconds (recipe.reward_timeout) stops the run, and an
    async function's list of awaitables runs `concurrency` (recipe.reward_concurrency; None: all) at a time."""
    if weights is not None and len(weights) != len(entries):
        raise RewardError(f"recipe.reward_weights has {len(weights)} values for {len(entries)} reward functions")
    sources: list[RewardSource] = []
    for i, entry in enumerate(entries):
        path, function, weight = _build(entry, f"recipe.reward_funcs[{i}]")
        weight = weights[i] if weights is not None else (1.0 if weight is None else float(weight))
        # Metrics are named by the function; one function used twice (two settings), or two
        # modules' functions of the same name, get a numbered name each so none overwrites another.
        name, taken = path.rsplit(".", 1)[-1], {s.name for s in sources}
        if name in taken:
            name = next(f"{name}_{n}" for n in range(2, len(entries) + 2) if f"{name}_{n}" not in taken)
        sources.append(RewardSource(name, float(weight), _checked(path, function, timeout, concurrency),
                                    _starter(path, function, timeout, concurrency)))
    return sources


def model_source(scorer: torch.nn.Module, tokenizer, batch_size: int, weight: float, trim_top_layer: bool = True) -> RewardSource:
    """A reward model (from recipe=reward) as a source: it reads each (prompt, completion) as reward
    training did, text and position alike (alignctl/rl/scored_text.py), padded on the tokenizer's side."""
    device = next(scorer.parameters()).device

    @torch.no_grad()
    def score(prompts: list, completions: list, columns: dict[str, list]) -> torch.Tensor:
        scorer.eval()
        # Not cut to recipe.max_length: a rollout fits it, and a cut row would be read differently than trained.
        sequences = [scored_ids(tokenizer, p, c) for p, c in zip(prompts, completions)]
        out = []
        for start in range(0, len(sequences), batch_size):
            input_ids, attention_mask = padded(sequences[start : start + batch_size], tokenizer.pad_token_id, tokenizer.padding_side)
            scores, _ = sequence_scores(scorer, input_ids.to(device), attention_mask.to(device), tokenizer.pad_token_id, trim_top_layer)
            out.append(scores.cpu())
        return torch.cat(out)

    return RewardSource("reward_model", weight, score)


def combined_rewards(sources: Sequence[RewardSource], prompts: list, completions: list, columns: dict[str, list]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The weighted sum of every source's rewards (N,), and each source's own rewards by name.
    Sync sources score one after another; the async ones' awaitables then run together."""
    started: list[torch.Tensor | Pending] = []
    try:
        for source in sources:
            started.append((source.start or source.score)(prompts, completions, columns))
    except BaseException:
        for pending in started:
            if isinstance(pending, Pending):
                pending.discard()
        raise
    per_source = dict(zip((source.name for source in sources), _resolved(started)))
    total = sum(source.weight * per_source[source.name] for source in sources)
    return total, per_source
