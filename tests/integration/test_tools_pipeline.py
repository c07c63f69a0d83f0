"""The tool-use demonstration (recipes/tools.yaml) through the real CLI, a few steps per stage: SFT, SFT on
builtin:arithmetic_tools from it, then GRPO with the calculator and without it from that SFT run; the tool
run's held-out exact match is measured in greedy multi-turn episodes, the single-turn run's in one turn."""

from __future__ import annotations

import json
from pathlib import Path

from tests.integration.conftest import run_cli

SMALL = ["sft.recipe.max_steps=4", "sft_tools.recipe.max_steps=4", "sft_tools.recipe.eval_every=0", "grpo_tools.recipe.max_steps=1", "grpo_single.recipe.max_steps=1", "data.eval_limit=8",
         "recipe.batch_size=8", "sft.recipe.eval_every=0", "grpo_tools.recipe.num_generations=4", "grpo_single.recipe.num_generations=4"]


def _evaluations(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "eval_exact_match" in r]


def test_the_tools_pipeline_runs_and_evaluates_the_tool_run_in_episodes(tmp_path):
    result = run_cli(["pipeline", "tools", f"pipeline.dir={tmp_path / 'out'}", *SMALL], cwd=tmp_path)
    assert result.returncode == 0, result.describe()
    tools, single = _evaluations(tmp_path / "out" / "grpo_tools"), _evaluations(tmp_path / "out" / "grpo_single")
    assert [r["step"] for r in tools] == [0, 1] and [r["step"] for r in single] == [0, 1]
    assert all(1 <= r["eval_episodes/mean_turns"] <= 2 for r in tools)  # greedy episodes, at most recipe.max_turns
    assert not any("eval_episodes/mean_turns" in r for r in single)
