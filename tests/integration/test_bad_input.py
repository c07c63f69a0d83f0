"""The bad-input table, end to end through the CLI: each case is one line naming the culprit and what
would be valid, exit code 2, no traceback, and nothing already written is lost.

| case                                         | where it is tested                                          |
|----------------------------------------------|-------------------------------------------------------------|
| unknown key, unknown group option            | test_cli_errors.CONFIG_ERRORS                                |
| wrong type, lr <= 0, beta <= 0, r <= 0       | test_cli_errors.CONFIG_ERRORS                                |
| missing data file, missing column            | test_cli_errors (test_missing_data_file, ..._needed_columns) |
| malformed JSONL line (file and line number)  | test_cli_errors.test_malformed_data_file                     |
| empty split                                  | here                                                         |
| prompt longer than max length                | test_sft_stage (error by default; drop and truncate counted) |
| conversational data without a chat template  | here                                                         |
| a reward path that is not a reward model     | here                                                         |
| an output directory that cannot be written   | here                                                         |
| resume from a directory with no checkpoint   | here                                                         |
| a fresh run over a run's checkpoints         | here                                                         |
| a model that needs trust_remote_code         | here                                                         |
| inf / nan / out-of-range numbers anywhere    | here (test_numbers_out_of_range), test_bounds (unit)         |
| a data file: bad bytes, truncated, not rows  | here, test_corrupt_data (seeded random corruptions)          |
| a conversation ending on a user turn         | here                                                         |
| an unknown role, a non-numeric margin        | here                                                         |
| a train_split a single file does not have    | here                                                         |
| a column whose type changes at row 30        | here                                                         |
| a reward model given as inputs.policy        | here                                                         |
| a damaged pipeline file                      | here                                                         |
| damaged run files (lineage, metrics,         | here: resume and eval refuse in one line, runs and report    |
|   overrides, weights, trainer state)         |   list the run as broken and go on                           |
| a pickled (unsafe) trainer state             | here: refused, never "weights_only=False"                    |
| two signals after checkpoints exist          | here: the newest checkpoint is named                         |
| an adapter rank above the model's matrices   | here: refused from the config, before weights load           |
| a run clearly too big for the free memory    | here, test_resources (the arithmetic, unit)                  |
| a reward function that never returns         | here (recipe.reward_timeout), test_resources                 |
| a disk that fills up during a save           | here (a small tmpfs), test_resources (ENOSPC simulated)      |
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import run_process
from tests.integration.test_cli_errors import assert_nothing_half_written, assert_one_line_error


def tree_digest(root: Path) -> str:
    """Every file's path and bytes under `root`: equal digests mean nothing was changed."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and ".hydra" not in p.parts):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def one_step_run(tmp_path_factory) -> Path:
    """A finished one-step tiny-model run (lineage, metrics, checkpoint), never edited itself."""
    root = tmp_path_factory.mktemp("bad_input_model")
    done = run_process([sys.executable, "-m", "alignctl", "train", "recipe.max_steps=1", "data.eval_limit=4", f"hydra.run.dir={root / 'run'}"], cwd=root)
    assert done.returncode == 0, done.describe()
    return root / "run"


@pytest.fixture
def model_copy(one_step_run, tmp_path):
    """`model_copy(name)`: a fresh copy of a one-step tiny-model checkpoint, to be edited by a test."""

    def copy(name: str) -> Path:
        target = tmp_path / name
        shutil.copytree((one_step_run / "checkpoint").resolve(), target)
        return target

    return copy


@pytest.fixture
def run_copy(one_step_run, tmp_path):
    """`run_copy(name)`: a fresh copy of the whole one-step run directory, to be damaged by a test."""

    def copy(name: str) -> Path:
        target = tmp_path / name
        shutil.copytree(one_step_run, target, symlinks=True)  # `checkpoint` stays a relative link
        return target

    return copy


def test_empty_split(alignctl, tmp_path):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    run_dir = tmp_path / "run"
    result = alignctl("train", "data=hf", f"data.path={data}", "data.eval_split=null", "recipe.max_steps=2", f"hydra.run.dir={run_dir}")
    assert_one_line_error(result, str(data), "empty")
    assert_nothing_half_written(run_dir)


