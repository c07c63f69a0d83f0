"""The SFT stage end to end through the real CLI: what full fine-tuning and LoRA change on disk,
gradient accumulation, metrics.jsonl, checkpoints, TensorBoard, data formats, packing, sweeps,
determinism and overlong prompts.

Every run is a real `alignctl train ...` of a few optimiser steps, in the test process (conftest's
run_cli: a fresh interpreter would spend most of a run's time importing torch, transformers, peft
and datasets), mostly on small arithmetic datasets written to a temporary directory. The module runs
the runs its selected tests need up front, one after the other, and each test reads the runs it
inspects. A run's failure is reported by the tests that use it.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from stage_runs import StageRun

from tests.integration.conftest import run_cli

MAX_LENGTH = 16  # recipe.max_length of recipe=sft; the overlong rows below are longer
TRAIN_KEYS = {"loss", "learning_rate", "grad_norm", "tokens_per_second", "mean_token_accuracy", "num_tokens"}

QUICK = ["recipe.eval_every=0", "data.eval_limit=16"]


def hf(path: str) -> list[str]:
    return ["data=hf", f"data.path={{root}}/{path}"]


# name -> overrides of `alignctl train` ({root} is the module's scratch directory), run in this order.
JOBS: dict[str, list[str]] = {
    "metrics": [  # built-in task: the only data with an exact-match verifier
        "recipe.max_steps=4", "recipe.eval_every=2", "data.eval_limit=16", "recipe.batch_size=16",
        "recipe.scheduler=linear", "recipe.warmup_ratio=0.5", "logger=tensorboard",
    ],
    "sweep": [
        "-m", "recipe.max_steps=2", "recipe.lr=1e-3,2e-3", "recipe.batch_size=8", *QUICK, *hf("sums64.jsonl"),
        "hydra.sweep.dir={root}/runs/sweep",
    ],
    "full": ["recipe.max_steps=3", "recipe.batch_size=16", "recipe.grad_accum=1", "seed=0", *QUICK, *hf("sums64.jsonl")],
    "full_again": ["recipe.max_steps=3", "recipe.batch_size=16", "recipe.grad_accum=1", "seed=0", *QUICK, *hf("sums64.jsonl")],
    "full_seed1": ["recipe.max_steps=3", "recipe.batch_size=16", "recipe.grad_accum=1", "seed=1", *QUICK, *hf("sums64.jsonl")],
    "accum_64": ["recipe.max_steps=3", "recipe.batch_size=8", "recipe.grad_accum=2", "seed=0", *QUICK, *hf("sums64.jsonl")],
    "accum_16_ga1": ["recipe.max_steps=3", "recipe.batch_size=16", "recipe.grad_accum=1", "seed=0", *QUICK, *hf("sums16.jsonl")],
    "accum_16_ga2": ["recipe.max_steps=3", "recipe.batch_size=8", "recipe.grad_accum=2", "seed=0", *QUICK, *hf("sums16.jsonl")],
    "lora": [
        "adapter=lora", "adapter.r=4", "adapter.alpha=8", "recipe.max_steps=3", "recipe.batch_size=16", *QUICK,
        *hf("sums64.jsonl"),
    ],
    "save": [
        "recipe.max_steps=6", "recipe.save_every=2", "recipe.keep_last=2", "recipe.batch_size=8", *QUICK,
        *hf("sums64.jsonl"),
    ],
    "messages": ["recipe.max_steps=2", "recipe.batch_size=8", *QUICK, *hf("messages.jsonl")],
    "csv": ["recipe.max_steps=2", "recipe.batch_size=8", *QUICK, *hf("sums.csv")],
    "disk": ["recipe.max_steps=2", "recipe.batch_size=8", *QUICK, *hf("saved"), "data.eval_split=test"],
    "packing": ["recipe.packing=true", "recipe.max_steps=3", "recipe.batch_size=8", *QUICK, *hf("fixed64.jsonl")],
    "overlong_error": ["recipe.max_steps=2", "recipe.batch_size=8", *QUICK, *hf("overlong.jsonl")],
    "overlong_drop": ["recipe.max_steps=2", "recipe.batch_size=8", "data.overlong=drop", *QUICK, *hf("overlong.jsonl")],
    "overlong_truncate": ["recipe.max_steps=2", "recipe.batch_size=8", "data.overlong=truncate", *QUICK, *hf("overlong.jsonl")],
    "messages_overlong": ["recipe.max_steps=2", "recipe.batch_size=8", *QUICK, *hf("messages_overlong.jsonl")],
}

# test function -> the runs it reads (only the runs of selected tests are started).
USES: dict[str, set[str]] = {
    "test_full_finetuning_changes_weights": {"full"},
    "test_metrics_without_eval_split_has_only_train_lines": {"full"},
    "test_lora_saves_only_trained_adapter": {"lora"},
    "test_grad_accum_matches_full_batch_on_same_rows": {"accum_16_ga1", "accum_16_ga2"},
    "test_grad_accum_matches_full_batch": {"full", "accum_64"},
    "test_metrics_jsonl_lines_and_lr_schedule": {"metrics"},
    "test_save_every_keep_last": {"save"},
    "test_tensorboard_event_files": {"metrics"},
    "test_data_formats": {"full", "messages", "csv", "disk"},
    "test_packing": {"packing"},
    "test_multirun_sweep": {"sweep"},
    "test_same_seed_same_losses_other_seed_other_order": {"full", "full_again", "full_seed1"},
    "test_overlong_prompt_is_an_error_by_default": {"overlong_error"},
    "test_overlong_prompt_dropped": {"overlong_drop"},
    "test_overlong_prompt_truncated_is_counted": {"overlong_truncate"},
    "test_overlong_conversation_is_an_error_by_default": {"messages_overlong"},
}


# ------------------------------------------------------------------------------------------ data
def arithmetic_rows(n: int, seed: int, fixed_width: bool) -> list[dict[str, str]]:
    """Sums like the built-in task ("012+003=" -> "0015"), or variable width ("12+3=" -> "15") so
    rows, and hence micro-batches, carry different numbers of completion tokens."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randrange(1000), rng.randrange(1000)
        if fixed_width:
            rows.append({"prompt": f"{a:03d}+{b:03d}=", "completion": f"{a + b:04d}"})
        else:
            rows.append({"prompt": f"{a}+{b}=", "completion": f"{a + b}"})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


