"""Faults of resources, in process: an adapter rank the model's matrices cannot hold, a run whose
memory estimate is clearly above what the machine has free, a reward function that never returns,
a disk that fills up during a save. And the one helper that shows a value in a message."""

from __future__ import annotations

import errno
import os
import time
from enum import Enum
from pathlib import Path

import pytest
import torch

from alignctl.cli import memory_check, plan
from alignctl.cli.app import compose_config
from alignctl.cli.plan_data import widest_possible
from alignctl.config.validation import validate
from alignctl.core.console import size
from alignctl.core.errors import AdapterError, DiskFull, shown
from alignctl.models.adapters import check_rank
from alignctl.rl.reward_sources import RewardError, function_sources
from alignctl.train.checkpoint import save_checkpoint


# ------------------------------------------------------------------------------------- rank
@pytest.fixture(scope="module")
def narrow_kv():
    """A meta-device Llama whose k_proj and v_proj are 64 -> 16 (one key/value head of 16)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=50, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, intermediate_size=128)
    with torch.device("meta"):
        return LlamaForCausalLM(config)


def test_a_rank_above_the_narrowest_adapted_matrix_names_it(narrow_kv):
    check_rank(narrow_kv, "all-linear", 16)
    with pytest.raises(AdapterError) as caught:
        check_rank(narrow_kv, "all-linear", 17)
    message = str(caught.value)
    assert message.startswith("adapter.r: 17") and "k_proj (64 in, 16 out)" in message and "valid: 1 to 16" in message, message


def test_the_rank_limit_follows_the_target_modules(narrow_kv):
    check_rank(narrow_kv, ["q_proj", "up_proj"], 64)  # k_proj and v_proj are not adapted: 64 fits
    with pytest.raises(AdapterError, match=r"q_proj \(64 in, 64 out\).*valid: 1 to 64"):
        check_rank(narrow_kv, ["q_proj", "up_proj"], 65)


# ----------------------------------------------------------------------------------- memory
@pytest.fixture(autouse=True)
def steady_process(monkeypatch):
    """The process's own resident set, which the CPU estimate counts, held still (it grows as tests run)."""
    monkeypatch.setattr(plan.memory, "process_bytes", lambda: 300 * 2**20)


def run_config(tiny_dir, *overrides: str):
    cfg = validate(compose_config(["model=hf", f"model.name_or_path={tiny_dir}", "hardware=cpu", *overrides]))
    plan.settle_for_plan(cfg)
    return cfg


def peak(cfg, shape_of) -> float:
    return plan.peak(plan.recipe_models(cfg, shape_of), "cpu").total


def free_memory(monkeypatch, amount: float) -> None:
    monkeypatch.setattr(memory_check, "available_memory", lambda device: (amount, "test"))


def test_a_run_that_fits_starts_and_one_clearly_too_big_is_refused_with_knobs(tiny_dir, monkeypatch):
    cfg = run_config(tiny_dir, "adapter=none")
    need = peak(cfg, plan.batch_shape)
    free_memory(monkeypatch, need)
    memory_check.check_memory(cfg)
    free_memory(monkeypatch, need / memory_check.MARGIN * 1.01)  # the estimate just inside the margin: it still starts
    memory_check.check_memory(cfg)
    free_memory(monkeypatch, need / 2)
    with pytest.raises(memory_check.NotEnoughMemory) as caught:
        memory_check.check_memory(cfg)
    message = str(caught.value)
    assert "not enough memory" in message and "available (test)" in message and f"{size(need / 2)} available" in message, message
    for knob in ("recipe.batch_size", "recipe.max_length", "hardware.gradient_checkpointing=true", "adapter=lora", "hardware.memory_check=false"):
        assert knob in message, (knob, message)


def test_the_data_sized_estimate_decides_when_the_quick_bound_does_not_fit(tiny_dir, monkeypatch):
    monkeypatch.setattr(plan.memory, "process_bytes", lambda: 0.0)
    cfg = run_config(tiny_dir, "adapter=lora", "recipe.max_length=128", "recipe.batch_size=64")
    bound, real = peak(cfg, widest_possible), peak(cfg, plan.batch_shape)
    assert bound > 1.5 * real  # the built-in task's rows are far shorter than recipe.max_length
    free_memory(monkeypatch, (bound + real) / 2 / memory_check.MARGIN)
    memory_check.check_memory(cfg)  # the bound alone would have refused a run that fits


def test_memory_check_false_skips_the_check(tiny_dir, monkeypatch):
    free_memory(monkeypatch, 1.0)
    memory_check.check_memory(run_config(tiny_dir, "hardware.memory_check=false"))
    with pytest.raises(memory_check.NotEnoughMemory):
        memory_check.check_memory(run_config(tiny_dir))
    with pytest.raises(AdapterError, match="adapter.r: 200"):  # the adapter is still checked against the model
        memory_check.check_memory(run_config(tiny_dir, "adapter=lora", "adapter.r=200", "hardware.memory_check=false"))


def test_available_memory_on_this_cpu_is_a_plausible_figure():
    free, where = memory_check.available_memory("cpu")
    assert 2**26 < free < 2**50 and ("MemAvailable" in where or "cgroup" in where), (free, where)