def test_conversational_data_with_a_tokenizer_without_chat_template(alignctl, tmp_path, model_copy):
    plain = model_copy("without_chat_template")
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"{i}+1="}, {"role": "assistant", "content": str(i + 1)}]}) + "\n"
                            for i in range(8)))
    run_dir = tmp_path / "run"
    result = alignctl("train", "model=hf", f"model.name_or_path={plain}", "data=hf", f"data.path={data}", "data.eval_split=null",
                      "recipe.max_steps=1", f"hydra.run.dir={run_dir}")
    assert_one_line_error(result, "chat template", "standard (string) columns")
    assert_nothing_half_written(run_dir)


def test_reward_path_that_is_not_a_reward_model(alignctl, tmp_path, quick_sft_run):
    sft_dir, _ = quick_sft_run
    run_dir = tmp_path / "run"
    result = alignctl("train", "recipe=grpo", f"inputs.policy={sft_dir}", f"inputs.reward={sft_dir}", "recipe.max_steps=1", f"hydra.run.dir={run_dir}")
    assert_one_line_error(result, f"inputs.reward={sft_dir}", "not a reward model", "LlamaForCausalLM", "recipe=reward")
    assert_nothing_half_written(run_dir)


def test_output_directory_that_cannot_be_written(alignctl, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    result = alignctl("train", "recipe.max_steps=1", f"hydra.run.dir={blocker}/run")
    assert_one_line_error(result, "hydra.run.dir", str(blocker), "not a directory")
    assert blocker.read_text() == "not a directory"
    sweep = alignctl("train", "-m", "recipe.lr=1e-4,2e-4", f"hydra.sweep.dir={blocker}/sweep")
    assert_one_line_error(sweep, "hydra.sweep.dir", str(blocker))


def test_resume_from_a_directory_without_a_checkpoint(alignctl, tmp_path):
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    assert_one_line_error(alignctl("train", f"resume={nothing}"), f"resume={nothing}", "not an alignctl run directory")
    # A run that failed before its first save: lineage.json, no checkpoint.
    failed = tmp_path / "failed"
    failed.mkdir()
    (failed / "lineage.json").write_text(json.dumps({"stage": "sft", "status": "failed"}))
    before = tree_digest(failed)
    line = assert_one_line_error(alignctl("train", f"resume={failed}"), str(failed), "no checkpoint to resume from", "recipe.save_every")
    assert "without resume" in line
    assert tree_digest(failed) == before
    fresh = tmp_path / "fresh"
    assert_one_line_error(alignctl("train", "resume=true", f"hydra.run.dir={fresh}"), "resume=true", "no checkpoint")
    assert_nothing_half_written(fresh)


def test_a_fresh_run_does_not_overwrite_a_runs_checkpoints(alignctl, tmp_path):
    run_dir = tmp_path / "run"
    args = ["train", "recipe.max_steps=2", "data.eval_limit=4", f"hydra.run.dir={run_dir}"]
    assert alignctl(*args).returncode == 0
    before = tree_digest(run_dir)
    line = assert_one_line_error(alignctl(*args), f"hydra.run.dir={run_dir}", "resume=true")
    assert "already holds a run" in line
    assert tree_digest(run_dir) == before


def test_a_model_that_ships_its_own_code_needs_trust_remote_code(alignctl, tmp_path, model_copy):
    custom = model_copy("custom_code")
    config = json.loads((custom / "config.json").read_text())
    config.update(model_type="my_custom_llama", auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                                                          "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"})
    (custom / "config.json").write_text(json.dumps(config))
    # The code it names would run only with trust_remote_code; it must never be imported here.
    (custom / "configuration_custom.py").write_text("raise SystemExit('remote code ran')\n")
    (custom / "modeling_custom.py").write_text("raise SystemExit('remote code ran')\n")
    run_dir = tmp_path / "run"
    result = alignctl("train", "model=hf", f"model.name_or_path={custom}", "recipe.max_steps=1", f"hydra.run.dir={run_dir}")
    assert_one_line_error(result, str(custom), "model.trust_remote_code=true")
    assert "remote code ran" not in result.output
    assert_nothing_half_written(run_dir)



# ----------------------------------------------------------------------------------------- numbers
NUMBERS = {
    "lr inf": (["recipe.lr=inf"], ["recipe.lr", "inf", "(0, 10]"]),
    "dpo beta inf": (["recipe=dpo", "recipe.beta=inf"], ["recipe.beta", "inf", "(0, 1000]"]),
    "negative seed": (["seed=-1"], ["seed", "-1", "[0, 4294967295]"]),
    "nan optimiser argument": (["recipe.optimizer.eps=nan"], ["recipe.optimizer.eps", "nan", "finite"]),
    "huge step count": (["recipe.max_steps=10000000000"], ["recipe.max_steps", "10000000000", "[0, 1000000000]"]),
    "grpo temperature too high": (["recipe=grpo", "recipe.temperature=1e9"], ["recipe.temperature", "(0, 100]"]),
}


