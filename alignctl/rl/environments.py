"""Environments for multi-turn RL: user classes named by dotted path, checked, and the built-in tool ones.

An environment is a class named in ``recipe.environment`` (the only way user code enters a run besides
reward functions) and built as ``Class(**recipe.environment_kwargs)``, one instance per episode::

    class MyEnv:
        max_turns = 4                      # optional: model turns at most (recipe.max_turns caps it too)
        tools = [my_function]              # optional: declared to the chat template (tools=...)

        def reset(self, row: dict) -> None: ...            # the dataset row the episode starts from
        def step(self, turn: str) -> tuple[str | None, bool, float]:
            ...                            # the model's turn (decoded text) -> (reply, done, reward)

A reply goes back to the model as a ``tool`` message (alignctl/rl/multi_turn.py); its tokens are never
sampled and carry no loss. An episode's environment reward is the sum of its steps' rewards. Any failure
of an environment (import, construction, an exception in reset or step, a wrong return) stops the run in
one line naming the class (`EnvironmentFailure`, exit 2); a failing *tool* is different: the model reads
its error (alignctl/rl/tools.py).
"""

from __future__ import annotations

import importlib
import math
import numbers
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from alignctl.core.errors import UserError
from alignctl.rl.reward_sources import DOTTED_PATH
from alignctl.rl.tools import Tool, calculator, call_format, parse_tool_calls, run_tool


class EnvironmentFailure(UserError):
    """An environment that cannot be loaded, raised, or returned something unusable."""


class StepResult(NamedTuple):
    reply: str | None  # the environment's message (a tool result); None: nothing to say
    done: bool
    reward: float


def import_object(dotted: str, where: str) -> Any:
    """The object at a dotted path, found by import: user code is never evaluated from a string."""
    if not isinstance(dotted, str) or not DOTTED_PATH.fullmatch(dotted):
        raise EnvironmentFailure(f"{where}: {dotted!r} is not a dotted path; give module.Name, e.g. alignctl.rl.environments.CalculatorEnv")
    module_name, _, attribute = dotted.replace(":", ".").rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (Exception, SystemExit) as err:  # an import runs user code: whatever it raises is reported in one line
        raise EnvironmentFailure(f"{where}: cannot import {dotted!r} ({type(err).__name__}: {err})") from None


def checked_step(name: str, value: Any) -> StepResult:
    """`value` as a StepResult, or an EnvironmentFailure saying what step must return."""
    expected = "(reply: str | None, done: bool, reward: float)"
    if not isinstance(value, tuple | list) or len(value) != 3:
        raise EnvironmentFailure(f"environment {name}: step returned {value!r:.80}; expected {expected}")
    reply, done, reward = value
    if reply is not None and not isinstance(reply, str):
        raise EnvironmentFailure(f"environment {name}: step's reply is {type(reply).__name__}; expected {expected}")
    if not isinstance(done, bool | np.bool_):
        raise EnvironmentFailure(f"environment {name}: step's done is {type(done).__name__}; expected {expected}")
    if not isinstance(reward, numbers.Real) or not math.isfinite(reward):
        raise EnvironmentFailure(f"environment {name}: step's reward is {reward!r}; expected a finite number")
    return StepResult(reply, bool(done), float(reward))


class Episode:
    """One episode's environment, every call checked: what user code does wrong stops the run naming it."""

    def __init__(self, name: str, env: Any):
        self.name, self.env = name, env

    def _call(self, method: str, *args: Any) -> Any:
        function = getattr(self.env, method, None)
        if not callable(function):
            raise EnvironmentFailure(f"environment {self.name} has no {method}() method; see docs/guide-environments.md")
        try:
            return function(*args)
        except EnvironmentFailure:
            raise
        except (Exception, SystemExit) as err:  # user code (sys.exit() there would end the run with exit code 0)
            raise EnvironmentFailure(f"environment {self.name}: {method} raised {type(err).__name__}: {err}") from None

    def reset(self, row: dict) -> None:
        if self._call("reset", row) is not None:
            raise EnvironmentFailure(f"environment {self.name}: reset must return None")

    def step(self, turn: str) -> StepResult:
        return checked_step(self.name, self._call("step", turn))


@dataclass
class EnvironmentSpec:
    """recipe.environment, loaded: builds one checked environment per episode."""

    name: str
    make: Callable[[], Any]
    max_turns: int  # recipe.max_turns, lowered by the class's own max_turns
    tools: list[Tool]  # declared to the chat template

    def new(self, row: dict, markup: str) -> Episode:
        try:
            env = self.make()
        except EnvironmentFailure:
            raise
        except (Exception, SystemExit) as err:
            raise EnvironmentFailure(f"environment {self.name}: {self.name.rsplit('.', 1)[-1]}(**recipe.environment_kwargs) raised "
                                     f"{type(err).__name__}: {err}") from None
        if isinstance(env, ToolEnv):
            env.markup = markup
        episode = Episode(self.name, env)
        episode.reset(row)
        return episode

    def tool_schemas(self) -> list[dict] | None:
        return [tool.schema() for tool in self.tools] or None


