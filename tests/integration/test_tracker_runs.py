"""logger=[wandb,mlflow,trackio] through the CLI: a few steps of the tiny model, and each tracker's local
store read back (W&B offline, MLflow's file store, trackio's database) holds metrics.jsonl's losses under
TRL's names; a tracker whose package is missing stops the command before anything runs, in one line."""

from __future__ import annotations

import importlib.util
import json

import pytest
import tracker_stores as stores
from stage_runs import StageRun

INSTALLED = [name for name in ("wandb", "mlflow", "trackio") if importlib.util.find_spec(name) is not None]
STEPS = ["recipe.max_steps=3", "recipe.eval_every=2", "recipe.batch_size=8", "data.eval_limit=8"]


@pytest.mark.skipif(not INSTALLED, reason="no tracker installed (pip install 'alignctl[wandb,mlflow,trackio]')")
def test_each_tracker_holds_the_losses_of_metrics_jsonl_across_a_resume(alignctl, tmp_path, monkeypatch):
    env = stores.offline_trackers(monkeypatch, tmp_path / "stores")
    project = f"cli-{tmp_path.name}"  # trackio's store is shared by the session's tests: one project each
    run_dir = tmp_path / "runs" / "sft-trackers"
    first = alignctl("train", "recipe=sft", *STEPS, "recipe.max_steps=2", f"logger=[{','.join(INSTALLED)}]", f"logger.project={project}",
                     "logger.tags=[cli]", f"hydra.run.dir={run_dir}", env=env)
    StageRun("trackers", run_dir, first).assert_finished()
    ids = json.loads((run_dir / "trackers.json").read_text())
    assert sorted(ids) == sorted(INSTALLED)
    # Trained further: the same tracker runs continue (the resume replays the first command, logger included).
    run = StageRun("trackers", run_dir, alignctl("train", f"resume={run_dir}", "recipe.max_steps=3", env=env))
    run.assert_finished()
    assert json.loads((run_dir / "trackers.json").read_text()) == ids
    losses = [(r["step"], r["loss"]) for r in run.train_records()]
    evals = [(r["step"], r["eval_loss"]) for r in run.records() if "eval_loss" in r]
    assert [s for s, _ in losses] == [1, 2, 3] and [s for s, _ in evals] == [0, 2, 3]

    if "wandb" in INSTALLED:
        logged = stores.wandb_runs(tmp_path / "stores" / "wandb")  # offline, each process writes its own log of the run
        assert [(r.id, r.name, r.project, r.tags, r.exit_code) for r in logged] == [(ids["wandb"]["id"], "sft-trackers", project, ["cli"], 0)] * 2
        assert [point for r in logged for point in stores.wandb_series(r, "train/loss")] == losses
        assert [point for r in logged for point in stores.wandb_series(r, "eval/loss")] == evals
        assert logged[1].config["recipe"]["max_steps"] == 3 and "hydra" not in logged[1].config
        assert sorted(logged[1].artifacts[f"run-{ids['wandb']['id']}"]) == ["config.yaml", "lineage.json"]
    if "mlflow" in INSTALLED:
        client, logged = stores.mlflow_run(env["MLFLOW_TRACKING_URI"], project)  # one run, reopened
        assert logged.info.run_id == ids["mlflow"]["run_id"] and logged.info.status == "FINISHED"
        assert stores.mlflow_series(client, logged.info.run_id, "loss") == losses
        assert stores.mlflow_series(client, logged.info.run_id, "eval_loss") == evals
        assert logged.data.params["recipe.max_steps"] == "2"  # MLflow params are immutable: the first run's
    if "trackio" in INSTALLED:
        assert stores.trackio_series(project, "sft-trackers", "train/loss") == losses
        assert stores.trackio_series(project, "sft-trackers", "eval/loss") == evals


def test_a_missing_tracker_is_one_line_naming_its_extra(alignctl, tmp_path, monkeypatch):
    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else found(name, *a))
    run_dir = tmp_path / "runs" / "never"
    result = alignctl("train", "recipe=sft", *STEPS, "logger=[tensorboard,mlflow]", f"hydra.run.dir={run_dir}")
    assert result.returncode == 2, result.describe()
    assert result.stderr_lines() == ["alignctl: error: logger: mlflow is not installed: pip install 'alignctl[mlflow]'"], result.describe()
    assert "Traceback" not in result.output and not run_dir.exists()