# ---------------------------------------------------------------------------------- rewards
SLOW_REWARDS = """
import time

def never_returns(prompts, completions, **kwargs):
    time.sleep(3600)

def quick(prompts, completions, **kwargs):
    return [1.0] * len(completions)

def grad_mode(prompts, completions, **kwargs):
    import torch
    return [float(torch.is_grad_enabled())] * len(completions)

def raises(prompts, completions, **kwargs):
    raise RuntimeError("boom")
"""


@pytest.fixture
def slow(module_from_source):
    return module_from_source("slow_rewards", SLOW_REWARDS)


def test_a_reward_function_that_never_returns_stops_after_the_timeout(slow):
    (source,) = function_sources([f"{slow}.never_returns"], None, timeout=0.3)
    start = time.monotonic()
    with pytest.raises(RewardError) as caught:
        source.score(["p"], ["c"], {})
    assert time.monotonic() - start < 5
    assert f"reward function {slow}.never_returns did not return within recipe.reward_timeout=0.3 seconds" in str(caught.value)


def test_a_timeout_leaves_working_and_failing_functions_as_they_were(slow):
    quick, failing = function_sources([f"{slow}.quick", f"{slow}.raises"], None, timeout=5)
    assert quick.score(["p", "p"], ["a", "b"], {}).tolist() == [1.0, 1.0]
    with pytest.raises(RewardError, match=f"reward function {slow}.raises raised RuntimeError: boom"):
        failing.score(["p"], ["a"], {})
    (grad_mode,) = function_sources([f"{slow}.grad_mode"], None, timeout=5)
    with torch.no_grad():  # as rollouts are scored: the function's own thread sees the caller's mode
        assert grad_mode.score(["p"], ["a"], {}).tolist() == [0.0]
    assert grad_mode.score(["p"], ["a"], {}).tolist() == [1.0]


# ------------------------------------------------------------------------------- disk full
@pytest.fixture
def tiny_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))


def save(run_dir: Path, step: int, model, tok) -> Path:
    return save_checkpoint(run_dir, step, model, tok, {"step": step}, {"stage": "sft"}, keep_last=3)


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)),
                                     RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on device\" })")],
                         ids=["ENOSPC", "EDQUOT", "safetensors"])
def test_a_disk_full_save_keeps_the_previous_checkpoint_linked_and_leaves_no_partial_one(tmp_path, tiny_lm, tok, monkeypatch, failure):
    first = save(tmp_path, 1, tiny_lm, tok)
    before = files_of(first)

    def fills_the_disk(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"\0" * 1000)  # part of the file made it to disk
        raise failure

    monkeypatch.setattr(torch, "save", fills_the_disk)
    with pytest.raises(DiskFull) as caught:
        save(tmp_path, 2, tiny_lm, tok)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{tmp_path / 'checkpoints'}: disk full while saving the checkpoint of step 2"), message
    assert "step-000001 is intact" in message and f"resume with: alignctl train resume={tmp_path}" in message, message
    assert "a checkpoint needs about" in message
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000001"]  # no .tmp-step-*
    assert (tmp_path / "checkpoint").resolve() == first.resolve() and files_of(first) == before


def test_another_failure_during_a_save_removes_the_partial_directory_and_is_raised_as_it_was(tmp_path, tiny_lm, tok, monkeypatch):
    def breaks(obj, path, *args, **kwargs):
        raise ValueError("not a disk problem")

    monkeypatch.setattr(torch, "save", breaks)
    with pytest.raises(ValueError, match="not a disk problem"):
        save(tmp_path, 1, tiny_lm, tok)
    assert list((tmp_path / "checkpoints").iterdir()) == [] and not (tmp_path / "checkpoint").exists()


@pytest.fixture
def signal_handlers():
    """`reported` installs alignctl's SIGINT/SIGTERM handlers: put pytest's back afterwards."""
    import signal

    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def test_a_full_disk_anywhere_else_is_one_line_naming_the_file(capsys, signal_handlers):
    from alignctl.cli.exits import reported

    with pytest.raises(SystemExit) as caught, reported():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/runs/x/metrics.jsonl")
    assert caught.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("alignctl: error: /runs/x/metrics.jsonl: no space left on device"), lines
    with pytest.raises(PermissionError), reported():  # other OS errors are not disguised as a full disk
        raise PermissionError(errno.EACCES, "Permission denied", "/runs/x")


# ------------------------------------------------------------------------------------ shown
class Color(str, Enum):
    red = "red"


@pytest.mark.parametrize("value, yaml_form, command_line", [
    (None, "null", "null"), (True, "true", "true"), (1.5, "1.5", "1.5"), ("abc", "'abc'", "abc"), (Color.red, "'red'", "red"),
    ({"a": "x", "b": None}, "{a: 'x', b: null}", "{a: x, b: null}"), ([1, 2], "[1, 2]", "[1, 2]"),
])
def test_shown_writes_a_value_as_a_user_would_type_it(value, yaml_form, command_line):
    assert shown(value) == yaml_form
    assert shown(value, quote_strings=False) == command_line
