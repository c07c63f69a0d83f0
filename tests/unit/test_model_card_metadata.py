"""The model card's metadata from hand-made run directories: the base model is the chain's first
run's model, a hub dataset id is linked while a local file is not, a reward model is a classifier."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from alignctl.runs.model_card import ancestry, card_text


def _run(path: Path, stage: str, config: dict, parents: dict | None = None, metrics: dict | None = None) -> Path:
    path.mkdir(parents=True)
    lineage = {"stage": stage, "status": "finished", "run_dir": str(path), "parents": parents or {},
               "data_fingerprint": "abc123", "final_metrics": metrics or {}, "config_hash": "h", "git_sha": None, "versions": {}}
    (path / "lineage.json").write_text(json.dumps(lineage))
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    return path


def _meta(text: str) -> dict:
    return yaml.safe_load(text.split("---\n", 2)[1])


def test_the_base_model_and_the_chain_come_from_the_first_run(tmp_path):
    hub_model = {"source": "hf", "name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"}
    sft = _run(tmp_path / "sft", "sft", {"model": hub_model, "data": {"path": "trl-lib/Capybara"}, "adapter": {"kind": "none"}},
               metrics={"eval_loss": 1.25})
    reward = _run(tmp_path / "rm", "reward", {"model": hub_model, "data": {"path": str(tmp_path)}, "adapter": {"kind": "none"}},
                  parents={"init": {"run_dir": str(sft)}})
    ppo = _run(tmp_path / "ppo", "ppo", {"model": hub_model, "data": {"path": "./prompts.jsonl"}, "adapter": {"kind": "lora", "r": 16}},
               parents={"reward": {"run_dir": str(reward)}, "policy": {"run_dir": str(sft)}})
    assert [(link["stage"], link["role"]) for link in ancestry(ppo)] == [("ppo", None), ("sft", "policy")]  # the policy's line, not the reward's
    meta = _meta(card_text(ppo))
    assert meta == {"library_name": "peft", "pipeline_tag": "text-generation", "tags": ["alignctl", "ppo", "lora"],
                    "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct"}  # a local data file is not a hub dataset
    assert _meta(card_text(sft))["datasets"] == ["trl-lib/Capybara"]
    assert _meta(card_text(reward))["pipeline_tag"] == "text-classification"
    assert "| eval_loss | 1.25 |" in card_text(sft)


def test_a_missing_parent_does_not_stop_the_card(tmp_path):
    run = _run(tmp_path / "dpo", "dpo", {"model": {"source": "tiny"}, "adapter": {"kind": "none"}},
               parents={"policy": {"run_dir": str(tmp_path / "gone")}})
    text = card_text(run)
    assert "base_model" not in _meta(text)  # the built-in tiny model is not on the hub
    assert f"| `{tmp_path / 'gone'}` | ? | inputs.policy |" in text
