"""The built-in reward functions, named by dotted path in ``recipe.reward_funcs``
(``alignctl.rewards.task_verifier``): the built-in task's verifier, a format check and a length penalty.

Each is called as TRL calls its reward functions (see alignctl/rl/reward_sources.py for the protocol,
the timeouts and how sources combine): keyword arguments, one number per completion, ``**_`` for
what it does not read. A user's own function follows the same shape in a module of their own.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from alignctl.data.tasks.arithmetic import verify

Completion = str | list[dict]  # text, or [{"role": "assistant", "content": text}] (TRL's conversational form)


def completion_text(completion: Completion) -> str:
    """The text of a completion in either of TRL's forms."""
    return completion if isinstance(completion, str) else completion[0]["content"]


def task_verifier(prompts: Sequence, completions: Sequence[Completion], answer: Sequence[str], **_: Any) -> list[float]:
    """1.0 when the completion's first line is exactly the row's ``answer``, else 0.0."""
    return [float(verify(completion_text(c), a)) for c, a in zip(completions, answer)]


def format_check(prompts: Sequence, completions: Sequence[Completion], pattern: str = r"\d+", **_: Any) -> list[float]:
    """1.0 when the whole completion is one line matching `pattern` (default: digits only), else 0.0."""
    compiled = re.compile(pattern)
    texts = [completion_text(c).strip() for c in completions]
    return [float(compiled.fullmatch(t) is not None and "\n" not in t) for t in texts]


def length_penalty(prompts: Sequence, completions: Sequence[Completion], max_chars: int = 8, **_: Any) -> list[float]:
    """-(characters beyond max_chars) / max_chars: 0 for short enough completions, more negative as they ramble."""
    return [-max(0, len(completion_text(c)) - max_chars) / max_chars for c in completions]
