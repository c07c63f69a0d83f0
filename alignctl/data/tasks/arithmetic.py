"""The built-in task: add two whole numbers below 1000.

A prompt is ``"347+089="`` and the exact answer is ``"0436"`` (fixed width). The task is verifiable (exact match),
cheap enough to learn on two CPU cores in minutes, and has a difficulty knob that later stages can
exploit: the supervised demonstrations come from a *sloppy teacher* who, on problems where a carry
ripples through two columns, often forgets the second carry. SFT faithfully learns that mistake;
the preference pairs, the unpaired feedback and the verifier are always right, so DPO, KTO and RL
have something to fix that more SFT cannot.

Splits (all written by ``scripts/make_task_data.py`` from one seed, disjoint problems):

- ``sft``: prompt / completion (the sloppy teacher's answer)
- ``preference``: prompt / chosen / rejected (rejected is a plausible wrong answer)
- ``feedback``: prompt / completion / label (unpaired, for KTO)
- ``rl``: prompt / answer (prompts for online RL; the answer feeds the verifier)
- ``eval``: prompt / answer / completion (held out; exact-match accuracy is measured here)
- ``eval_preference``: prompt / chosen / rejected (held out, for preference metrics)
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

DATA_DIR = Path(__file__).parent / "data"
MAX_OPERAND = 999
SPLIT_SIZES = {
    "sft": 30_000,
    "preference": 20_000,
    "feedback": 20_000,
    "rl": 10_000,
    "eval": 1_000,
    "eval_preference": 1_000,
}
# How often the sloppy teacher drops a rippling carry. Above 0.5, so greedy decoding of a model
# that imitates the teacher reproduces the mistake.
SLOPPY_RATE = 0.7


def format_prompt(a: int, b: int) -> str:
    # Fixed width (operands padded to 3 digits, answers to 4) puts each column at a fixed position,
    # which a small model learns in minutes; variable-width sums take several times longer.
    return f"{a:03d}+{b:03d}="


def format_answer(total: int) -> str:
    return f"{total:04d}"


def parse_prompt(prompt: str) -> tuple[int, int]:
    left, right = prompt.rstrip("=").split("+")
    return int(left), int(right)


def has_rippling_carry(a: int, b: int) -> bool:
    """True when a carry out of one column makes the next column carry too (e.g. 58+47)."""
    carry, rippled = 0, False
    while a or b:
        digit_sum = a % 10 + b % 10 + carry
        if carry and digit_sum >= 10:
            rippled = True
        carry = int(digit_sum >= 10)
        a, b = a // 10, b // 10
    return rippled


def add_forgetting_rippled_carries(a: int, b: int) -> int:
    """Column addition that drops every carry arriving into a column which itself carries."""
    result, place, carry = 0, 1, 0
    while a or b or carry:
        column = a % 10 + b % 10
        if carry and column + carry >= 10:
            carry = 0  # the mistake: the incoming carry is forgotten
        digit_sum = column + carry
        result += (digit_sum % 10) * place
        carry = int(digit_sum >= 10)
        a, b, place = a // 10, b // 10, place * 10
    return result


def plausible_wrong_answer(a: int, b: int, rng: random.Random) -> int:
    """A wrong sum of the kind a learner makes: a dropped carry (most likely when one ripples) or
    one digit off by one."""
    right = a + b
    candidates = []
    if has_rippling_carry(a, b):
        candidates += [add_forgetting_rippled_carries(a, b)] * 3
    digits = format_answer(right)
    for i in range(len(digits)):
        for delta in (-1, 1):
            d = int(digits[i]) + delta
            if 0 <= d <= 9:
                candidates.append(int(digits[:i] + str(d) + digits[i + 1 :]))
    return rng.choice([c for c in candidates if c != right])


def verify(completion: str, answer: str) -> bool:
    """Exact match of the first line of a completion (whitespace around it ignored)."""
    lines = completion.strip().splitlines()
    return bool(lines) and lines[0].strip() == answer.strip()


def _unique_problems(rng: random.Random) -> Iterator[tuple[int, int]]:
    seen: set[tuple[int, int]] = set()
    while True:
        pair = (rng.randint(0, MAX_OPERAND), rng.randint(0, MAX_OPERAND))
        if pair not in seen:
            seen.add(pair)
            yield pair


def generate_splits(seed: int = 0) -> dict[str, list[dict]]:
    """All splits, deterministic in ``seed``; no problem appears in two splits."""
    rng = random.Random(seed)
    problems = _unique_problems(rng)
    splits: dict[str, list[dict]] = {}
    for name, size in SPLIT_SIZES.items():
        rows = []
        for _ in range(size):
            a, b = next(problems)
            prompt, answer = format_prompt(a, b), format_answer(a + b)
            if name == "sft":
                sloppy = has_rippling_carry(a, b) and rng.random() < SLOPPY_RATE
                shown = add_forgetting_rippled_carries(a, b) if sloppy else a + b
                rows.append({"prompt": prompt, "completion": format_answer(shown)})
            elif name in ("preference", "eval_preference"):
                wrong = plausible_wrong_answer(a, b, rng)
                rows.append({"prompt": prompt, "chosen": answer, "rejected": format_answer(wrong)})
            elif name == "feedback":
                good = rng.random() < 0.5
                shown = answer if good else format_answer(plausible_wrong_answer(a, b, rng))
                rows.append({"prompt": prompt, "completion": shown, "label": good})
            else:  # rl, eval
                row = {"prompt": prompt, "answer": answer}
                if name == "eval":
                    row["completion"] = answer  # lets the eval split also score SFT loss
                rows.append(row)
        splits[name] = rows
    return splits


def write_jsonl_splits(splits: dict[str, list[dict]], out_dir: Path) -> dict[str, Path]:
    """One <split>.jsonl per split (shared by every built-in task)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in splits.items():
        path = out_dir / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        paths[name] = path
    return paths


def shipped_split(data_dir: Path, name: str) -> Path:
    path = data_dir / f"{name}.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"built-in task split '{name}' is missing at {path}; run scripts/make_task_data.py")
    return path


def write_splits(out_dir: Path, seed: int = 0) -> dict[str, Path]:
    return write_jsonl_splits(generate_splits(seed), out_dir)


def split_path(name: str) -> Path:
    return shipped_split(DATA_DIR, name)
