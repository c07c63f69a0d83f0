"""A short SFT run (full weights and LoRA) through the real CLI, then its checkpoint loaded by plain
transformers / peft in a process that never imports alignctl, and the run directory's layout."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from alignctl.core import allocator
from tests.integration.conftest import run_cli

STEPS = 3
ADAPTERS = ["none", "lora"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """One finished run directory per adapter (trained once for the whole module)."""
    root = tmp_path_factory.mktemp("sft_runs")
    found = {}
    for adapter in ADAPTERS:
        run_dir = root / adapter
        result = run_cli(
            [
                "train", "recipe=sft", f"adapter={adapter}",
                f"recipe.max_steps={STEPS}", "recipe.eval_every=0", "data.eval_limit=20", f"hydra.run.dir={run_dir}",
            ],
            cwd=root,
        )
        assert result.returncode == 0, result.describe()
        assert "Traceback" not in result.output, result.describe()
        found[adapter] = run_dir
    return found


LOADER = r"""
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import AutoPeftModelForCausalLM

report = {}
for kind, path in json.loads(sys.argv[1]).items():
    tokenizer = AutoTokenizer.from_pretrained(path)
    loader = AutoPeftModelForCausalLM if kind == "lora" else AutoModelForCausalLM
    model = loader.from_pretrained(path).eval()
    inputs = tokenizer("12+34=", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    new = out[0, inputs["input_ids"].shape[1]:]
    state = torch.load(f"{path}/trainer_state.pt", map_location="cpu", weights_only=True)
    report[kind] = {
        "model_class": type(model).__name__,
        "new_tokens": int(new.numel()),
        "text": tokenizer.decode(new, skip_special_tokens=True),
        "state_keys": sorted(state),
        "state_step": int(state["step"]),
    }
assert "alignctl" not in sys.modules, "the checkpoint loader imported alignctl"
print("REPORT " + json.dumps(report))
"""


def test_checkpoints_load_without_alignctl(runs, tmp_path, run_cmd):
    paths = {adapter: str(run_dir / "checkpoint") for adapter, run_dir in runs.items()}
    # A neutral cwd and no PYTHONPATH: nothing may make alignctl importable by accident and used.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = run_cmd([sys.executable, "-c", LOADER, json.dumps(paths)], cwd=tmp_path, env=env)
    assert result.returncode == 0, result.describe()
    line = next(ln for ln in result.stdout.splitlines() if ln.startswith("REPORT "))
    report = json.loads(line[len("REPORT ") :])
    assert "Peft" in report["lora"]["model_class"]
    assert "Peft" not in report["none"]["model_class"]
    for kind in ADAPTERS:
        assert report[kind]["new_tokens"] >= 1, report[kind]
        assert isinstance(report[kind]["text"], str)
        assert report[kind]["state_step"] == STEPS
        assert {"step", "optimizer", "scheduler", "rng"} <= set(report[kind]["state_keys"])


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_run_directory_layout(runs, adapter):
    run_dir = runs[adapter]

    config = OmegaConf.load(run_dir / "config.yaml")
    assert config.recipe.max_steps == STEPS and config.adapter.kind == adapter
    assert "hydra" not in config

    lineage = json.loads((run_dir / "lineage.json").read_text())
    assert lineage["stage"] == "sft"
    assert lineage["status"] == "finished"
    assert isinstance(lineage["config_hash"], str) and len(lineage["config_hash"]) >= 8
    assert lineage["versions"].get("torch") and lineage["versions"].get("transformers")
    # the allocator the run ran under: these runs are in-process (tests/integration/conftest.py), so this
    # process's (a CLI process re-executes itself under jemalloc where installed: tests/unit/test_allocator.py)
    assert lineage["versions"]["host_allocator"] == allocator.active()
    assert "loss" in lineage["final_metrics"]

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if any(k.startswith("eval_") for k in r)]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1)), "one metrics line per optimiser step"
    assert len(train) + len(evals) == len(records)
    assert evals and evals[-1]["step"] == STEPS

    eval_json = json.loads((run_dir / "eval.json").read_text())
    assert eval_json["step"] == STEPS and "eval_loss" in eval_json

    link = run_dir / "checkpoint"
    assert link.is_symlink()
    assert os.readlink(link) == f"checkpoints/step-{STEPS:06d}"
    checkpoint = link.resolve()
    assert checkpoint == (run_dir / "checkpoints" / f"step-{STEPS:06d}").resolve()
    files = {p.name for p in checkpoint.iterdir()}
    if adapter == "lora":
        assert {"adapter_model.safetensors", "adapter_config.json"} <= files
        assert "model.safetensors" not in files
    else:
        assert {"model.safetensors", "config.json"} <= files
    assert "tokenizer_config.json" in files and ({"tokenizer.json", "vocab.json", "tokenizer.model"} & files)
    assert "trainer_state.pt" in files
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")], "temporary dirs left behind"
