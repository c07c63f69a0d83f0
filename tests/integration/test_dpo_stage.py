"""The DPO stage end to end through the real CLI: every loss type, the reference modes, the
precomputed reference cache, bad input, and a checkpoint that plain transformers loads.

Every run is a real `alignctl train recipe=dpo ...` (in the test process: conftest's run_cli) of one
to three optimiser steps on a small preference dataset (64 train and 16 eval pairs of the built-in
arithmetic task, saved to a temporary directory), starting from one short SFT run. As in
test_sft_stage.py, the runs the selected tests need are run up front, in JOBS order (a run that
needs another, the SFT run or a first precomputed run whose cache it reuses, comes after it); the
checkpoint-loading script runs in a process of its own. A run's failure is reported by the tests
that use it.

A second, smaller SFT run is repeated in its own run directory on other rows, to check that the
precomputed reference cache notices a policy retrained in place.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from stage_runs import StageRun

from tests.integration.conftest import run_cli

LN2 = math.log(2)
BETA = 0.1  # recipe.beta of recipe=dpo
TRL_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")
IDENTICAL_ROW = 2  # the row of same.jsonl whose chosen equals its rejected

DATA = ["data=hf", "data.path={root}/pairs", "data.eval_split=test", "data.eval_limit=8"]
# nll_weight=0: these runs check the DPO losses alone (model=tiny adds an NLL term by default).
DPO = ["recipe=dpo", *DATA, "inputs.policy={sft}", "recipe.nll_weight=0"]
STILL = ["recipe.max_steps=1", "recipe.lr=1e-30"]  # one step that leaves the policy where it started
LORA_RANDOM = ["adapter=lora", "adapter.init_lora_weights=false"]  # B != 0: the adapter changes the model from the start
LOSS_TYPES = {
    "sigmoid": [],
    "robust": ["recipe.label_smoothing=0.1"],
    "hinge": [],
    "ipo": [],
    "simpo": [],
}
# Each loss at h = 0 (policy equal to the reference), beta = 0.1:
# sigmoid -log sigma(0) = log 2; robust (0.9 log 2 - 0.1 log 2) / 0.8 = log 2; hinge 1; ipo 1/(4 beta^2) = 25.
LOSS_AT_ZERO = {"sigmoid": LN2, "robust": LN2, "hinge": 1.0, "ipo": 1 / (4 * BETA**2)}


@dataclass
class Job:
    args: list[str]
    after: tuple[str, ...] = ()  # runs that must finish first
    command: str = "train"  # "train": alignctl train; "load": the checkpoint-loading script
    dir: str | None = None  # the run directory under runs/ (default: the job's name)
    prepare: Callable[[Path], None] | None = None  # called with the module's scratch directory before the run


SFT_AGAIN = ["recipe=sft", "recipe.max_steps=10", "recipe.batch_size=16", "data=hf", "data.path={root}/sft_again.jsonl"]
PRECOMPUTED_FROM_SFT_AGAIN = ["recipe=dpo", *DATA, *STILL, "recipe.nll_weight=0", "recipe.reference=precomputed", "inputs.policy={root}/runs/sft_again"]


def weights_digest(run_dir: Path) -> str:
    return hashlib.sha256((run_dir / "checkpoint" / "model.safetensors").read_bytes()).hexdigest()


def retrain_on_other_rows(root: Path) -> None:
    """Before the SFT run is repeated in the same run directory: note the weights it leaves, clear
    the directory (alignctl refuses to train over a run's checkpoints), and change the contents
    (not the name) of its data file."""
    (root / "sft_again.digest").write_text(weights_digest(root / "runs" / "sft_again"))
    shutil.rmtree(root / "runs" / "sft_again")
    write_jsonl(root / "sft_again.jsonl", read_jsonl(arithmetic_split("sft"))[64:128])


# name -> job ({root}: the module's scratch directory, {sft}: the SFT run directory). A job is listed
# after every job it waits for, so a waiting worker never holds up one it waits on.
JOBS: dict[str, Job] = {
    "sft": Job(["recipe=sft", "recipe.max_steps=30", "recipe.eval_every=0", "data.eval_limit=8"]),
    # a policy retrained in place (same run directory and config, other data contents, other weights);
    # a chain of four runs, spread through the queue so that no worker waits long for the previous one
    "sft_again": Job(SFT_AGAIN),
    # bad input: these need no SFT run and fail fast (the first four before torch is imported)
    "err_beta_zero": Job(["recipe=dpo", "recipe.beta=0"]),
    "err_beta_negative": Job(["recipe=dpo", "recipe.beta=-1"]),
    "err_loss_type": Job(["recipe=dpo", "recipe.loss_type=foo"]),
    "err_simpo_separate": Job(["recipe=dpo", "recipe.loss_type=simpo", "recipe.reference=separate"]),
    "err_adapter_disabled": Job(["recipe=dpo", "recipe.reference=adapter_disabled", "adapter=none"]),
    "err_no_rejected": Job(["recipe=dpo", "data=hf", "data.path={root}/no_rejected.jsonl"]),
    "err_identical": Job(["recipe=dpo", "data=hf", "data.path={root}/same.jsonl"]),
    "cache_sft_again": Job(PRECOMPUTED_FROM_SFT_AGAIN, after=("sft_again",)),
    "full_precomputed": Job([*DPO, *STILL, "recipe.reference=precomputed"], after=("sft",)),
    **{
        loss: Job([*DPO, "recipe.max_steps=3", f"recipe.loss_type={loss}", *extra], after=("sft",))
        for loss, extra in list(LOSS_TYPES.items())[:2]
    },
    "sft_again_retrained": Job(SFT_AGAIN, after=("cache_sft_again",), dir="sft_again", prepare=retrain_on_other_rows),
    # the precomputed cache from another starting policy (the tiny base model); after the first
    # precomputed run, so that a cache key shared by mistake would be found there
    "cache_other_policy": Job(["recipe=dpo", *DATA, *STILL, "recipe.nll_weight=0", "recipe.reference=precomputed"], after=("full_precomputed",)),
    **{
        loss: Job([*DPO, "recipe.max_steps=3", f"recipe.loss_type={loss}", *extra], after=("sft",))
        for loss, extra in list(LOSS_TYPES.items())[2:]
    },
    "cache_sft_again_retrained": Job(PRECOMPUTED_FROM_SFT_AGAIN, after=("sft_again_retrained",)),
    # reference modes
    "full_separate": Job([*DPO, *STILL, "recipe.reference=separate"], after=("sft",)),
    "lora_auto": Job([*DPO, *STILL, "adapter=lora", "recipe.reference=auto"], after=("sft",)),
    "lora_random_disabled": Job([*DPO, *STILL, *LORA_RANDOM, "recipe.reference=adapter_disabled"], after=("sft",)),
    "lora_random_separate": Job([*DPO, *STILL, *LORA_RANDOM, "recipe.reference=separate"], after=("sft",)),
    "cache_other_data": Job(
        [*DPO, *STILL, "recipe.reference=precomputed", "data.path={root}/other.jsonl", "data.eval_split=null"],
        after=("sft", "full_precomputed"),
    ),
    "cache_again": Job([*DPO, *STILL, "recipe.reference=precomputed"], after=("full_precomputed",)),
    "load": Job(["{root}/runs/sigmoid/checkpoint", "{sft}/checkpoint"], after=("sigmoid",), command="load"),
}
assert all(list(JOBS).index(d) < list(JOBS).index(n) for n, job in JOBS.items() for d in job.after)
assert JOBS["cache_again"].args == JOBS["full_precomputed"].args

# test function -> the runs it reads (only the runs of selected tests, and what they wait for, start).
USES: dict[str, set[str]] = {
    "test_loss_type_trains_and_logs_trl_metrics": set(LOSS_TYPES),
    "test_step_zero_eval_sees_policy_equal_to_reference": set(LOSS_TYPES),
    "test_reference_modes_agree_on_the_starting_policy": {"full_separate", "full_precomputed", "lora_auto"},
    "test_adapter_disabled_and_separate_agree_with_a_nonzero_adapter": {"lora_random_disabled", "lora_random_separate"},
    "test_auto_reference_resolution": {"sigmoid", "lora_auto", "simpo"},
    "test_precomputed_cache_reused_by_identical_run": {"full_precomputed", "cache_again"},
    "test_precomputed_cache_recomputed_for_other_data_or_policy": {"full_precomputed", "cache_other_data", "cache_other_policy"},
    "test_precomputed_cache_recomputed_for_policy_retrained_in_place": {"cache_sft_again", "cache_sft_again_retrained"},
    "test_bad_input_is_one_line": {n for n in JOBS if n.startswith("err_")},
    "test_checkpoint_loads_in_plain_transformers": {"load"},
}

# Run in a fresh interpreter that never imports alignctl: load the DPO checkpoint with transformers.
LOAD_SCRIPT = r"""
import json, sys
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

dpo, sft = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(dpo, dtype=torch.float32).eval()
tokenizer = AutoTokenizer.from_pretrained(dpo)
ids = tokenizer("033+634=", return_tensors="pt")
with torch.no_grad():
    logits = model(**ids).logits
    out = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
state = model.state_dict()
saved = load_file(f"{dpo}/model.safetensors")
start = load_file(f"{sft}/model.safetensors")
print(json.dumps({
    "alignctl_imported": sorted(m for m in sys.modules if m == "alignctl" or m.startswith("alignctl.")),
    "class": type(model).__name__,
    "matches_saved": all(torch.equal(state[k], v) for k, v in saved.items()),
    "differs_from_sft": any(not torch.equal(state[k], start[k]) for k in saved),
    "finite": bool(torch.isfinite(logits).all()),
    "new_tokens": out.shape[1] - ids["input_ids"].shape[1],
}))
"""


# ------------------------------------------------------------------------------------------ data
def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def arithmetic_split(name: str) -> Path:
    from alignctl.data.tasks import arithmetic

    return arithmetic.split_path(name)


def write_datasets(root: Path) -> None:
    from datasets import Dataset, DatasetDict

    pairs = read_jsonl(arithmetic_split("preference"))
    held_out = read_jsonl(arithmetic_split("eval_preference"))
    DatasetDict(train=Dataset.from_list(pairs[:64]), test=Dataset.from_list(held_out[:16])).save_to_disk(str(root / "pairs"))
    # as many rows as the train split of pairs: only their contents tell the two apart
    write_jsonl(root / "other.jsonl", pairs[64:128])
    write_jsonl(root / "sft_again.jsonl", read_jsonl(arithmetic_split("sft"))[:64])
    write_jsonl(root / "no_rejected.jsonl", [{"prompt": r["prompt"], "chosen": r["chosen"]} for r in pairs[:8]])
    same = [dict(r) for r in pairs[:8]]
    same[IDENTICAL_ROW]["rejected"] = same[IDENTICAL_ROW]["chosen"]
    write_jsonl(root / "same.jsonl", same)


# ------------------------------------------------------------------------------------------ runs
@dataclass
class Run(StageRun):

    def eval_records(self) -> list[dict]:
        return [r for r in self.records() if "eval_loss" in r]

    def step(self, step: int, kind: str = "train") -> dict:
        found = [r for r in (self.train_records() if kind == "train" else self.eval_records()) if r["step"] == step]
        assert len(found) == 1, (self.name, kind, step, self.records())
        return found[0]

    def reference_logps(self) -> dict[str, tuple[str, str]]:
        """split -> (what happened, cache key) from 'reference log-probs for <split>: ... (<key>)'."""
        found = re.findall(r"reference log-probs for (\w+): (reused from cache|computed and cached) \((\w+)\)", self.flat_output)
        return {split: (what, key) for split, what, key in found}


class Runs:
    """Runs the needed runs up front, in JOBS order (a job comes after the jobs it waits for);
    `runs[name]` returns one."""

    def __init__(self, root: Path, run_cmd, needed: set[str]):
        self.root, self.run_cmd = root, run_cmd
        self.done: dict[str, Run] = {}
        for name in JOBS:
            if name in needed:
                self.done[name] = self._run(name)  # a failure shows in the tests that read it

    def _run(self, name: str) -> Run:
        job = JOBS[name]
        if job.prepare is not None:
            job.prepare(self.root)
        run_dir = self.root / "runs" / (job.dir or name)
        args = [a.format(root=self.root, sft=self.root / "runs" / "sft") for a in job.args]
        if job.command == "load":
            result = self.run_cmd([sys.executable, "-c", LOAD_SCRIPT, *args], cwd=self.root)
        else:
            args.append(f"hydra.run.dir={run_dir}")
            result = run_cli(["train", *args], cwd=self.root)
        return Run(name, run_dir, result)

    def __getitem__(self, name: str) -> Run:
        return self.done[name]


def with_dependencies(names: set[str]) -> set[str]:
    needed, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo.extend(JOBS[name].after)
    return needed


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory, run_cmd, offline_env) -> Runs:
    root = tmp_path_factory.mktemp("dpo_stage")
    write_datasets(root)
    selected = [item for item in request.session.items if getattr(item, "module", None) is request.module]
    needed = set().union(*(USES.get(getattr(item, "originalname", item.name), set()) for item in selected))
    return Runs(root, run_cmd, with_dependencies(needed))


def finished(runs: Runs, name: str) -> Run:
    run = runs[name]
    run.assert_finished()
    return run


# ---------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("loss_type", list(LOSS_TYPES))
def test_loss_type_trains_and_logs_trl_metrics(runs, loss_type):
    import torch
    from safetensors.torch import load_file

    finished(runs, "sft")
    run = finished(runs, loss_type)
    assert f"{loss_type} loss" in run.flat_output, run.result.describe()

    train, evals = run.train_records(), run.eval_records()
    assert len(train) + len(evals) == len(run.records()), run.records()
    assert [r["step"] for r in train] == [1, 2, 3]
    assert [r["step"] for r in evals] == [0, 3]  # the starting policy, and the end
    for record in train:
        assert {"loss", *TRL_KEYS} <= set(record), record
        assert all(math.isfinite(record[k]) for k in ("loss", *TRL_KEYS)), record
        assert not any(k.startswith("eval_") for k in record), record
    for record in evals:
        assert {"eval_loss", *(f"eval_{k}" for k in TRL_KEYS)} <= set(record), record
        assert all(math.isfinite(record[k]) for k in ("eval_loss", *(f"eval_{k}" for k in TRL_KEYS))), record
    for record in train + evals:
        prefix = "eval_" if "eval_loss" in record else ""
        assert 0 <= record[f"{prefix}rewards/accuracies"] <= 1, record
        assert record[f"{prefix}logps/chosen"] < 0 and record[f"{prefix}logps/rejected"] < 0, record
        margin = record[f"{prefix}rewards/chosen"] - record[f"{prefix}rewards/rejected"]
        assert record[f"{prefix}rewards/margins"] == pytest.approx(margin, abs=1e-6), record
    eval_json = json.loads((run.dir / "eval.json").read_text())
    assert eval_json["step"] == 3 and eval_json["eval_loss"] == pytest.approx(evals[-1]["eval_loss"])

    # Three steps of full fine-tuning moved every tensor away from the SFT checkpoint it started from.
    start = load_file(runs["sft"].dir / "checkpoint" / "model.safetensors")
    trained = load_file(run.dir / "checkpoint" / "model.safetensors")
    assert set(trained) == set(start)
    unchanged = [k for k in start if torch.equal(start[k], trained[k])]
    assert not unchanged, f"{loss_type}: these tensors did not train: {unchanged}"
    assert all(torch.isfinite(v).all() for v in trained.values())
    lineage = json.loads((run.dir / "lineage.json").read_text())
    assert "sft" in json.dumps(lineage.get("parents", lineage)), lineage


@pytest.mark.parametrize("loss_type", list(LOSS_TYPES))
def test_step_zero_eval_sees_policy_equal_to_reference(runs, loss_type):
    """Before the first update the policy is its reference: every implicit reward is 0, and the loss
    is the loss at zero margin, on the eval pairs (step 0) and on the first train batch (step 1)."""
    run = finished(runs, loss_type)
    step0, step1 = run.step(0, "eval"), run.step(1)
    if loss_type == "simpo":  # reference-free: rewards are beta * mean token log-prob, negative
        assert step0["eval_rewards/chosen"] < 0 and step0["eval_rewards/rejected"] < 0, step0
        assert step0["eval_rewards/margins"] != 0, step0
        return
    for record, prefix in ((step0, "eval_"), (step1, "")):
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
            assert record[prefix + key] == pytest.approx(0.0, abs=1e-6), (key, record)
        loss = record[f"{prefix}loss"]
        assert loss == pytest.approx(LOSS_AT_ZERO[loss_type], abs=1e-5), record


def test_reference_modes_agree_on_the_starting_policy(runs):
    """With one step at lr=1e-30 every reference is the starting policy: the step-1 loss is log 2 in
    every mode (full fine-tuning with a separate copy or precomputed log-probs, LoRA with auto)."""
    names = ("full_separate", "full_precomputed", "lora_auto")
    losses = {name: finished(runs, name).step(1)["loss"] for name in names}
    assert max(losses.values()) - min(losses.values()) <= 1e-5, losses
    assert all(abs(v - LN2) <= 1e-5 for v in losses.values()), losses
    # the same policy log-probs on the same first batch (same seed, same data order)
    chosen = {name: runs[name].step(1)["logps/chosen"] for name in names}
    assert max(chosen.values()) - min(chosen.values()) <= 1e-4, chosen
    evals = {name: runs[name].step(0, "eval")["eval_loss"] for name in names}
    assert all(abs(v - LN2) <= 1e-5 for v in evals.values()), evals


def test_adapter_disabled_and_separate_agree_with_a_nonzero_adapter(runs):
    """adapter.init_lora_weights=false starts B random, so the policy differs from its base from the
    first step: the loss is not log 2, and the base with the adapter switched off must give exactly
    what a separate copy of the base gives."""
    import torch
    from safetensors.torch import load_file

    disabled, separate = finished(runs, "lora_random_disabled"), finished(runs, "lora_random_separate")
    assert "reference adapter_disabled" in disabled.flat_output and "reference separate" in separate.flat_output
    # the same random adapter in both runs (lr=1e-30: what was saved is what they started with)
    a = load_file(disabled.dir / "checkpoint" / "adapter_model.safetensors")
    b = load_file(separate.dir / "checkpoint" / "adapter_model.safetensors")
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in a.items())

    one, two = disabled.step(1), separate.step(1)
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen"):
        assert one[key] == pytest.approx(two[key], abs=1e-5, rel=0), (key, one, two)
    assert abs(one["loss"] - LN2) > 1e-4, f"the random adapter should move the policy off its reference: {one}"
    zero_a, zero_b = disabled.step(0, "eval"), separate.step(0, "eval")
    assert zero_a["eval_loss"] == pytest.approx(zero_b["eval_loss"], abs=1e-5, rel=0)
    assert zero_a["eval_rewards/margins"] == pytest.approx(zero_b["eval_rewards/margins"], abs=1e-5, rel=0)


def test_auto_reference_resolution(runs):
    assert "reference separate" in finished(runs, "sigmoid").flat_output  # auto, full fine-tuning
    assert "reference adapter_disabled" in finished(runs, "lora_auto").flat_output  # auto, adapter=lora
    assert "reference none" in finished(runs, "simpo").flat_output  # auto, reference-free loss


def test_precomputed_cache_reused_by_identical_run(runs):
    first, again = finished(runs, "full_precomputed"), finished(runs, "cache_again")
    assert "reference precomputed" in first.flat_output
    computed, reused = first.reference_logps(), again.reference_logps()
    assert set(computed) == {"train", "eval"}, first.result.describe()
    assert all(what == "computed and cached" for what, _ in computed.values()), computed
    assert set(reused) == {"train", "eval"}, again.result.describe()
    assert all(what == "reused from cache" for what, _ in reused.values()), reused
    assert {s: k for s, (_, k) in computed.items()} == {s: k for s, (_, k) in reused.items()}
    assert computed["train"][1] != computed["eval"][1]
    # the cached log-probs give what computing them gave
    assert again.step(1)["loss"] == pytest.approx(first.step(1)["loss"], abs=1e-6)
    assert again.step(0, "eval")["eval_loss"] == pytest.approx(first.step(0, "eval")["eval_loss"], abs=1e-6)


def test_precomputed_cache_recomputed_for_other_data_or_policy(runs):
    first = finished(runs, "full_precomputed").reference_logps()
    other_data = finished(runs, "cache_other_data").reference_logps()
    other_policy = finished(runs, "cache_other_policy").reference_logps()
    assert set(other_data) == {"train"}, other_data  # data.eval_split=null
    assert other_data["train"][0] == "computed and cached" and other_data["train"][1] != first["train"][1]
    assert set(other_policy) == {"train", "eval"}, other_policy
    for split in ("train", "eval"):
        assert other_policy[split][0] == "computed and cached", other_policy
        assert other_policy[split][1] != first[split][1]
    # the base model is not the SFT policy: its step-1 loss is still log 2, its log-probs differ
    base, sft = runs["cache_other_policy"].step(1), runs["full_precomputed"].step(1)
    assert base["loss"] == pytest.approx(LN2, abs=1e-5)
    assert abs(base["logps/chosen"] - sft["logps/chosen"]) > 1e-3, (base, sft)


STALE_CACHE = (
    "alignctl/train/reference.py model_identity: a run directory is identified by its alignctl.json alone "
    "(stage, config_hash, step), so a policy retrained in place (same run directory and config, other data "
    "contents) keeps its identity and reference=precomputed reuses the old policy's log-probs"
)


def test_precomputed_cache_recomputed_for_policy_retrained_in_place(runs):
    first = finished(runs, "cache_sft_again")
    assert first.reference_logps()["train"][0] == "computed and cached", first.reference_logps()
    assert first.step(1)["loss"] == pytest.approx(LN2, abs=1e-5)
    retrained = finished(runs, "sft_again_retrained")
    # the premise: the same run directory now holds other weights
    assert weights_digest(retrained.dir) != (retrained.dir.parent.parent / "sft_again.digest").read_text()
    second = finished(runs, "cache_sft_again_retrained")
    # the reference is the starting policy: the retrained one, so policy == reference at step 1
    assert second.step(1)["loss"] == pytest.approx(LN2, abs=1e-5), second.step(1)
    assert second.step(1)["rewards/margins"] == pytest.approx(0.0, abs=1e-6), second.step(1)
    assert {split: what for split, (what, _) in second.reference_logps().items()} == {
        "train": "computed and cached",
        "eval": "computed and cached",
    }


BAD_INPUT = {
    "err_beta_zero": ("recipe.beta", "0"),
    "err_beta_negative": ("recipe.beta", "-1"),
    "err_loss_type": ("recipe.loss_type", "foo", *LOSS_TYPES),
    "err_simpo_separate": ("recipe.reference", "simpo"),
    "err_adapter_disabled": ("recipe.reference", "adapter_disabled", "adapter=lora"),
    "err_no_rejected": ("no_rejected.jsonl", "prompt/chosen/rejected", "rejected"),
    "err_identical": ("same.jsonl", f"row {IDENTICAL_ROW}", "identical"),
}


@pytest.mark.parametrize("name", list(BAD_INPUT))
def test_bad_input_is_one_line(runs, name):
    result = runs[name].result
    assert result.returncode == 2, result.describe()
    assert "Traceback" not in result.output, result.describe()
    lines = result.stderr_lines()
    assert len(lines) == 1 and lines[0].startswith("alignctl: error: "), result.describe()
    for needle in BAD_INPUT[name]:
        assert needle in lines[0], (needle, lines[0])
    if name == "err_identical":
        assert re.search(rf"\brow {IDENTICAL_ROW}\b", lines[0]), lines[0]


def test_checkpoint_loads_in_plain_transformers(runs):
    load = runs["load"]
    assert load.result.returncode == 0, load.result.describe()
    report = json.loads(load.result.stdout.strip().splitlines()[-1])
    assert report["alignctl_imported"] == [], report
    assert report["class"] == "LlamaForCausalLM", report
    assert report["matches_saved"] and report["differs_from_sft"] and report["finite"], report
    assert report["new_tokens"] > 0, report
