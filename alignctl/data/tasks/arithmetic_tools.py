"""The built-in task with a calculator: the arithmetic task's problems, where the demonstrations sometimes
call the tool (``builtin:arithmetic_tools``).

An SFT row's completion is, for about half the rows, a calculator call, the environment's reply and the
answer copied from it, laid out exactly as a multi-turn rollout with ``CalculatorEnv`` lays out an episode
after a plain-text prompt (alignctl/rl/multi_turn.py)::

    347+089=  <tool>calculator: 347+089</tool></s>  <result>0436</result>  0436</s>
    (prompt)  (model turn, trained)                 (environment, masked)  (model turn, trained)

and for the other rows the sloppy teacher's direct answer (``0436``, or its dropped-carry mistake), as in
the arithmetic task. The turns are in the column ``completion_turns`` (model turns at even positions,
replies at odd ones), which SFT reads so that the reply's tokens carry no loss (alignctl/data/encode.py);
``completion`` holds the same text joined, for whatever reads a plain completion.

The calculator is exact, so a policy that learns to call it on every prompt answers almost every sum
right, while one that answers directly inherits the teacher's carries: multi-turn GRPO
(``recipe.environment=alignctl.rl.environments.CalculatorEnv``) can find that, single-turn GRPO cannot.
Every other split (rl, eval, the preference ones) is the arithmetic task's own file.

The reply and the answer after it are written at the task's fixed width (``0436``), so the arithmetic task's
verifier (exact match, `verify`) and reward function (alignctl.rewards.task_verifier) apply unchanged.
"""

from __future__ import annotations

import random
from pathlib import Path

from alignctl.data.tasks import arithmetic
from alignctl.data.tasks.arithmetic import shipped_split, verify, write_jsonl_splits  # noqa: F401 - verify: the same exact match

DATA_DIR = Path(__file__).parent / "tools_data"
TOOL_NAME = "calculator"  # CalculatorEnv's tool (alignctl.rl.tools.calculator)
# The share of SFT rows that call the calculator: enough that the SFT policy calls it on some prompts,
# so GRPO sees both behaviours and their rewards from the first rollout.
TOOL_RATE = 0.5
# The calculator's result at the answer's fixed width (CalculatorEnv(width=4)): the answer is then the
# reply's digits copied at a fixed distance, which the tiny model learns; with the bare sum (436) it did
# not learn to copy within 600 steps (docs/results.md).
RESULT_WIDTH = 4
OWN_SPLITS = ("sft",)


def tool_call(prompt: str) -> str:
    """The model turn that asks the calculator, in the plain markup (the operands as the prompt writes them)."""
    return f"<tool>{TOOL_NAME}: {prompt.rstrip('=')}</tool>"


def tool_reply(total: int) -> str:
    """CalculatorEnv's reply to that call (environment_kwargs.width=RESULT_WIDTH), as multi_turn.reply_text
    writes it after a plain-text prompt."""
    return f"<result>{arithmetic.format_answer(total)}</result>"


def tool_turns(prompt: str) -> list[str]:
    """A demonstration that calls the calculator: call, reply, the answer read from the reply at the task's width."""
    a, b = arithmetic.parse_prompt(prompt)
    return [tool_call(prompt), tool_reply(a + b), arithmetic.format_answer(a + b)]


def generate_splits(seed: int = 0) -> dict[str, list[dict]]:
    """The SFT split: the arithmetic task's rows (same seed, same problems), TOOL_RATE of them calling the calculator."""
    rng = random.Random(seed + 1)  # its own stream: the problems stay the arithmetic task's
    rows = []
    for row in arithmetic.generate_splits(seed)["sft"]:
        turns = tool_turns(row["prompt"]) if rng.random() < TOOL_RATE else [row["completion"]]
        rows.append({"prompt": row["prompt"], "completion": "".join(turns), "completion_turns": turns})
    return {"sft": rows}


def write_splits(out_dir: Path, seed: int = 0) -> dict[str, Path]:
    return write_jsonl_splits(generate_splits(seed), out_dir)


def split_path(name: str) -> Path:
    return shipped_split(DATA_DIR, name) if name in OWN_SPLITS else arithmetic.split_path(name)
