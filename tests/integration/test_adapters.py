"""DoRA and QLoRA through every kind of stage, `alignctl export` and `alignctl plan`, through the real CLI.

Each adapter run must finish, move its adapter off its initialisation, and leave a checkpoint that
plain peft loads. Export must give a directory that plain transformers loads, whose outputs match
the adapter model it came from; a LoRA run that starts from another LoRA run must load, on its own,
as the chain it is.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

from tests.integration.conftest import run_cli, run_process
from tests.integration.stage_runs import StageRun
from tests.integration.test_cli_errors import assert_one_line_error

QUICK = ["data.eval_limit=8", "recipe.eval_every=0"]
# An untrained model never solves the task: a graded reward (length) gives the policy a gradient.
RL = ["recipe.reward_funcs=[{_target_: alignctl.rewards.length_penalty, max_chars: 1}]", "recipe.batch_size=8", "recipe.max_steps=2"]
RUNS = {
    "sft_dora": ["recipe=sft", "adapter=dora", "recipe.max_steps=4", "recipe.lr=1e-2"],
    "sft_qlora": ["recipe=sft", "adapter=qlora", "recipe.max_steps=4", "recipe.lr=1e-2"],
    # nll_weight=0: its step-0 loss is DPO's alone (ln 2), without model=tiny's NLL term.
    "dpo_qlora": ["recipe=dpo", "adapter=qlora", "recipe.max_steps=3", "recipe.lr=1e-2", "recipe.nll_weight=0", "inputs.policy={root}/sft_qlora"],
    "kto_dora": ["recipe=kto", "adapter=dora", "recipe.max_steps=3", "recipe.lr=1e-2"],
    "reward_qlora": ["recipe=reward", "adapter=qlora", "recipe.extra_layers=0", "recipe.lm_loss_coef=0", "recipe.max_steps=3", "recipe.lr=1e-2"],
    "grpo_dora": ["recipe=grpo", "adapter=dora", *RL, "recipe.num_generations=4", "recipe.beta=0.1", "recipe.lr=1e-2"],
    "ppo_qlora": ["recipe=ppo", "adapter=qlora", *RL, "recipe.lr=1e-2"],
    # LoRA from a LoRA run: the new adapter's base is the first run's merged model
    "sft_lora": ["recipe=sft", "adapter=lora", "recipe.max_steps=4", "recipe.lr=1e-2"],
    "dpo_lora_chain": ["recipe=dpo", "adapter=lora", "recipe.max_steps=3", "recipe.lr=1e-2", "inputs.policy={root}/sft_lora"],
    "sft_full": ["recipe=sft", "recipe.max_steps=2"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, StageRun]:
    root = tmp_path_factory.mktemp("adapters")
    done = {}
    for name, args in RUNS.items():  # in order: a chained run comes after its parent
        args = [a.replace("{root}", str(root)) for a in args]
        result = run_cli(["train", *args, *QUICK, f"hydra.run.dir={root / name}"], cwd=root)
        done[name] = StageRun(name, root / name, result)
    return done


def adapter_weights(run: StageRun) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run.dir / "checkpoint" / "adapter_model.safetensors"))


@pytest.mark.parametrize("name", [n for n in RUNS if "qlora" in n or "dora" in n])
def test_each_adapter_trains_every_kind_of_stage(runs, name):
    run = runs[name]
    run.assert_finished()
    weights = adapter_weights(run)
    lora_b = [w for key, w in weights.items() if "lora_B" in key]
    assert lora_b and any(float(w.abs().sum()) > 0 for w in lora_b), "B starts at zero: it must have trained"
    if "dora" in name:
        assert any("lora_magnitude_vector" in key for key in weights), "DoRA trains a magnitude vector"
    config = json.loads((run.dir / "checkpoint" / "adapter_config.json").read_text())
    assert config["use_dora"] == ("dora" in name)


def test_qlora_reference_is_the_disabled_adapter_over_the_same_4bit_base(runs):
    run = runs["dpo_qlora"]
    run.assert_finished()
    assert "reference adapter_disabled" in run.flat_output
    # At step 0 the adapter is the identity (B = 0): policy and reference agree, so the DPO loss is ln 2.
    step0 = next(r for r in run.records() if r["step"] == 0 and "eval_loss" in r)
    assert step0["eval_loss"] == pytest.approx(0.6931, abs=1e-3)


def test_adapter_checkpoints_load_with_plain_peft(runs, tmp_path):
    code = (
        "import sys\n"
        "from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification\n"
        "for path in sys.argv[1:]:\n"
        "    cls = AutoPeftModelForSequenceClassification if 'reward' in path else AutoPeftModelForCausalLM\n"
        "    model = cls.from_pretrained(path, **({'num_labels': 1} if 'reward' in path else {}))\n"
        "    assert 'alignctl' not in sys.modules\n"
        "print('ok')\n"
    )
    paths = [str(runs[n].dir / "checkpoint") for n in ("sft_dora", "sft_qlora", "reward_qlora", "ppo_qlora")]
    done = run_process([sys.executable, "-c", code, *paths], cwd=tmp_path)
    assert done.returncode == 0 and "ok" in done.stdout, done.describe()


def test_a_lora_run_from_a_lora_run_loads_as_the_chain(runs):
    """The second adapter trained on the first run's merged model: plain peft must load that base."""
    from peft import AutoPeftModelForCausalLM, PeftModel

    chain = runs["dpo_lora_chain"]
    chain.assert_finished()
    config = json.loads((chain.dir / "checkpoint" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((chain.dir / "base_model").resolve())
    plain = AutoPeftModelForCausalLM.from_pretrained(chain.dir / "checkpoint").eval()
    first = AutoPeftModelForCausalLM.from_pretrained(runs["sft_lora"].dir / "checkpoint").merge_and_unload()
    by_hand = PeftModel.from_pretrained(first, chain.dir / "checkpoint").eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, by_hand(input_ids=ids).logits, atol=1e-6)


# ---------------------------------------------------------------------------------------- export
def export(*args: str, cwd: Path):
    return run_cli(["export", *args], cwd=cwd)


@pytest.mark.parametrize("name", ["dpo_lora_chain", "sft_qlora", "sft_dora", "reward_qlora"])
def test_merged_export_loads_in_plain_transformers_and_matches(runs, tmp_path, name):
    out = tmp_path / "merged"
    result = export(f"run={runs[name].dir}", f"out={out}", "merge=true", cwd=tmp_path)
    assert result.returncode == 0, result.describe()
    record = json.loads((out / "alignctl_export.json").read_text())
    assert record["relative_difference"] <= record["tolerance"] == 1e-4
    assert not (out / "adapter_config.json").exists() and (out / "model.safetensors").exists()
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config, "a merged QLoRA model is saved dequantised"
    from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from alignctl.models.loading import keep_4bit_trainable

    seq_cls = name.startswith("reward")
    merged = (AutoModelForSequenceClassification if seq_cls else AutoModelForCausalLM).from_pretrained(out).eval()
    # Plain peft loads the model that trained (for QLoRA: the 4-bit base the checkpoint names), and
    # the merged export is that model.
    adapter_model = (AutoPeftModelForSequenceClassification if seq_cls else AutoPeftModelForCausalLM).from_pretrained(
        runs[name].dir / "checkpoint").eval()
    if "qlora" in name:
        assert "quantization_config" in json.loads((Path(record["base"]) / "config.json").read_text())
        keep_4bit_trainable(adapter_model)  # off bitsandbytes' bf16 CPU inference kernel: compared in float32
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, adapter_model(input_ids=ids).logits, atol=1e-5)