@pytest.mark.parametrize("overrides, culprits", list(NUMBERS.values()), ids=list(NUMBERS))
def test_numbers_out_of_range(alignctl, tmp_path, overrides, culprits):
    """Refused at start-up, before Hydra starts the job: no run directory, no model."""
    run_dir = tmp_path / "run"
    result = alignctl("train", *overrides, "recipe.eval_every=0", f"hydra.run.dir={run_dir}", timeout=120)
    assert_one_line_error(result, *culprits)
    assert not run_dir.exists()


# -------------------------------------------------------------------------------------- data files
def train_on(alignctl, tmp_path, data: Path, *extra: str):
    run_dir = tmp_path / "run"
    result = alignctl("train", "data=hf", f"data.path={data}", "recipe.max_steps=2", "data.eval_limit=8", "recipe.eval_every=0",
                      f"hydra.run.dir={run_dir}", *extra)
    return result, run_dir


def sft_rows(count: int = 40) -> list[dict]:
    return [{"prompt": f"{i}+1=", "completion": str(i + 1)} for i in range(count)]


def chat_rows(count: int = 8) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"{i}+1="}, {"role": "assistant", "content": str(i + 1)}]} for i in range(count)]


def write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_packing_data_shorter_than_one_block(alignctl, tmp_path):
    data = tmp_path / "short.jsonl"
    data.write_text('{"prompt": "1+1=", "completion": "2"}\n{"prompt": "2+2=", "completion": "4"}\n')
    run_dir = tmp_path / "run"
    result = alignctl("train", "data=hf", f"data.path={data}", "data.eval_split=null", "recipe.packing=true", "recipe.max_length=64",
                      f"hydra.run.dir={run_dir}")
    assert_one_line_error(result, str(data), "recipe.packing=true", "recipe.max_length=64", "recipe.packing=false")
    assert_nothing_half_written(run_dir)


def test_a_data_file_with_a_latin1_byte(alignctl, tmp_path):
    data = tmp_path / "latin1.jsonl"
    data.write_bytes(b'{"prompt": "1+1=", "completion": "2"}\n{"prompt": "caf\xe9 1+2=", "completion": "3"}\n')
    result, run_dir = train_on(alignctl, tmp_path, data)
    assert_one_line_error(result, f"{data}:2", "UTF-8")
    assert_nothing_half_written(run_dir)


def test_a_truncated_json_file(alignctl, tmp_path):
    data = tmp_path / "cut.json"
    data.write_text(json.dumps(sft_rows())[:-25])
    result, run_dir = train_on(alignctl, tmp_path, data)
    assert_one_line_error(result, str(data), "malformed JSON", "truncated")
    assert_nothing_half_written(run_dir)


def test_a_row_that_is_not_an_object(alignctl, tmp_path):
    data = write_rows(tmp_path / "rows.jsonl", [*sft_rows(5), ["1+1=", "2"], *sft_rows(3)])
    result, run_dir = train_on(alignctl, tmp_path, data)
    assert_one_line_error(result, str(data), "row 5", "not an object")
    assert_nothing_half_written(run_dir)


# ---------------------------------------------------------------------------------- data semantics
def test_a_conversation_that_ends_on_a_user_turn(alignctl, tmp_path):
    rows = chat_rows()
    rows[3]["messages"].append({"role": "user", "content": "and 2+2?"})
    result, run_dir = train_on(alignctl, tmp_path, write_rows(tmp_path / "chat.jsonl", rows))
    assert_one_line_error(result, "row 3", "'messages'", "'user'", "assistant")
    assert_nothing_half_written(run_dir)


def test_an_unknown_role(alignctl, tmp_path):
    rows = chat_rows()
    rows[5]["messages"][0]["role"] = "human"
    result, run_dir = train_on(alignctl, tmp_path, write_rows(tmp_path / "chat.jsonl", rows))
    assert_one_line_error(result, "row 5", "'human'", "system, user, assistant")
    assert_nothing_half_written(run_dir)


