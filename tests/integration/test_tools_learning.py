"""The tool-use demonstration learns (slow tier): `alignctl pipeline tools` as shipped (recipes/tools.yaml),
seed 0. GRPO with the calculator lifts held-out greedy exact match far above GRPO without it from the same
SFT run: the calculator is exact, so a policy that learns to call it on every prompt and copy its result
answers almost everything, while the single-turn policy keeps part of the sloppy teacher's carries.

Run with `pytest -m slow -s tests/integration/test_tools_learning.py` to print the figures docs/results.md quotes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.conftest import run_cli

pytestmark = pytest.mark.slow


def _evaluations(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "eval_exact_match" in r]


def test_grpo_with_the_calculator_beats_grpo_without_it_from_the_same_sft_run(tmp_path):
    out = tmp_path / "tools"
    result = run_cli(["pipeline", "tools", f"pipeline.dir={out}"], cwd=tmp_path, timeout=3600)
    assert result.returncode == 0, result.describe()
    tools, single = _evaluations(out / "grpo_tools"), _evaluations(out / "grpo_single")
    sft_tools = _evaluations(out / "sft_tools")[-1]["eval_exact_match"]
    for name, records in (("grpo_tools", tools), ("grpo_single", single)):
        print(f"{name}: " + ", ".join(f"step {r['step']} {r['eval_exact_match']:.1%}" for r in records)
              + (f" (turns {records[-1]['eval_episodes/mean_turns']:.2f})" if "eval_episodes/mean_turns" in records[-1] else ""))
    print(f"sft: {_evaluations(out / 'sft')[-1]['eval_exact_match']:.1%}; sft_tools single-turn: {sft_tools:.1%}")
    start_tools, start_single = tools[0]["eval_exact_match"], single[0]["eval_exact_match"]
    # Same weights at step 0: the episodes do better only because the policy already calls the tool sometimes.
    assert start_single == pytest.approx(sft_tools)
    assert 1.0 < tools[0]["eval_episodes/mean_turns"] < 1.9 and start_tools > start_single
    final_tools, final_single = tools[-1]["eval_exact_match"], single[-1]["eval_exact_match"]
    assert final_single > start_single + 0.15  # single-turn GRPO learns too (the task verifier)...
    assert final_tools >= 0.95  # ...but with the calculator the policy calls it and copies its result
    assert tools[-1]["eval_episodes/mean_turns"] > 1.95
    assert final_tools > final_single + 0.08
