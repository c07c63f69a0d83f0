"""recipe=kto through the real CLI on unpaired feedback: trains, logs TRL's KTO metrics, and the
reference modes agree on the starting policy."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

KTO_KEYS = {"loss", "kl", "rewards/chosen_sum", "rewards/rejected_sum", "logps/chosen_sum", "logps/rejected_sum", "count/chosen", "count/rejected"}


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    return tmp_path_factory.mktemp("kto") / "sft"


def _train(alignctl, run_dir, *overrides):
    result = alignctl("train", *overrides, "data.eval_limit=32", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.describe()
    return result, [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_kto_trains_from_sft_with_each_reference(alignctl, tmp_path, sft_run):
    _train(alignctl, sft_run, "recipe=sft", "recipe.max_steps=20", "recipe.eval_every=0")
    first_losses = {}
    for name, extra in {"separate": ["recipe.reference=separate"], "precomputed": ["recipe.reference=precomputed"],
                        "lora": ["adapter=lora"]}.items():
        result, lines = _train(alignctl, tmp_path / name, "recipe=kto", f"inputs.policy={sft_run}", "recipe.max_steps=3",
                               "recipe.eval_every=0", "recipe.batch_size=8", *extra)
        train = [line for line in lines if "kl" in line and "loss" in line]
        assert len(train) == 3 and KTO_KEYS <= set(train[0]), train[0]
        assert all(math.isfinite(line["loss"]) for line in train)
        assert all(line["kl"] >= 0 for line in train)  # the reference point the loss used, clamped at 0
        assert train[0]["count/chosen"] + train[0]["count/rejected"] == 8
        evals = [line for line in lines if "eval_rewards/margins" in line]
        assert evals[0]["step"] == 0 and evals[0]["eval_rewards/margins"] == 0.0 and evals[0]["eval_loss"] == pytest.approx(0.5)
        first_losses[name] = train[0]["loss"]
        if name == "lora":
            assert "reference adapter_disabled" in result.output
    # Every reference is the starting policy: the first step sees log-ratios of zero, so 1 - sigma(0).
    for loss in first_losses.values():
        assert loss == pytest.approx(0.5, abs=1e-5)

    before = load_file(str(sft_run / "checkpoint" / "model.safetensors"))
    after = load_file(str(tmp_path / "separate" / "checkpoint" / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_kto_rejects_data_without_labels(alignctl, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": "001+002=", "completion": "0003"}) + "\n" for _ in range(4)))
    result = alignctl("train", "recipe=kto", "data=hf", f"data.path={data}", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2 and len(result.stderr_lines()) == 1, result.describe()
    assert "prompt/completion/label" in result.stderr and "Traceback" not in result.output