@pytest.mark.parametrize("margins", ["one row", "every row"])
def test_a_margin_that_is_not_a_number(alignctl, tmp_path, margins):
    rows = [{"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": str(i), "margin": 1.0} for i in range(10)]
    for row in rows[6:7] if margins == "one row" else rows:
        row["margin"] = "large"
    culprit = "row 6" if margins == "one row" else "row 0"
    result, run_dir = train_on(alignctl, tmp_path, write_rows(tmp_path / "pairs.jsonl", rows), "recipe=reward")
    assert_one_line_error(result, culprit, "'margin'", "number")
    assert_nothing_half_written(run_dir)


def test_a_train_split_a_single_file_does_not_have(alignctl, tmp_path):
    data = write_rows(tmp_path / "train.jsonl", sft_rows(8))
    result, run_dir = train_on(alignctl, tmp_path, data, "data.train_split=validation")
    assert_one_line_error(result, "data.train_split='validation'", str(data), "'train'")
    assert_nothing_half_written(run_dir)


def test_a_column_whose_type_changes_names_the_row_that_changes_it(alignctl, tmp_path):
    rows = sft_rows()
    rows[30]["completion"] = 31
    result, run_dir = train_on(alignctl, tmp_path, write_rows(tmp_path / "mixed.jsonl", rows))
    line = assert_one_line_error(result, "row 30", "'completion'", "number", "string")
    assert "row 0" not in line
    assert_nothing_half_written(run_dir)


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad_input_reward")
    done = run_process([sys.executable, "-m", "alignctl", "train", "recipe=reward", "recipe.max_steps=2", "data.eval_limit=8",
                        "recipe.eval_every=0", f"hydra.run.dir={root / 'run'}"], cwd=root)
    assert done.returncode == 0, done.describe()
    return root / "run"


@pytest.mark.parametrize("recipe", ["dpo", "sft"])
def test_a_reward_model_given_as_the_policy(alignctl, tmp_path, reward_run, recipe):
    run_dir = tmp_path / "run"
    result = alignctl("train", f"recipe={recipe}", f"inputs.policy={reward_run}", "recipe.max_steps=2", f"hydra.run.dir={run_dir}")
    assert_one_line_error(result, "inputs.policy", str(reward_run), "reward model", "inputs.init", "inputs.reward")
    assert not run_dir.exists()


# -------------------------------------------------------------------------------- pipeline files
@pytest.mark.parametrize("content, culprits", [
    (b"stages:\n  sft: {overrides: [recipe=sft]}\n  # caf\xe9\n", ["UTF-8"]),
    (b"stages:\n  sft: {overrides: recipe=sft}\n", ["stage 'sft'", "overrides", "list"]),
    (b"stages:\n  sft: {overrides: [recipe=sft]}\n  dpo: {overrides: [recipe=dpo], inputs: [sft]}\n", ["stage 'dpo'", "inputs"]),
    (b"stages:\n  sft: {overrides: [recipe=sft\n", ["not valid YAML"]),
], ids=["not utf-8", "overrides a string", "inputs a list", "truncated"])
def test_a_damaged_pipeline_file(alignctl, tmp_path, content, culprits):
    pipeline = tmp_path / "mine.yaml"
    pipeline.write_bytes(content)
    result = alignctl("pipeline", str(pipeline), f"pipeline.dir={tmp_path / 'runs'}", timeout=120)
    assert_one_line_error(result, str(pipeline), *culprits)
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------------------- run files
def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00\xffnot this file\n" * 4}[how])


def resume(alignctl, run_dir: Path):
    return alignctl("train", f"resume={run_dir}", "recipe.max_steps=3")


@pytest.mark.parametrize("file, how, culprits", [
    ("lineage.json", "truncate", ["lineage.json", "JSON"]),
    (".hydra/overrides.yaml", "garbage", ["overrides.yaml"]),
    ("checkpoint/model.safetensors", "truncate", ["model.safetensors", "truncated"]),
    ("checkpoint/model.safetensors", "garbage", ["model.safetensors", "damaged"]),
    ("checkpoint/trainer_state.pt", "truncate", ["trainer_state.pt", "truncated or corrupt"]),
    ("checkpoint/alignctl.json", "truncate", ["alignctl.json", "JSON"]),
], ids=lambda v: str(v))
def test_a_damaged_run_file_stops_a_resume_in_one_line(alignctl, run_copy, file, how, culprits):
    run_dir = run_copy("run")
    damage((run_dir / file).resolve(), how)
    before = tree_digest(run_dir)
    assert_one_line_error(resume(alignctl, run_dir), *culprits)
    assert tree_digest(run_dir) == before, "a refused resume must leave the run as it was"


