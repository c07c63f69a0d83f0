"""`alignctl plan` against the measured peak of the run it plans, on the real model (model=smollm2, CPU):
docs/guide-adapters-precision.md quotes plan against the measured peak; it holds within 30 %.

Each case plans a short run (batch 2, max_length 128, 3 steps) and then trains it, in a process of
its own whose peak resident set size the kernel reports (os.wait4's ru_maxrss): the process itself,
loading, and every step, as plan counts them. Every row of the data has the same shape, so each
batch is the widest one that plan sizes its activations from. All nine cases (sft/dpo/grpo x
none/lora/qlora) are slow: under make test's two xdist workers the SFT-LoRA run measured 2.2 GB
against 1.27 GB alone in 2 of 5 full runs (not understood yet; see docs/not-yet.md), so this
measurement runs in one process, in make test-slow and make test-real.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

RECIPES = ("sft", "dpo", "grpo")
ADAPTERS = ("none", "lora", "qlora")
UNITS = {"K": 2**10, "M": 2**20, "G": 2**30}


def sentence(words: int, offset: int) -> str:
    vocabulary = "the model learns to answer short questions about numbers colours animals and places with care".split()
    return " ".join(vocabulary[(offset + 7 * i) % len(vocabulary)] for i in range(words)).capitalize() + "."


def write_data(directory: Path, recipe: str) -> Path:
    """40 rows of one shape (a 20-word question, answers of 60 and 40 words) in the recipe's format."""
    rows = []
    for i in range(40):
        prompt = [{"role": "user", "content": sentence(20, i)}]
        good, bad = [{"role": "assistant", "content": sentence(60, i + 1)}], [{"role": "assistant", "content": sentence(40, i + 2)}]
        rows.append({"sft": {"prompt": prompt, "completion": good},
                     "dpo": {"prompt": prompt, "chosen": good, "rejected": bad},
                     "grpo": {"prompt": prompt}}[recipe])
    path = directory / f"{recipe}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def overrides(recipe: str, adapter: str, data: Path) -> list[str]:
    args = [f"recipe={recipe}", "model=smollm2", f"adapter={adapter}", "data=hf", f"data.path={data}", "data.eval_split=null",
            "recipe.batch_size=2", "recipe.max_length=128", "recipe.max_steps=3", "recipe.eval_every=0"]
    if recipe == "grpo":
        args += ["recipe.num_generations=2", "recipe.max_new_tokens=32", "recipe.reward_funcs=[alignctl.rewards.length_penalty]"]
    return args


def planned_peak(args: list[str], cwd: Path) -> float:
    done = subprocess.run([sys.executable, "-m", "alignctl", "plan", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 0, done.stdout + done.stderr
    row = next(line for line in done.stdout.splitlines() if line.strip("│ ").startswith("peak"))
    value, unit = re.search(r"([\d.]+)([KMG])\s*│\s*$", row).groups()
    assert "from the 40 training rows' token lengths" in done.stdout  # sized from the data, not max_length
    return float(value) * UNITS[unit]


def measured_peak(args: list[str], cwd: Path) -> float:
    """Peak resident set size of one training run, in bytes."""
    process = subprocess.Popen([sys.executable, "-m", "alignctl", "train", *args, f"hydra.run.dir={cwd / 'run'}"], cwd=cwd,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = process.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    assert process.returncode == 0, output
    return usage.ru_maxrss * 1024  # KiB on Linux


CASES = [pytest.param(r, a, marks=pytest.mark.slow, id=f"{r}-{a}") for r in RECIPES for a in ADAPTERS]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss is in KiB on Linux only")
@pytest.mark.parametrize("recipe, adapter", CASES)
def test_plan_is_within_30_percent_of_the_measured_peak(smollm2_dir, tmp_path, recipe, adapter):
    args = overrides(recipe, adapter, write_data(tmp_path, recipe))
    planned = planned_peak(args, tmp_path)
    measured = measured_peak(args, tmp_path)
    print(f"{recipe} {adapter}: planned {planned / 2**20:.0f} MiB, measured {measured / 2**20:.0f} MiB ({planned / measured:.2f}x)")
    assert 0.7 * measured <= planned <= 1.3 * measured, (planned / 2**20, measured / 2**20)
