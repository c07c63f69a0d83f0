"""What the stage tests share about a finished CLI run (imported by test modules, not a fixture)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass
class StageRun:
    """One CLI training run a test launched: its directory and captured output."""

    name: str
    dir: Path
    result: object  # conftest.CliResult

    @property
    def flat_output(self) -> str:
        """Console output with whitespace collapsed: rich wraps long lines at 80 columns."""
        return " ".join(self.result.output.split())

    def assert_finished(self) -> None:
        assert self.result.returncode == 0, self.result.describe()
        assert "Traceback" not in self.result.output, self.result.describe()
        lineage = json.loads((self.dir / "lineage.json").read_text())
        assert lineage["status"] == "finished", lineage

    def records(self) -> list[dict]:
        return [json.loads(line) for line in (self.dir / "metrics.jsonl").read_text().splitlines() if line.strip()]

    def train_records(self) -> list[dict]:
        return [r for r in self.records() if "loss" in r]


def merge_at_twice_the_scale(trained):
    """A wrong merge for the export tests: every LoRA update added twice."""
    for module in trained.modules():
        if isinstance(getattr(module, "scaling", None), dict):
            module.scaling = {key: 2 * value for key, value in module.scaling.items()}
    return trained.merge_and_unload()
