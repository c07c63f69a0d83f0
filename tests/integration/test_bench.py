"""scripts/bench.py end to end in its quick mode (slow tier: make test-slow installs TRL for it).

No timing is asserted: the test checks that both sides trained the same case on the same data and
that every reported figure is a measurement (positive, finite), and that docs/performance.md's table is written."""

from __future__ import annotations

import json
import math
import shutil
import sys

import pytest

from alignctl.core import allocator

pytestmark = pytest.mark.slow


def test_quick_benchmark_measures_both_sides(tmp_path, repo_root, run_cmd):
    pytest.importorskip("trl")
    repo = tmp_path / "repo"  # a copy, so that --docs writes into a performance page of its own
    shutil.copytree(repo_root / "scripts", repo / "scripts")
    (repo / "docs").mkdir()
    shutil.copy(repo_root / "docs" / "performance.md", repo / "docs" / "performance.md")
    out = tmp_path / "out"
    result = run_cmd([sys.executable, str(repo / "scripts" / "bench.py"), "--quick", "--out", str(out), "--docs"], cwd=repo_root, timeout=1200)
    assert result.returncode == 0, result.describe()

    report = json.loads((out / "results.json").read_text())
    assert [row["case"] for row in report["rows"]] == ["sft", "dpo-lora", "grpo"]
    assert report["versions"]["trl"] and report["peak_gflops"] > 0
    for row in report["rows"]:
        for side in ("alignctl", "trl"):
            figures = row[side]
            assert figures["seconds"] > 0 and figures["steps_per_s"] > 0
            assert len(figures["all_seconds"]) == 1
            assert math.isfinite(figures["first_loss"]) and math.isfinite(figures["final_loss"])
            if row["stage"] != "grpo":
                assert figures["tokens_per_s"] > 0 and 0 < figures["mfu"] < 1
        assert row["speed_ratio"] == pytest.approx(row["trl"]["seconds"] / row["alignctl"]["seconds"])
        # alignctl runs under the allocator its CLI picks; TRL as shipped, and again under that allocator
        assert row["trl"]["allocator"] == "system"
        assert row["alignctl"]["allocator"] == ("jemalloc" if allocator.find("jemalloc") else "tcmalloc" if allocator.find("tcmalloc") else "system")
        if row["alignctl"]["allocator"] != "system":
            assert row["trl+allocator"]["allocator"] == row["alignctl"]["allocator"]
            assert row["same_allocator_memory_ratio"] == pytest.approx(row["alignctl"]["memory_mib"] / row["trl+allocator"]["memory_mib"])
    # Both sides start from the same weights on the same data: DPO's first loss is ln 2 on each.
    dpo = report["rows"][1]
    assert dpo["alignctl"]["first_loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert dpo["trl"]["first_loss"] == pytest.approx(math.log(2), abs=1e-3)
    page = (repo / "docs" / "performance.md").read_text()
    assert "| dpo-lora |" in page and (out / "results.md").read_text().strip() in page