OVERLONG_ROW = 5  # index of the row whose prompt alone is longer than recipe.max_length


def write_datasets(root: Path) -> None:
    fixed = arithmetic_rows(64, seed=1, fixed_width=True)
    write_jsonl(root / "sums64.jsonl", arithmetic_rows(64, seed=0, fixed_width=False))
    write_jsonl(root / "sums16.jsonl", arithmetic_rows(16, seed=2, fixed_width=False))
    write_jsonl(root / "fixed64.jsonl", fixed)
    write_jsonl(
        root / "messages.jsonl",
        [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]} for r in fixed],
    )
    with (root / "sums.csv").open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=["prompt", "completion"])
        writer.writeheader()
        writer.writerows(fixed)  # completions such as "0471": must stay strings, not become 471

    from datasets import Dataset, DatasetDict

    DatasetDict(train=Dataset.from_list(fixed[:48]), test=Dataset.from_list(fixed[48:])).save_to_disk(str(root / "saved"))

    overlong = [dict(r) for r in fixed]
    overlong[OVERLONG_ROW]["prompt"] = overlong[OVERLONG_ROW]["prompt"] * 3  # 24 characters > 16 tokens
    assert len(overlong[OVERLONG_ROW]["prompt"]) > MAX_LENGTH
    write_jsonl(root / "overlong.jsonl", overlong)
    write_jsonl(
        root / "messages_overlong.jsonl",
        [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]} for r in overlong],
    )


# ------------------------------------------------------------------------------------------ runs
@dataclass
class Run(StageRun):

    def losses(self) -> list[float]:
        return [r["loss"] for r in self.train_records()]

    def config(self):
        return OmegaConf.load(self.dir / "config.yaml")

    def train_rows(self) -> int:
        """Rows the stage reports training on (after dropping and packing)."""
        found = re.search(r"sft: (\d+) train rows", self.flat_output)
        assert found, self.result.describe()
        return int(found.group(1))


