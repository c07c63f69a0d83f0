"""recipe=reward through the real CLI: trains a Bradley-Terry scalar head and writes a checkpoint
that plain transformers loads as a sequence classifier."""

from __future__ import annotations

import json
import math
import sys
import textwrap

import pytest


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    return tmp_path_factory.mktemp("reward") / "sft"


def _train(alignctl, run_dir, *overrides):
    result = alignctl("train", *overrides, "data.eval_limit=64", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.describe()
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_reward_model_from_sft_trains_and_loads_as_a_classifier(alignctl, run_cmd, tmp_path, sft_run):
    _train(alignctl, sft_run, "recipe=sft", "recipe.max_steps=20", "recipe.eval_every=0")
    lines = _train(alignctl, tmp_path / "rm", "recipe=reward", f"inputs.init={sft_run}", "recipe.max_steps=8", "recipe.eval_every=4")
    train = [line for line in lines if "loss" in line]
    evals = [line for line in lines if "eval_accuracy" in line]
    assert [line["step"] for line in train] == list(range(1, 9))
    assert all(math.isfinite(line["loss"]) and 0 <= line["accuracy"] <= 1 for line in train)
    assert [e["step"] for e in evals] == [0, 4, 8]
    lineage = json.loads((tmp_path / "rm" / "lineage.json").read_text())
    assert lineage["stage"] == "reward" and lineage["status"] == "finished"
    assert lineage["parents"]["init"]["stage"] == "sft"

    # Plain transformers, no alignctl: the checkpoint is a one-label sequence classifier that scores text.
    script = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        path = {str(tmp_path / "rm" / "checkpoint")!r}
        model = AutoModelForSequenceClassification.from_pretrained(path)
        tok = AutoTokenizer.from_pretrained(path)
        batch = tok(["123+456=0579</s>", "123+456=0589</s>"], return_tensors="pt", padding=True)
        scores = model(**batch).logits
        assert scores.shape == (2, 1) and torch.isfinite(scores).all()
        assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id
        assert "alignctl" not in sys.modules
        print("ok")
    """)
    result = run_cmd([sys.executable, "-c", script])
    assert result.returncode == 0 and "ok" in result.stdout, result.describe()


def test_reward_model_with_lora_trains_the_head_in_full(alignctl, tmp_path):
    _train(alignctl, tmp_path / "rm", "recipe=reward", "adapter=lora", "recipe.max_steps=3", "recipe.eval_every=0")
    checkpoint = tmp_path / "rm" / "checkpoint"
    config = json.loads((checkpoint / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS"
    from safetensors.torch import load_file

    names = load_file(str(checkpoint / "adapter_model.safetensors")).keys()
    assert any("score" in name for name in names), names  # the new head is saved, not left random
    assert any("lora_A" in name for name in names)
