"""`export merge=true` checks the merge relative to the logits' size: a correct merge passes, a wrong
one (here: the adapter folded in at twice its scale) is refused in one line and writes nothing."""

from __future__ import annotations

import json

import pytest
import torch

from alignctl.cli.export import TOLERANCE, merge_check
from alignctl.core.errors import UserError
from tests.integration.conftest import run_cli
from tests.integration.stage_runs import merge_at_twice_the_scale


def test_merge_check_is_relative_to_the_largest_logit():
    before = torch.tensor([[20.0, -5.0, 1.0]], dtype=torch.float64)
    # 2e-4 on logits of 20 (a correct float32 merge of a real model): 1e-5 of the largest logit.
    correct = merge_check(before, before + torch.tensor([[2e-4, 0.0, 0.0]], dtype=torch.float64), TOLERANCE["float32"])
    assert correct["max_abs_logit_difference"] == pytest.approx(2e-4, rel=1e-3)
    assert correct["logit_scale"] == 20.0
    assert correct["relative_difference"] == pytest.approx(1e-5, rel=1e-3)
    assert correct["relative_difference"] < correct["tolerance"]
    # The same absolute difference on logits of 1 is 2e-4 of them: too much.
    small = merge_check(before / 20, before / 20 + torch.tensor([[2e-4, 0.0, 0.0]], dtype=torch.float64), TOLERANCE["float32"])
    assert small["relative_difference"] == pytest.approx(2e-4, rel=1e-3)
    assert small["relative_difference"] > small["tolerance"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_merge")
    args = ["recipe=sft", "adapter=lora", "recipe.max_steps=4", "recipe.lr=1e-2", "data.eval_limit=8", "recipe.eval_every=0"]
    done = run_cli(["train", *args, f"hydra.run.dir={root / 'run'}"], cwd=root)
    assert done.returncode == 0, done.describe()
    return root / "run"


def test_a_correct_merge_passes_and_records_its_figures(lora_run, tmp_path):
    from alignctl.cli.export import export_command

    export_command([f"run={lora_run}", f"out={tmp_path / 'merged'}", "merge=true"])
    record = json.loads((tmp_path / "merged" / "alignctl_export.json").read_text())
    assert record["relative_difference"] <= record["tolerance"] == TOLERANCE["float32"]
    assert record["relative_difference"] == pytest.approx(record["max_abs_logit_difference"] / record["logit_scale"])


def test_a_wrong_merge_is_refused_in_one_line(lora_run, tmp_path, monkeypatch):
    from alignctl.cli import export

    monkeypatch.setattr(export, "merge", merge_at_twice_the_scale)
    out = tmp_path / "merged"
    with pytest.raises(UserError) as refused:
        export.export_command([f"run={lora_run}", f"out={out}", "merge=true"])
    message = str(refused.value)
    assert "\n" not in message and "of the largest logit" in message and "tolerance=0.0001" in message, message
    assert not out.exists() and not list(tmp_path.glob(".merged.tmp-*"))