class Runs:
    """Runs the needed runs up front, in JOBS order; `runs[name]` returns one (running it if it was
    not among them)."""

    def __init__(self, root: Path, needed: set[str]):
        self.root = root
        self.done: dict[str, Run] = {}
        for name in JOBS:
            if name in needed:
                self[name]

    def _run(self, name: str) -> Run:
        run_dir = self.root / "runs" / name
        args = [a.format(root=self.root) for a in JOBS[name]]
        if "-m" not in args:
            args.append(f"hydra.run.dir={run_dir}")
        result = run_cli(["train", *args], cwd=self.root)
        return Run(name, run_dir, result)

    def __getitem__(self, name: str) -> Run:
        if name not in self.done:
            self.done[name] = self._run(name)
        return self.done[name]


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory, offline_env) -> Runs:
    root = tmp_path_factory.mktemp("sft_stage")
    write_datasets(root)
    selected = [item for item in request.session.items if getattr(item, "module", None) is request.module]
    needed = set().union(*(USES.get(getattr(item, "originalname", item.name), set()) for item in selected))
    return Runs(root, needed)


def tiny_model_dir(run: Run) -> Path:
    """The tiny model the run started from, located from the run's own config.yaml (built already:
    the session shares one ALIGNCTL_CACHE, so this only computes the cache path)."""
    from alignctl.config.schema import TinyModelConfig
    from alignctl.models.loading import build_tiny

    tiny = build_tiny(TinyModelConfig(**OmegaConf.to_container(run.config().model.tiny)))
    # The run printed the model it loaded (possibly folded over several lines by rich).
    assert str(tiny) in re.sub(r"\s+", "", run.result.output), run.result.describe()
    return tiny


def load_state(checkpoint: Path) -> dict:
    import torch

    return torch.load(checkpoint / "trainer_state.pt", map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------------------- tests
def test_full_finetuning_changes_weights(runs):
    import torch
    from safetensors.torch import load_file

    run = runs["full"]
    run.assert_finished()
    losses = run.losses()
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses), losses

    initial = load_file(tiny_model_dir(run) / "model.safetensors")
    trained = load_file(run.dir / "checkpoint" / "model.safetensors")
    assert set(trained) == set(initial)
    matrices = [k for k, v in initial.items() if v.ndim >= 2]
    assert len(matrices) >= 7 * 6, matrices  # q, k, v, o, gate, up, down per layer (+ embeddings)
    unchanged = [k for k in matrices if torch.equal(initial[k], trained[k])]
    assert not unchanged, f"full fine-tuning left these matrices untouched: {unchanged}"
    assert all(torch.isfinite(v).all() for v in trained.values())


def test_metrics_without_eval_split_has_only_train_lines(runs):
    run = runs["full"]
    run.assert_finished()
    records = run.records()
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    stray = [r for r in records if "loss" not in r and not any(k.startswith("eval_") for k in r)]
    assert not stray, f"records that are neither a train step nor an evaluation: {stray}"


def test_lora_saves_only_trained_adapter(runs):
    import torch
    from safetensors.torch import load_file

    run = runs["lora"]
    run.assert_finished()
    checkpoint = run.dir / "checkpoint"
    files = {p.name for p in checkpoint.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= files, files
    assert "model.safetensors" not in files, files

    adapter_config = json.loads((checkpoint / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and adapter_config["lora_alpha"] == 8, adapter_config
    assert Path(adapter_config["base_model_name_or_path"]).resolve() == tiny_model_dir(run).resolve()

    tensors = load_file(checkpoint / "adapter_model.safetensors")
    assert tensors and all("lora_" in k for k in tensors), [k for k in tensors if "lora_" not in k]
    lora_a = {k: v for k, v in tensors.items() if "lora_A" in k}
    lora_b = {k: v for k, v in tensors.items() if "lora_B" in k}
    assert len(lora_a) == len(lora_b) >= 7 * 6, sorted(tensors)  # all-linear: 7 projections per layer
    assert all(v.shape[0] == 4 for v in lora_a.values()) and all(v.shape[1] == 4 for v in lora_b.values())
    still_zero = [k for k, v in lora_b.items() if not torch.any(v != 0)]
    assert not still_zero, f"lora_B starts at zero and should have trained: {still_zero}"

    # The base weights are not in the checkpoint, and they were never trained: the optimiser holds
    # state for exactly the adapter's tensors (every one of rank-4 shape), nothing else.
    state = load_state(checkpoint)
    shapes = sorted(tuple(s["exp_avg"].shape) for s in state["optimizer"]["state"].values())
    assert shapes == sorted(tuple(v.shape) for v in tensors.values())


def test_grad_accum_matches_full_batch_on_same_rows(runs):
    """With 16 rows every step sees all of them in both set-ups, so only the loop's normalisation is
    tested: micro-batches carry different numbers of completion tokens (variable-width sums, grouped
    by length), so averaging per micro-batch instead of over the whole step would show."""
    whole, accumulated = runs["accum_16_ga1"], runs["accum_16_ga2"]
    whole.assert_finished()
    accumulated.assert_finished()
    a, b = whole.train_records(), accumulated.train_records()
    assert [r["num_tokens"] for r in a] == [r["num_tokens"] for r in b]
    assert len(a) == len(b) == 3
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], abs=1e-5, rel=0)


def test_grad_accum_matches_full_batch(runs):
    whole, accumulated = runs["full"], runs["accum_64"]
    whole.assert_finished()
    accumulated.assert_finished()
    a, b = whole.train_records(), accumulated.train_records()
    assert len(a) == len(b) == 3
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], abs=1e-5, rel=0)