def test_a_pickled_trainer_state_is_refused_without_suggesting_to_unpickle_it(alignctl, run_copy, tmp_path):
    run_dir = run_copy("run")
    state = (run_dir / "checkpoint" / "trainer_state.pt").resolve()
    marker = tmp_path / "code_ran"
    code = ("import os, torch\n"
            "class Payload:\n"
            f"    def __reduce__(self): return (os.system, ('touch {marker}',))\n"
            f"torch.save({{'step': 1, 'payload': Payload()}}, {str(state)!r})\n")
    assert run_process([sys.executable, "-c", code]).returncode == 0
    line = assert_one_line_error(resume(alignctl, run_dir), "trainer_state.pt", "refused")
    assert "weights_only" not in line
    assert not marker.exists()


def test_damaged_weights_given_as_the_policy(alignctl, run_copy, tmp_path):
    parent = run_copy("parent")
    damage((parent / "checkpoint" / "model.safetensors").resolve(), "truncate")
    run_dir = tmp_path / "run"
    result = alignctl("train", "recipe=dpo", f"inputs.policy={parent}", "recipe.max_steps=2", f"hydra.run.dir={run_dir}")
    assert_one_line_error(result, "inputs.policy", "model.safetensors", "truncated")
    assert not run_dir.exists()


def test_eval_of_a_run_with_damaged_files(alignctl, run_copy):
    run_dir = run_copy("run")
    damage(run_dir / "lineage.json", "garbage")
    assert_one_line_error(alignctl("eval", f"run={run_dir}"), "lineage.json")


@pytest.mark.parametrize("file", ["lineage.json", "metrics.jsonl", "eval.json"])
def test_runs_and_report_show_a_broken_run_and_go_on(alignctl, run_copy, tmp_path, file):
    run_copy("good")
    broken = run_copy("broken")
    damage(broken / file, "truncate")
    listing = alignctl("runs", str(tmp_path), timeout=120)
    assert listing.returncode == 0, listing.describe()
    assert "Traceback" not in listing.output
    text = " ".join(listing.stdout.split())
    assert "good" in text and "finished" in text and "broken" in text, listing.stdout
    report = alignctl("report", str(tmp_path), timeout=120)
    assert report.returncode == 0, report.describe()
    assert "Traceback" not in report.output
    assert (tmp_path / "report" / "good.png").exists()
    assert "broken" in report.stdout and file in " ".join(report.stdout.split()).replace(" ", "")


# ----------------------------------------------------------------------------------------- signals
def test_two_signals_after_a_checkpoint_name_the_checkpoint(tmp_path):
    """The second signal stops at once (mid-step): the line and lineage.json still name the newest
    checkpoint and the last finished step, not 'nothing to resume' and 'after step None'."""
    import signal
    import subprocess
    import time

    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "alignctl", "train", "recipe.max_steps=2000", "recipe.save_every=2", "recipe.batch_size=64",
         "data.eval_limit=8", "recipe.eval_every=0", f"hydra.run.dir={run_dir}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    deadline = time.monotonic() + 300
    while not (run_dir / "checkpoint").exists():
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read() if process.poll() is not None else "timed out"
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    for line in process.stdout:  # the first signal is being handled: the run finishes this step
        if "received signal" in line:
            break
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 143, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert "nothing to resume" not in lines[0] and "step None" not in lines[0], lines[0]
    checkpoint = (run_dir / "checkpoint").resolve()
    assert f"checkpoint {checkpoint}" in lines[0] and f"resume with: alignctl train resume={run_dir}" in lines[0], lines[0]
    lineage = json.loads((run_dir / "lineage.json").read_text())
    assert lineage["status"] == "interrupted" and "None" not in lineage["error"], lineage


# ---------------------------------------------------------------------------------- resources
def test_an_adapter_rank_the_models_matrices_cannot_hold(alignctl, tmp_path):
    run_dir = tmp_path / "run"
    # Within the schema's range (r <= 65536), but the width-96 model's matrices cannot use it.
    result = alignctl("train", "adapter=lora", "adapter.r=5000", "recipe.max_steps=1", f"hydra.run.dir={run_dir}")
    assert_one_line_error(result, "adapter.r: 5000", "q_proj (96 in, 96 out)", "valid: 1 to 96")
    assert_nothing_half_written(run_dir)


