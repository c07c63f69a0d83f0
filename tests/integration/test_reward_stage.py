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
    _train(alignctl, tmp_path / "rm", "recipe=reward", "adapter=lora", "recipe.extra_layers=0", "recipe.max_steps=3", "recipe.eval_every=0")
    checkpoint = tmp_path / "rm" / "checkpoint"
    config = json.loads((checkpoint / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS"
    from safetensors.torch import load_file

    names = load_file(str(checkpoint / "adapter_model.safetensors")).keys()
    assert any("score" in name for name in names), names  # the new head is saved, not left random
    assert any("lora_A" in name for name in names)


def test_extra_layers_and_lm_loss_train_and_save_a_plain_deeper_classifier(alignctl, run_cmd, tmp_path, sft_run):
    # sft_run was trained by the first test of this module (same fixture directory).
    lines = _train(alignctl, tmp_path / "rm", "recipe=reward", f"inputs.init={sft_run}", "recipe.extra_layers=2",
                   "recipe.lm_loss_coef=1.0", "recipe.max_steps=3", "recipe.eval_every=0")
    train = [line for line in lines if "loss" in line]
    assert all(math.isfinite(line["lm_loss"]) and line["lm_loss"] > 0 for line in train)
    # The (briefly) trained SFT head scores the chosen answers: its next-token loss starts below uniform (ln 104 = 4.6).
    assert train[0]["lm_loss"] < 4.0
    config = json.loads((tmp_path / "rm" / "checkpoint" / "config.json").read_text())
    assert config["num_hidden_layers"] == json.loads((sft_run / "checkpoint" / "config.json").read_text())["num_hidden_layers"] + 2
    script = textwrap.dedent(f"""
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        path = {str(tmp_path / "rm" / "checkpoint")!r}
        model, tok = AutoModelForSequenceClassification.from_pretrained(path), AutoTokenizer.from_pretrained(path)
        assert len(model.model.layers) == model.config.num_hidden_layers
        print(float(model(**tok(["123+456=0579</s>"], return_tensors="pt")).logits))
    """)
    result = run_cmd([sys.executable, "-c", script])
    assert result.returncode == 0, result.describe()


def test_lm_loss_needs_an_init_with_a_language_model_head(alignctl, tmp_path):
    first = tmp_path / "rm"
    _train(alignctl, first, "recipe=reward", "recipe.extra_layers=0", "recipe.lm_loss_coef=0", "recipe.max_steps=1", "recipe.eval_every=0")
    result = alignctl("train", "recipe=reward", f"inputs.init={first}", "recipe.max_steps=1", f"hydra.run.dir={tmp_path / 'again'}")
    assert result.returncode == 2, result.describe()
    assert "recipe.lm_loss_coef: needs an init with a language-model head" in result.stderr
    assert len(result.stderr_lines()) == 1


def test_extra_layers_refuse_an_adapter(alignctl, tmp_path):
    result = alignctl("train", "recipe=reward", "adapter=lora", "recipe.extra_layers=2", f"hydra.run.dir={tmp_path / 'rm'}")
    assert result.returncode == 2 and "recipe.extra_layers: needs adapter=none" in result.stderr, result.describe()