def test_metrics_jsonl_lines_and_lr_schedule(runs):
    run = runs["metrics"]
    run.assert_finished()
    records = run.records()
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if any(k.startswith("eval_") for k in r)]
    assert len(train) + len(evals) == len(records), records

    assert Counter(r["step"] for r in train) == Counter([1, 2, 3, 4]), "one train line per optimiser step"
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for record in train:
        assert TRAIN_KEYS <= set(record), record
        assert all(math.isfinite(record[k]) for k in TRAIN_KEYS), record
        assert record["num_tokens"] > 0 and 0 <= record["mean_token_accuracy"] <= 1, record

    # eval_every=2 over 4 steps: at 2 and at the end, once each (a step-0 baseline is allowed).
    assert [r["step"] for r in evals if r["step"] != 0] == [2, 4], evals
    for record in evals:
        assert math.isfinite(record["eval_loss"]) and 0 <= record["eval_exact_match"] <= 1, record
    eval_json = json.loads((run.dir / "eval.json").read_text())
    assert eval_json["step"] == 4 and eval_json["eval_loss"] == pytest.approx(evals[-1]["eval_loss"])

    # Linear schedule with warmup_ratio=0.5: up for two steps, then down.
    peak = float(run.config().recipe.lr)
    lrs = [r["learning_rate"] for r in train]
    top = lrs.index(max(lrs))
    assert lrs[0] < peak, lrs
    assert 0 < top < len(lrs) - 1, f"the rate should rise then fall: {lrs}"
    assert max(lrs) == pytest.approx(peak), lrs
    assert all(x <= y for x, y in zip(lrs[:top], lrs[1 : top + 1])), lrs
    assert all(x > y for x, y in zip(lrs[top:], lrs[top + 1 :])), lrs


def test_tensorboard_event_files(runs):
    run = runs["metrics"]  # logger=tensorboard
    run.assert_finished()
    events = sorted((run.dir / "tensorboard").glob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events), list((run.dir / "tensorboard").iterdir())

    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    reader = event_accumulator.EventAccumulator(str(run.dir / "tensorboard"))
    reader.Reload()
    tags = set(reader.Tags()["scalars"])
    assert {"loss", "learning_rate", "grad_norm", "eval_loss"} <= tags, tags
    logged = [(e.step, e.value) for e in reader.Scalars("loss")]
    expected = [(r["step"], r["loss"]) for r in run.train_records()]
    assert [s for s, _ in logged] == [s for s, _ in expected]
    assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-6)
    assert [e.step for e in reader.Scalars("eval_loss") if e.step != 0] == [2, 4]


def test_save_every_keep_last(runs):
    run = runs["save"]
    run.assert_finished()
    folder = run.dir / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["step-000004", "step-000006"]
    assert os.readlink(run.dir / "checkpoint") == "checkpoints/step-000006"
    for step in (4, 6):
        checkpoint = folder / f"step-{step:06d}"
        assert (checkpoint / "model.safetensors").exists()
        state = load_state(checkpoint)
        assert {"step", "optimizer", "scheduler", "rng", "data"} <= set(state), sorted(state)
        assert state["step"] == step
        assert state["scheduler"]["last_epoch"] == step
        adam = list(state["optimizer"]["state"].values())
        assert adam and all(int(s["step"]) == step for s in adam)
        assert {"python", "numpy", "torch"} <= set(state["rng"])
        # 64 rows in batches of 8: 8 batches an epoch, `step` of them drawn so far.
        assert state["data"] == {"epoch": 0, "position": step}, state["data"]