def test_a_run_clearly_too_big_for_the_memory_is_refused_before_loading(alignctl, tmp_path):
    run_dir = tmp_path / "run"
    data = write_rows(tmp_path / "few.jsonl", sft_rows(8))  # few rows: the estimate reads them quickly
    # 1,000 packed rows of 100,000 tokens: terabytes of activations on any machine.
    result = alignctl("train", "data=hf", f"data.path={data}", "data.eval_split=null", "recipe.packing=true", "recipe.batch_size=1000",
                      "recipe.max_length=100000", f"hydra.run.dir={run_dir}")
    assert_one_line_error(result, "not enough memory", "alignctl plan estimates", "available (", "recipe.batch_size",
                          "hardware.gradient_checkpointing=true", "--fit ", "hardware.memory_check=false")
    assert_nothing_half_written(run_dir)


NEVER_RETURNS = """
import time

def never_returns(prompts, completions, **kwargs):
    time.sleep(3600)
"""


def test_a_reward_function_that_never_returns(alignctl, tmp_path):
    (tmp_path / "hung_rewards.py").write_text(NEVER_RETURNS)  # the CLI runs in tmp_path: importable
    run_dir = tmp_path / "run"
    result = alignctl("train", "recipe=grpo", "recipe.reward_funcs=[hung_rewards.never_returns]", "recipe.reward_timeout=0.5",
                      "recipe.max_steps=1", "recipe.batch_size=8", "recipe.num_generations=4", "data.eval_limit=4",
                      f"hydra.run.dir={run_dir}", timeout=300)
    assert_one_line_error(result, "reward function hung_rewards.never_returns did not return within recipe.reward_timeout=0.5 seconds")
    lineage = json.loads((run_dir / "lineage.json").read_text())
    assert lineage["status"] == "failed" and "hung_rewards.never_returns" in lineage["error"], lineage


FILL_AND_RESUME = """
set -u
mount -t tmpfs -o size=256m tmpfs "$MNT" || exit 97
cp -a "$SRC" "$MNT/run"
used=$(df -B1 --output=used "$MNT" | tail -1)
mount -o remount,size=$(( used + CHECKPOINT / 2 )) tmpfs "$MNT" || exit 98
"$PYTHON" -m alignctl train resume="$MNT/run" recipe.max_steps=2
code=$?
cp -a "$MNT/run" "$OUT"
exit $code
"""


def small_filesystems_can_be_made() -> str | None:
    """Why a test cannot mount a small tmpfs of its own (a user and mount namespace), or None."""
    import subprocess

    if not shutil.which("unshare"):
        return "no unshare command"
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /tmp"], capture_output=True, text=True)
    return None if probe.returncode == 0 else f"cannot mount a tmpfs in a user namespace here: {probe.stderr.strip()[:120]}"


def test_a_disk_that_fills_up_during_a_save(run_copy, tmp_path):
    """A resumed run on a tmpfs with room for half a checkpoint more: the save of step 2 fails."""
    reason = small_filesystems_can_be_made()
    if reason:
        pytest.skip(reason)
    source = run_copy("source")
    first = (source / "checkpoint").resolve()
    before = tree_digest(first)
    checkpoint_bytes = sum(p.stat().st_size for p in first.rglob("*") if p.is_file())
    (tmp_path / "mnt").mkdir()
    script = tmp_path / "fill.sh"
    script.write_text(FILL_AND_RESUME)
    after = tmp_path / "after"
    env = {"MNT": str(tmp_path / "mnt"), "SRC": str(source), "OUT": str(after), "CHECKPOINT": str(checkpoint_bytes), "PYTHON": sys.executable}
    result = run_process(["unshare", "-rm", "bash", str(script)], cwd=tmp_path, env=env)
    run_dir = tmp_path / "mnt" / "run"  # as the run saw it
    assert_one_line_error(result, f"{run_dir / 'checkpoints'}: disk full while saving the checkpoint of step 2",
                          "a checkpoint needs about", "step-000001 is intact", f"resume with: alignctl train resume={run_dir}")
    assert sorted(p.name for p in (after / "checkpoints").iterdir()) == ["step-000001"]  # no .tmp-step-*
    assert os.readlink(after / "checkpoint") == "checkpoints/step-000001"
    assert tree_digest(after / "checkpoints" / "step-000001") == before
    lineage = json.loads((after / "lineage.json").read_text())
    assert lineage["status"] == "failed" and "disk full" in lineage["error"], lineage
