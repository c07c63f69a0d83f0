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
"""

from __future__ import annotations

import hashlib
import json
import shutil
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
def model_copy(tmp_path_factory):
    """`model_copy(name)`: a fresh copy of a one-step tiny-model checkpoint, to be edited by a test."""
    import sys

    root = tmp_path_factory.mktemp("bad_input_model")
    done = run_process([sys.executable, "-m", "alignctl", "train", "recipe.max_steps=1", "data.eval_limit=4", f"hydra.run.dir={root / 'run'}"], cwd=root)
    assert done.returncode == 0, done.describe()

    def copy(name: str) -> Path:
        target = root / name
        shutil.copytree((root / "run" / "checkpoint").resolve(), target)
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


def test_reward_path_that_is_not_a_reward_model(alignctl, tmp_path, learned_sft_run):
    sft_dir, _ = learned_sft_run
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