FORMATS = {"jsonl": ("full", 64), "messages": ("messages", 64), "csv": ("csv", 64), "save_to_disk": ("disk", 48)}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_data_formats(runs, fmt):
    job, rows = FORMATS[fmt]
    run = runs[job]
    run.assert_finished()
    assert run.train_rows() == rows
    train = run.train_records()
    assert train and all(math.isfinite(r["loss"]) and r["num_tokens"] > 0 for r in train), train
    if fmt == "save_to_disk":  # data.eval_split=test: evaluated on the saved test split at the end
        eval_json = json.loads((run.dir / "eval.json").read_text())
        assert math.isfinite(eval_json["eval_loss"]), eval_json
        assert any(r.get("step") == train[-1]["step"] and "eval_loss" in r for r in run.records())


def test_packing(runs):
    run = runs["packing"]
    run.assert_finished()
    assert OmegaConf.select(run.config(), "recipe.packing") is True
    # 64 rows of 13 tokens packed into blocks of max_length=16: fewer, fuller rows.
    assert 0 < run.train_rows() < 64
    losses = run.losses()
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses), losses


def test_multirun_sweep(runs):
    run = runs["sweep"]
    assert run.result.returncode == 0, run.result.describe()
    assert "Traceback" not in run.result.output, run.result.describe()
    sweep = run.dir
    job_dirs = sorted(p.parent for p in sweep.glob("*/lineage.json"))
    assert [p.name for p in job_dirs] == ["0", "1"], list(sweep.iterdir())
    first_lrs = {}
    for job_dir, lr in zip(job_dirs, (1e-3, 2e-3)):
        assert json.loads((job_dir / "lineage.json").read_text())["status"] == "finished"
        config = OmegaConf.load(job_dir / "config.yaml")
        assert config.recipe.lr == pytest.approx(lr) and config.recipe.max_steps == 2
        job = Run(job_dir.name, job_dir, run.result)
        assert [r["step"] for r in job.train_records()] == [1, 2]
        first_lrs[lr] = job.train_records()[0]["learning_rate"]
    # Each job trained with its own rate (same schedule, twice the peak).
    assert first_lrs[2e-3] == pytest.approx(2 * first_lrs[1e-3]) and first_lrs[1e-3] > 0


def test_same_seed_same_losses_other_seed_other_order(runs):
    first, again, other = runs["full"], runs["full_again"], runs["full_seed1"]
    for run in (first, again, other):
        run.assert_finished()
    assert first.losses() == again.losses()
    assert [r["grad_norm"] for r in first.train_records()] == [r["grad_norm"] for r in again.train_records()]
    # Same model init (model.tiny.init_seed), other data order: other batches, other losses.
    assert len(other.losses()) == 3
    assert other.losses()[0] != first.losses()[0], (first.losses(), other.losses())


def test_overlong_prompt_is_an_error_by_default(runs):
    result = runs["overlong_error"].result
    assert result.returncode == 2, result.describe()
    assert "Traceback" not in result.output, result.describe()
    lines = result.stderr_lines()
    assert len(lines) == 1 and lines[0].startswith("alignctl: error: "), result.describe()
    assert "overlong.jsonl" in lines[0] and re.search(rf"\brow {OVERLONG_ROW}\b", lines[0]), lines[0]
    assert "recipe.max_length" in lines[0] and "data.overlong" in lines[0], lines[0]


def test_overlong_prompt_dropped(runs):
    run = runs["overlong_drop"]
    run.assert_finished()
    assert re.search(r"\b1 dropped\b", run.flat_output), run.result.describe()
    assert run.train_rows() == 63
    assert all(math.isfinite(x) for x in run.losses())


def test_overlong_prompt_truncated_is_counted(runs):
    """data.overlong=truncate keeps the row and says how many prompts it cut: never silent."""
    run = runs["overlong_truncate"]
    run.assert_finished()
    assert "0 rows dropped and 1 prompts truncated" in run.flat_output, run.result.describe()
    assert run.train_rows() == 64


def test_overlong_conversation_is_an_error_by_default(runs):
    result = runs["messages_overlong"].result
    assert result.returncode == 2, result.describe()
    lines = result.stderr_lines()
    assert len(lines) == 1 and re.search(rf"\brow {OVERLONG_ROW}\b", lines[0]), result.describe()
