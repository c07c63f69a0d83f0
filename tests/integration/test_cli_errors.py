"""Bad input through the real CLI: one line on stderr (`alignctl: error: ...`) naming the culprit and
what would be valid, exit code 2, no traceback, and nothing run (no run directory, no model loaded)."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# (overrides, strings the error line must contain: the culprit and what would be valid)
CONFIG_ERRORS = {
    "unknown key": (["recipe.lrr=1"], ["recipe.lrr", "unknown key", "recipe.lr", "batch_size"]),
    "unknown key, appended": (["+recipe.lrr=1"], ["recipe.lrr", "unknown key", "recipe.lr", "batch_size"]),
    "unknown nested key": (["model.tiny.foo=1"], ["model.tiny.foo", "hidden_size"]),
    "key of another option": (["adapter.r=8"], ["adapter.r", "adapter=lora"]),
    "unknown recipe": (["recipe=foo"], ["recipe=foo", "sft"]),
    "unknown adapter": (["adapter=bar"], ["adapter=bar", "lora", "none"]),
    "unknown top-level key": (["foo=1"], ["foo", "recipe", "adapter", "seed"]),
    "unknown top-level key, appended": (["+foo=1"], ["foo", "recipe", "seed"]),
    "lr not a number": (["recipe.lr=abc"], ["recipe.lr", "expected a number", "'abc'"]),
    "batch_size not an integer": (["recipe.batch_size=1.5"], ["recipe.batch_size", "integer", "1.5"]),
    "seed not an integer": (["seed=abc"], ["seed", "integer", "'abc'"]),
    "seed a float": (["seed=1.5"], ["seed", "integer", "1.5"]),
    "lr zero": (["recipe.lr=0"], ["recipe.lr", "> 0"]),
    "lr negative": (["recipe.lr=-1"], ["recipe.lr", "> 0", "-1"]),
    "batch_size zero": (["recipe.batch_size=0"], ["recipe.batch_size", "positive"]),
    "grad_accum zero": (["recipe.grad_accum=0"], ["recipe.grad_accum", "positive"]),
    "dpo beta zero": (["recipe=dpo", "recipe.beta=0"], ["recipe.beta", "> 0"]),
    "negative lm_head_chunk": (["recipe.lm_head_chunk=-1"], ["recipe.lm_head_chunk", ">= 0"]),
    "packing and padding_free": (["recipe.packing=true", "recipe.padding_free=true"], ["recipe.padding_free", "packing"]),
    "share_prompt and padding_free": (["recipe=dpo", "recipe.share_prompt=true", "recipe.padding_free=true"], ["recipe.padding_free", "share_prompt", "null"]),
    "grpo beta negative": (["recipe=grpo", "recipe.beta=-0.1"], ["recipe.beta", ">= 0"]),
    "unknown rollout engine": (["recipe=grpo", "recipe.rollout_engine=fast"], ["recipe.rollout_engine", "'fast'", "native", "vllm"]),
    "fsdp for a recipe that trains nothing": (["recipe=pairs", "hardware=fsdp"], ["recipe=pairs", "one process"]),
    "processes without a strategy": (["hardware.nproc=2"], ["hardware.nproc", "hardware=ddp"]),
    "lora rank zero": (["adapter=lora", "adapter.r=0"], ["adapter.r", "positive"]),
    "lora dropout too big": (["adapter=lora", "adapter.dropout=1.5"], ["adapter.dropout", "[0, 1)", "1.5"]),
    "bad scheduler": (["recipe.scheduler=foo"], ["recipe.scheduler", "'foo'", "linear", "cosine", "constant"]),
    "bad overlong": (["data.overlong=foo"], ["data.overlong", "error", "drop", "truncate"]),
    "hf model without a name": (["model=hf"], ["model.name_or_path", "model=hf"]),
    "hf data without a path": (["data=hf"], ["data.path", "data=hf"]),
    "sweep value without -m": (["recipe.lr=0.1,0.2"], ["recipe.lr=0.1,0.2", "-m"]),
    "mapping without +": (["recipe=grpo", "recipe.environment_kwargs={width: 4}"], ["recipe.environment_kwargs", "+recipe.environment_kwargs={width: 4}"]),
    "not key=value": (["recipe.lr"], ["'recipe.lr'", "key=value"]),
    "unparsable override": (["foo=bar=baz"], ["'foo=bar=baz'", "key=value"]),
    "group set to null": (["recipe=null"], ["recipe=null", "sft"]),
    "bad value in one sweep job": (["-m", "recipe.lr=0.1,-1"], ["recipe.lr", "> 0", "-1"]),
    "bad option in one sweep job": (["-m", "adapter=none,nope"], ["adapter=nope", "lora", "none"]),
    "sweep over hydra settings": (["-m", "hydra.job.chdir=true,false"], ["hydra.job.chdir"]),
    "incompatible hydra flags": (["-m", "--cfg", "job"], ["-m", "--cfg"]),
    "bad value with --cfg": (["--cfg", "job", "recipe.lr=abc"], ["recipe.lr", "'abc'"]),
}

if importlib.util.find_spec("vllm") is None:  # a machine without vLLM (this one) is told before anything runs
    CONFIG_ERRORS["vllm engine without vllm"] = (["recipe=grpo", "recipe.rollout_engine=vllm"], ["recipe.rollout_engine", "pip install vllm", "native"])


@pytest.fixture
def alignctl(alignctl):
    """This module is the CLI's contract as a user meets it: every command in a process of its own
    (the other modules run most commands in the test process, conftest.run_inprocess)."""
    return functools.partial(alignctl, inprocess=False)


def assert_one_line_error(result, *culprits: str) -> str:
    assert result.returncode == 2, result.describe()
    assert "Traceback" not in result.output, result.describe()
    lines = result.stderr_lines()
    assert len(lines) == 1, result.describe()
    line = lines[0]
    assert line.startswith("alignctl: error: "), result.describe()
    for culprit in culprits:
        assert culprit in line, f"{culprit!r} not named in: {line}"
    return line


@pytest.mark.parametrize("overrides, culprits", list(CONFIG_ERRORS.values()), ids=list(CONFIG_ERRORS))
def test_config_error_is_one_line_and_runs_nothing(alignctl, tmp_path, overrides, culprits):
    run_dir, sweep_dir = tmp_path / "run", tmp_path / "multirun"
    result = alignctl(
        "train", *overrides, f"hydra.run.dir={run_dir}", f"hydra.sweep.dir={sweep_dir}", timeout=120
    )
    assert_one_line_error(result, *culprits)
    assert not run_dir.exists() and not sweep_dir.exists(), "a config error must fail before Hydra starts a job"
    assert "sft finished" not in result.stdout


def test_unknown_subcommand(alignctl):
    line = assert_one_line_error(alignctl("trian", "recipe=sft", timeout=120), "'trian'", "train")
    assert "did you mean train" in line


def test_config_error_does_not_import_torch():
    """Config errors must fail fast: neither the CLI module nor a rejected command loads torch."""
    code = (
        "import sys\n"
        "import alignctl.cli.main\n"
        "assert 'torch' not in sys.modules, 'importing alignctl.cli.main imports torch'\n"
        "sys.argv = ['alignctl', 'train', 'recipe.lr=abc']\n"
        "try:\n"
        "    alignctl.cli.main.main()\n"
        "except SystemExit as exit:\n"
        "    assert exit.code == 2, exit.code\n"
        "else:\n"
        "    raise AssertionError('no SystemExit')\n"
        "assert 'torch' not in sys.modules, 'validating a bad config imported torch'\n"
    )
    # The system allocator: no re-execution under jemalloc, so the probe stays in this interpreter.
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env={**os.environ, "ALIGNCTL_ALLOCATOR": "system"})
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().startswith("alignctl: error: recipe.lr")


def test_config_error_is_fast(alignctl, tmp_path):
    # About a second on an idle machine; the bound is loose so a busy CI box does not flake.
    result = alignctl("train", "recipe.lr=abc", f"hydra.run.dir={tmp_path / 'run'}", timeout=120)
    assert_one_line_error(result, "recipe.lr")
    assert result.seconds < 10, f"a config error took {result.seconds:.1f}s"


# ------------------------------------------------------------------------------ runtime data errors
def assert_nothing_half_written(run_dir: Path) -> None:
    """Hydra may have created the run dir (and its .hydra/ record) but no run state may exist."""
    if not run_dir.exists():
        return
    left = sorted(p.name for p in run_dir.iterdir() if p.name != ".hydra")
    assert left == [], f"a failed run left {left} in {run_dir}"


def test_missing_data_file(alignctl, tmp_path):
    missing = tmp_path / "nonexistent.jsonl"
    run_dir = tmp_path / "run"
    result = alignctl("train", "data=hf", f"data.path={missing}", "recipe.max_steps=2", f"hydra.run.dir={run_dir}")
    assert_one_line_error(result, "data.path", str(missing))
    assert_nothing_half_written(run_dir)


def test_data_file_without_needed_columns(alignctl, tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(8)))
    run_dir = tmp_path / "run"
    result = alignctl("train", "data=hf", f"data.path={data}", "recipe.max_steps=2", f"hydra.run.dir={run_dir}")
    line = assert_one_line_error(result, str(data), "prompt/completion", "question")
    assert "found" in line
    assert_nothing_half_written(run_dir)


def test_malformed_data_file(alignctl, tmp_path):
    """datasets logs its own parse error before raising: the user must still see exactly one line."""
    data = tmp_path / "broken.jsonl"
    data.write_text('{"prompt": "1+1=", "completion": "2"}\n{"prompt": "2+2=", "completion":\n')
    run_dir = tmp_path / "run"
    result = alignctl("train", "data=hf", f"data.path={data}", "recipe.max_steps=2", f"hydra.run.dir={run_dir}")
    assert_one_line_error(result, f"{data}:2", "JSON")
    assert_nothing_half_written(run_dir)