def load_environment(path: str, kwargs: dict, max_turns: int) -> EnvironmentSpec:
    """recipe.environment (a dotted path to a class), checked by building one instance now, before any model loads."""
    cls = import_object(path, "recipe.environment")
    if not isinstance(cls, type):
        raise EnvironmentFailure(f"recipe.environment: {path} is a {type(cls).__name__}, not a class")
    spec = EnvironmentSpec(path, lambda: cls(**kwargs), max_turns, [])
    try:
        probe = spec.make()
    except EnvironmentFailure:  # already one line (a ToolEnv's tool that cannot be imported)
        raise
    except (Exception, SystemExit) as err:
        raise EnvironmentFailure(f"environment {path}: {cls.__name__}(**recipe.environment_kwargs) raised {type(err).__name__}: {err}") from None
    own = getattr(probe, "max_turns", None)
    if own is not None:
        if not isinstance(own, int) or own < 1:
            raise EnvironmentFailure(f"environment {path}: max_turns is {own!r}; expected a positive integer")
        spec.max_turns = min(max_turns, own)
    tools = getattr(probe, "tools", None) or []
    if not isinstance(tools, Sequence) or not all(callable(t) for t in tools):
        raise EnvironmentFailure(f"environment {path}: tools must be a list of functions, got {tools!r:.80}")
    spec.tools = [Tool(t) for t in tools]
    return spec


# ---------------------------------------------------------------------------------- built-in environments
class ToolEnv:
    """The model calls tools until it answers without one: each turn's tool calls run (in the markup the
    chat template declares, alignctl/rl/tools.py) and their results are the reply; a turn without a call
    ends the episode. Rewards come from the reward functions, which read the final answer.

    environment_kwargs: ``tools`` (dotted paths of plain Python functions), ``timeout`` (seconds a call
    may take before the model reads a timeout error)."""

    default_tools: tuple[Callable, ...] = ()

    def __init__(self, tools: Sequence[str] | str | None = None, timeout: float | None = 10.0):
        # One path without brackets (+recipe.environment_kwargs.tools=mypkg.lookup) is a list of one, not of its characters.
        paths = [tools] if isinstance(tools, str) else list(tools or [])
        functions = list(self.default_tools) + [import_object(p, "recipe.environment_kwargs.tools") for p in paths]
        self.tools = functions
        self.by_name = {Tool(f).name: Tool(f) for f in functions}
        self.timeout = timeout
        self.markup = "plain"

    def reset(self, row: dict) -> None:
        self.row = row

    def step(self, turn: str) -> StepResult:
        calls = parse_tool_calls(turn, self.markup)
        if not calls:
            return StepResult(None, True, 0.0)
        return StepResult("\n".join(run_tool(self.by_name, call, self.timeout) for call in calls), False, 0.0)


class CalculatorEnv(ToolEnv):
    """ToolEnv with the calculator (exact integer arithmetic), e.g. for the built-in task: the model may
    write ``<tool>calculator: 347+89</tool>`` (or the template's markup), read the result, then answer."""

    default_tools = (calculator,)

    def __init__(self, tools: Sequence[str] | str | None = None, timeout: float | None = 10.0, width: int | None = None):
        """`width`: results zero-padded to that many digits (``width: 4`` gives ``0436``), so that a small model
        copies the answer column by column when its task writes answers at a fixed width."""
        if width is not None and (not isinstance(width, int) or isinstance(width, bool) or width < 1):
            raise EnvironmentFailure(f"recipe.environment_kwargs.width: {width!r}; expected a positive integer or null")
        super().__init__(tools, timeout)
        self.width = width

    def step(self, turn: str) -> StepResult:
        result = super().step(turn)
        if self.width is None or result.reply is None:
            return result
        padded = "\n".join(_zero_padded(line, self.width) for line in result.reply.split("\n"))
        return StepResult(padded, result.done, result.reward)


def _zero_padded(value: str, width: int) -> str:
    """An integer result at `width` digits (a minus sign before them); errors and other text unchanged."""
    if re.fullmatch(r"-?\d+", value) is None:
        return value
    sign, digits = ("-", value[1:]) if value.startswith("-") else ("", value)
    return sign + digits.zfill(width)


__all__ = ["CalculatorEnv", "EnvironmentFailure", "EnvironmentSpec", "StepResult", "ToolEnv", "call_format", "load_environment"]