def test_adapter_only_export_drops_the_trainer_state(runs, tmp_path):
    out = tmp_path / "adapter"
    assert export(f"run={runs['sft_dora'].dir}", f"out={out}", cwd=tmp_path).returncode == 0
    assert (out / "adapter_model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert not (out / "trainer_state.pt").exists()


def test_export_bad_input(runs, tmp_path):
    full = runs["sft_full"]
    line = assert_one_line_error(export(f"run={full.dir}", f"out={tmp_path / 'x'}", "merge=true", cwd=tmp_path), "no adapter", "merge=false")
    assert str(full.dir) in line
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    assert_one_line_error(export(f"run={runs['sft_dora'].dir}", f"out={taken}", cwd=tmp_path), f"out={taken}", "not empty")
    assert (taken / "keep.txt").read_text() == "mine"
    assert_one_line_error(export(f"run={tmp_path}", f"out={tmp_path / 'y'}", cwd=tmp_path), "not an alignctl run directory")
    assert_one_line_error(export(f"run={full.dir}", cwd=tmp_path), "out=<dir>")
    assert_one_line_error(export(f"run={full.dir}", f"out={tmp_path / 'z'}", "merge=maybe", cwd=tmp_path), "merge", "true or false")


# ------------------------------------------------------------------------------------------ plan
def test_plan_counts_match_the_trained_runs(runs, tmp_path):
    for name, adapter in (("sft_dora", "dora"), ("sft_qlora", "qlora"), ("sft_full", "none")):
        result = run_cli(["plan", "recipe=sft", f"adapter={adapter}"], cwd=tmp_path, env={"COLUMNS": "200"})
        assert result.returncode == 0, result.describe()
        trained = re.search(r"([\d,]+) of ([\d,]+) parameters", runs[name].flat_output)
        row = next(line for line in result.stdout.splitlines() if "policy (trained)" in line)
        cells = [c.strip() for c in row.split("│") if c.strip()]
        assert cells[1] == trained.group(2), (row, trained.group(0))
        assert cells[2].split()[0] == trained.group(1), (row, trained.group(0))
        assert "batch arithmetic" in result.stdout and "global batch" in result.stdout


def test_plan_lists_every_model_a_recipe_holds(tmp_path):
    result = run_cli(["plan", "recipe=ppo", "adapter=lora"], cwd=tmp_path, env={"COLUMNS": "200"})
    assert result.returncode == 0, result.describe()
    assert "policy (trained)" in result.stdout and "value (adapter on the policy's base)" in result.stdout
    assert "prompts per rollout" in result.stdout
    full = run_cli(["plan", "recipe=dpo"], cwd=tmp_path, env={"COLUMNS": "200"})
    assert "reference (separate copy)" in full.stdout


def test_plan_json_gives_the_same_figures_to_scripts(tmp_path):
    import json

    result = run_process([sys.executable, "-m", "alignctl", "plan", "recipe=ppo", "adapter=lora", "--json"], cwd=tmp_path)
    assert result.returncode == 0, result.describe()
    plan = json.loads(result.stdout)  # nothing but the JSON on stdout
    assert [m["model"] for m in plan["models"]] == ["policy (trained)", "value (adapter on the policy's base)"]
    assert plan["models"][0]["trainable"] < plan["models"][0]["params"]
    assert plan["peak"]["total"] >= plan["peak"]["models"] >= sum(m["peak"] for m in plan["models"])
    assert "prompts per rollout" in plan["batch"] and plan["activations_shape"]["rows"] > 0


def test_plan_bad_input_is_one_line(tmp_path):
    result = run_cli(["plan", "adapter=lora", "adapter.r=0"], cwd=tmp_path)
    assert_one_line_error(result, "adapter.r", "positive")
    assert_one_line_error(run_cli(["plan", "adapter=lora", "adapter.target_modules=[nope]"], cwd=tmp_path),
                          "nope")


@pytest.mark.parametrize("name", ["sft_qlora", "sft_lora"])
def test_the_console_carries_only_alignctl_words_offline(runs, name):
    """bitsandbytes, imported by a quantised run only, looks for a hub kernel on import; offline, the
    `kernels` package logs a skipped trust check. None of that reaches the user's stderr."""
    run = runs[name]
    run.assert_finished()
    for chatter in ("kernels-community", "publisher trust", "gemm_4bit"):
        assert chatter not in run.result.stderr, run.result.describe()
