"""The built-in task for real chat models: two-digit sums asked in words, answered with the number.

A prompt is one user message, ``"What is 47 + 38? Reply with the number only."``, and the exact answer is
``"85"``. A pretrained chat model such as SmolLM2-135M-Instruct scores about 0 here out of the box (it
explains its working: ``"To add 47 and 38, we..."``); a few minutes of SFT on two CPU cores teach it
the format and most of the sums, so the held-out exact match shows a real model learning. The splits
have the arithmetic task's names and formats (so every recipe runs on it) and come from one seed:

- ``sft``: prompt / completion (always right: the demonstrations of a careful teacher)
- ``preference``: prompt / chosen / rejected (rejected: a dropped carry or one digit off by one)
- ``feedback``: prompt / completion / label (unpaired, for KTO)
- ``rl``: prompt / answer; ``eval``: prompt / answer / completion; ``eval_preference``: held-out pairs
"""

from __future__ import annotations

import random
from pathlib import Path

from alignctl.data.tasks.arithmetic import shipped_split, verify, write_jsonl_splits  # noqa: F401 - verify: the same rule, the first line is the answer

DATA_DIR = Path(__file__).parent / "chat_data"
MAX_OPERAND = 99
SPLIT_SIZES = {"sft": 2_000, "preference": 2_000, "feedback": 2_000, "rl": 1_000, "eval": 200, "eval_preference": 200}


def format_prompt(a: int, b: int) -> list[dict]:
    return [{"role": "user", "content": f"What is {a} + {b}? Reply with the number only."}]


def wrong_answer(a: int, b: int, rng: random.Random) -> int:
    """A mistake a learner makes: the carry dropped, or one digit off by one."""
    right = a + b
    candidates = [right - 10] if (a % 10 + b % 10) >= 10 else []
    digits = str(right)
    for i, digit in enumerate(digits):
        for delta in (-1, 1):
            changed = int(digit) + delta
            if 0 <= changed <= 9 and not (i == 0 and changed == 0 and len(digits) > 1):
                candidates.append(int(digits[:i] + str(changed) + digits[i + 1 :]))
    return rng.choice([c for c in candidates if c != right and c >= 0])


def generate_splits(seed: int = 0) -> dict[str, list[dict]]:
    """All splits, deterministic in ``seed``; no problem appears in two splits."""
    rng = random.Random(seed)
    problems = [(a, b) for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1)]
    rng.shuffle(problems)
    splits: dict[str, list[dict]] = {}
    start = 0
    for name, size in SPLIT_SIZES.items():
        rows = []
        for a, b in problems[start : start + size]:
            prompt, answer = format_prompt(a, b), str(a + b)
            if name == "sft":
                rows.append({"prompt": prompt, "completion": answer})
            elif name in ("preference", "eval_preference"):
                rows.append({"prompt": prompt, "chosen": answer, "rejected": str(wrong_answer(a, b, rng))})
            elif name == "feedback":
                good = rng.random() < 0.5
                rows.append({"prompt": prompt, "completion": answer if good else str(wrong_answer(a, b, rng)), "label": good})
            else:  # rl, eval
                rows.append({"prompt": prompt, "answer": answer} | ({"completion": answer} if name == "eval" else {}))
        splits[name] = rows
        start += size
    return splits


def write_splits(out_dir: Path, seed: int = 0) -> dict[str, Path]:
    return write_jsonl_splits(generate_splits(seed), out_dir)


def split_path(name: str) -> Path:
    return shipped_split(DATA_DIR, name)
