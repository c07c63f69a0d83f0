"""`alignctl pipeline`, `alignctl runs` and `alignctl report` through the real CLI.

One small three-stage pipeline (sft -> dpo -> kto, a few steps each) is run, re-run unchanged
(everything skipped), then re-run with the middle stage changed (it and its descendant re-run,
the first stage is reused, and the earlier runs stay on disk).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import run_cli

CHAIN = """
description: a small chain for tests
stages:
  base:
    overrides: [recipe=sft, recipe.max_steps=6]
  prefs:
    overrides: [recipe=dpo, recipe.max_steps=2]
    inputs: {policy: base}
  feedback:
    overrides: [recipe=kto, recipe.max_steps=2]
    inputs: {policy: prefs}
"""
SMALL = ["recipe.eval_every=0", "recipe.batch_size=8", "data.eval_limit=8"]


def _pipeline(root: Path, *args: str):
    return run_cli(["pipeline", str(root / "chain.yaml"), f"pipeline.dir={root / 'out'}", *SMALL, *args], cwd=root)


def _lineage(run_dir: Path) -> dict:
    return json.loads((run_dir / "lineage.json").read_text())


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    (root / "chain.yaml").write_text(CHAIN)
    first = _pipeline(root, "base.recipe.max_steps=7")
    out = root / "out"
    snapshot = {p.name: _lineage(p)["started_at"] for p in out.iterdir() if p.is_dir() and not p.is_symlink() and (p / "lineage.json").exists()}
    again = _pipeline(root, "base.recipe.max_steps=7")
    changed = _pipeline(root, "base.recipe.max_steps=7", "prefs.recipe.beta=0.3")
    return root, out, first, again, changed, snapshot


def test_stages_run_in_order_and_chain_their_checkpoints(chain):
    root, out, first, *_ = chain
    assert first.returncode == 0, first.describe()
    base, prefs, feedback = (out / name for name in ("base", "prefs", "feedback"))
    assert all(p.is_symlink() for p in (base, prefs, feedback))  # each points at the stage's latest run
    assert _lineage(base)["stage"] == "sft" and _lineage(prefs)["stage"] == "dpo" and _lineage(feedback)["stage"] == "kto"
    assert _lineage(prefs)["parents"]["policy"]["run_dir"] == str(base.resolve())
    assert _lineage(feedback)["parents"]["policy"]["run_dir"] == str(prefs.resolve())
    assert all(_lineage(p)["status"] == "finished" for p in (base, prefs, feedback))
    # Per-stage overrides reach one stage only; the file's own overrides reach theirs.
    steps = [json.loads(line)["step"] for line in (base / "metrics.jsonl").read_text().splitlines() if "loss" in json.loads(line)]
    assert steps == list(range(1, 8))
    assert json.loads((prefs / "eval.json").read_text())["step"] == 2
    assert "held-out accuracy after each stage" in first.stdout


def test_an_unchanged_rerun_skips_every_stage(chain):
    _, out, _, again, _, snapshot = chain
    assert again.returncode == 0, again.describe()
    assert again.stdout.count("skipped") == 3, again.stdout
    current = {p.name: _lineage(p)["started_at"] for p in out.iterdir() if p.is_dir() and not p.is_symlink() and (p / "lineage.json").exists() and p.name in snapshot}
    assert current == snapshot  # nothing was re-run or rewritten


def test_a_changed_stage_reruns_with_its_descendants_only(chain):
    _, out, _, _, changed, snapshot = chain
    assert changed.returncode == 0, changed.describe()
    assert changed.stdout.count("skipped") == 1  # the first stage only
    runs = sorted(p.name for p in out.iterdir() if p.is_dir() and not p.is_symlink() and p.name != "report")
    assert [r.split("-")[0] for r in runs] == ["base", "feedback", "feedback", "prefs", "prefs"]
    assert set(snapshot) < set(runs)  # the earlier runs are still there
    prefs = (out / "prefs").resolve()
    assert prefs.name not in snapshot
    assert "beta: 0.3" in (prefs / "config.yaml").read_text()
    assert _lineage(out / "feedback")["parents"]["policy"]["run_dir"] == str(prefs)


def test_runs_lists_every_run_with_its_parents(chain, alignctl):
    root, out, *_ = chain
    result = alignctl("runs", str(out), cwd=root)
    assert result.returncode == 0, result.describe()
    text = " ".join(result.stdout.split())
    for stage in ("sft", "dpo", "kto"):
        assert stage in text
    assert text.count("finished") == 5

    listed = alignctl("runs", str(out), "--json", cwd=root)  # the same, for scripts
    assert listed.returncode == 0, listed.describe()
    records = json.loads(listed.stdout)
    assert len(records) == 5 and {r["status"] for r in records} == {"finished"} and {"sft", "dpo", "kto"} <= {r["stage"] for r in records}
    for record in (r for r in records if r["run"].startswith("feedback")):  # KTO from a DPO run of the chain
        assert Path(record["parents"]["policy"]).name.startswith("prefs") and Path(record["parents"]["policy"]).is_dir()


def test_report_writes_pngs_and_a_table_matching_the_eval_files(chain, alignctl):
    root, out, *_ = chain
    result = alignctl("report", str(out), cwd=root)
    assert result.returncode == 0, result.describe()
    pngs = sorted((out / "report").glob("*.png"))
    assert {p.stem for p in pngs} == {"base", "prefs", "feedback", "accuracy"}
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    table = (out / "report" / "report.md").read_text()
    for stage in ("base", "prefs", "feedback"):
        accuracy = json.loads(((out / stage) / "eval.json").read_text())["eval_exact_match"]
        row = next(line for line in table.splitlines() if line.startswith(f"| {stage} "))
        assert f"{100 * accuracy:.1f} %" in row.split("|")[4], row


def test_eval_replays_a_pipeline_stage(chain, alignctl):
    root, out, *_ = chain
    prefs = (out / "prefs").resolve()
    result = alignctl("eval", f"run={prefs}", cwd=root)
    assert result.returncode == 0, result.describe()
    (evaluation,) = (prefs / "eval").iterdir()
    replayed = json.loads((evaluation / "eval.json").read_text())
    assert replayed["eval_exact_match"] == json.loads((prefs / "eval.json").read_text())["eval_exact_match"]


BAD_FILES = {
    "cycle": ("stages:\n  a: {overrides: [recipe=sft], inputs: {policy: b}}\n  b: {overrides: [recipe=dpo], inputs: {policy: a}}\n",
              "inputs.policy='b' comes later in the file"),
    "self": ("stages:\n  a: {overrides: [recipe=dpo], inputs: {policy: a}}\n", "names the stage itself (a cycle)"),
    "unknown input": ("stages:\n  a: {overrides: [recipe=sft]}\n  b: {overrides: [recipe=dpo], inputs: {policy: z}}\n",
                      "inputs.policy='z' is not a stage of this pipeline"),
    "unknown recipe": ("stages:\n  a: {overrides: [recipe=sfx]}\n", "stage a: recipe=sfx: unknown recipe option; did you mean sft?"),
    "no stages": ("description: nothing\n", "needs a 'stages:' mapping"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_a_bad_pipeline_file_is_one_line_before_anything_trains(alignctl, tmp_path, case):
    body, message = BAD_FILES[case]
    (tmp_path / "bad.yaml").write_text(body)
    result = alignctl("pipeline", "bad.yaml")
    assert result.returncode == 2 and "Traceback" not in result.output, result.describe()
    assert len(result.stderr_lines()) == 1 and message in result.stderr, result.describe()
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["rlfh"], "no such pipeline recipe; did you mean rlhf?"),
        (["dpo", "sfx.recipe.lr=1"], "'sfx' is neither a stage of this pipeline nor a config key; did you mean sft?"),
        (["dpo", "dpo.recipe.beta=-1"], "stage dpo: recipe.beta: must be > 0"),
        (["dpo", "-m", "dpo.recipe.beta=0.1,-1"], "stage dpo: recipe.beta: must be > 0"),  # a bad sweep value, found up front
    ],
)
def test_bad_pipeline_arguments_are_one_line(alignctl, tmp_path, args, message):
    result = alignctl("pipeline", *args)
    assert result.returncode == 2 and "Traceback" not in result.output, result.describe()
    assert len(result.stderr_lines()) == 1 and message in result.stderr, result.describe()
    assert not (tmp_path / "runs").exists()


def test_an_interrupted_stage_resumes_from_its_checkpoint_on_rerun(tmp_path):
    """SIGTERM during the first stage: exit 143 naming the command to run again; running it resumes
    that stage from its checkpoint (every step logged once) and goes on with the next stages."""
    import signal
    import subprocess
    import time

    (tmp_path / "chain.yaml").write_text(CHAIN)
    command = [sys.executable, "-m", "alignctl", "pipeline", str(tmp_path / "chain.yaml"), f"pipeline.dir={tmp_path / 'out'}", *SMALL,
               "base.recipe.max_steps=80", "base.recipe.batch_size=4"]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = list((tmp_path / "out").glob("base-*/metrics.jsonl"))
    deadline = time.monotonic() + 300
    while not (metrics and sum('"loss"' in line for line in metrics[0].read_text().splitlines()) >= 5):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
        metrics = list((tmp_path / "out").glob("base-*/metrics.jsonl"))
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 143, stderr
    assert "resume with: alignctl pipeline" in stderr, stderr
    base = metrics[0].parent
    assert _lineage(base)["status"] == "interrupted"
    stopped_at = json.loads((base / "checkpoint" / "alignctl.json").read_text())["step"]

    again = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert "resuming from step-" in " ".join(again.stdout.split())
    assert [r["from_step"] for r in _lineage(base)["resumes"]] == [stopped_at]
    steps = [json.loads(line)["step"] for line in (base / "metrics.jsonl").read_text().splitlines() if "loss" in json.loads(line)]
    assert steps == list(range(1, 81))
    assert all(_lineage(tmp_path / "out" / name)["status"] == "finished" for name in ("base", "prefs", "feedback"))
