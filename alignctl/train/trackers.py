"""Experiment trackers beside metrics.jsonl: Weights & Biases, MLflow and trackio (logger=wandb,
logger=[tensorboard,mlflow,trackio], ...).

What a TRL user finds there is what TRL's trainers report (transformers' integration callbacks): W&B
and trackio get `train/<metric>` and `eval/<metric>` (TRL's `rewrite_logs`) against `train/global_step`;
MLflow gets the bare names (`loss`, `eval_loss`) at the step. The tracker run carries the run's
resolved config (MLflow: as flattened params), and when the run ends, config.yaml and lineage.json
(which then says how it ended) as an artifact. A resumed run continues the same tracker run: the
ids sit in <run dir>/trackers.json.

Only the main process reports: `start_trackers` is called on rank 0 alone. Each package is imported
only when its tracker is asked for (the config check has already found it installed).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Protocol

from alignctl.config.schema import LoggerConfig, MLflowConfig, TrackioConfig, WandbConfig
from alignctl.core.console import console
from alignctl.core.errors import UserError
from alignctl.runs.rundir import RunDir, write_json_atomic

IDS_FILE = "trackers.json"
# What a finished run's tracker keeps of its run directory.
RECORD_FILES = ("config.yaml", "lineage.json")
ARTIFACT_TYPE = "alignctl-run"
STEP_KEY = "train/global_step"  # TRL's x axis on W&B and trackio


def trl_names(metrics: dict[str, float]) -> dict[str, float]:
    """TRL's names on W&B and trackio (transformers' rewrite_logs): eval_x -> eval/x, test_x -> test/x,
    anything else -> train/x (objective/kl -> train/objective/kl)."""
    renamed = {}
    for key, value in metrics.items():
        for prefix in ("eval", "test"):
            if key.startswith(prefix + "_"):
                renamed[f"{prefix}/{key[len(prefix) + 1:]}"] = value
                break
        else:
            renamed[f"train/{key}"] = value
    return renamed


def mlflow_names(metrics: dict[str, float]) -> dict[str, float]:
    """TRL's names on MLflow: the logged keys, with characters MLflow refuses replaced as transformers does."""
    return {re.sub(r"[^0-9A-Za-z_\-\. :/]", "_", key): value for key, value in metrics.items()}


MAX_PARAM_LENGTH = 6000  # MLflow refuses longer param values


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as MLflow params: dotted keys (recipe.lr), values as text."""
    params: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            params.update(flat_params(value, f"{prefix}{key}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            params[f"{prefix}{key}"] = text[:MAX_PARAM_LENGTH]
    return params


def first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def log_record_artifact(artifact_class: Any, run: Any, name: str, files: list[Path], status: str) -> None:
    """The run's record files as one artifact of `run` (W&B and trackio share the Artifact API)."""
    if not files:
        return
    artifact = artifact_class(name, type=ARTIFACT_TYPE, metadata={"status": status})
    for path in files:
        artifact.add_file(str(path))
    run.log_artifact(artifact)


class Tracker(Protocol):
    def ids(self) -> dict[str, str]: ...  # what a resume needs to continue this tracker run
    def log(self, step: int, metrics: dict[str, float]) -> None: ...
    def finish(self, files: list[Path], status: str) -> None: ...  # status: lineage.json's


class WandbTracker:
    def __init__(self, settings: WandbConfig, logger: LoggerConfig, run: RunDir, name: str, earlier: dict[str, str]):
        import wandb

        self.run = wandb.init(
            project=logger.project, entity=settings.entity, name=name, tags=list(logger.tags),
            job_type=run.lineage["stage"],
            id=earlier.get("id"), resume="allow" if earlier else None,  # a fresh run: W&B picks the id, kept for a resume
            # Read here, not left to wandb: it reads its environment once per process, at the first run.
            mode=settings.mode.value if settings.mode else os.environ.get("WANDB_MODE"),
            dir=os.environ.get("WANDB_DIR") or str(run.path),  # WANDB_DIR wins, as with TRL
        )
        # After init, so that a resume trained further (recipe.max_steps=400) may change a value.
        self.run.config.update(run.config, allow_val_change=True)
        self.run.define_metric(STEP_KEY)
        self.run.define_metric("*", step_metric=STEP_KEY, step_sync=True)

    def ids(self) -> dict[str, str]:
        return {"id": self.run.id}

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log({**trl_names(metrics), STEP_KEY: step})

    def finish(self, files: list[Path], status: str) -> None:
        import wandb

        log_record_artifact(wandb.Artifact, self.run, f"run-{self.run.id}", files, status)
        self.run.finish(exit_code=0 if status == "finished" else 1)


DATABASES = ("sqlite", "postgresql", "mysql", "mssql")  # MLflow's SQLAlchemy stores (the full mlflow package)


class MLflowTracker:
    STATUS = {"finished": "FINISHED", "interrupted": "KILLED"}  # anything else: FAILED
    PARAMS_PER_CALL = 100  # MLflow's limit for one log_batch

    def __init__(self, settings: MLflowConfig, logger: LoggerConfig, run: RunDir, name: str, earlier: dict[str, str]):
        import mlflow
        from mlflow import MlflowClient
        from mlflow.entities import Param

        uri = settings.tracking_uri or mlflow.get_tracking_uri()  # MLFLOW_TRACKING_URI, else MLflow's default
        if uri.split(":", 1)[0].split("+", 1)[0] in DATABASES and importlib.util.find_spec("sqlalchemy") is None:
            raise RuntimeError(f"the store {uri} is a database, which mlflow-skinny cannot open: pip install mlflow, "
                               "or set logger.mlflow.tracking_uri (or MLFLOW_TRACKING_URI) to a tracking server")
        self.client = MlflowClient(tracking_uri=uri)
        if earlier.get("run_id"):  # params are already there, and MLflow keeps them immutable
            self.run_id = earlier["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            return
        experiment = self.client.get_experiment_by_name(logger.project)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(logger.project)
        tags = {**{tag: "" for tag in logger.tags}, "alignctl.stage": run.lineage["stage"], "alignctl.run_dir": str(run.path.resolve())}
        self.run_id = self.client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
        params = [Param(key, value) for key, value in flat_params(run.config).items()]
        for start in range(0, len(params), self.PARAMS_PER_CALL):
            self.client.log_batch(self.run_id, params=params[start : start + self.PARAMS_PER_CALL])

    def ids(self) -> dict[str, str]:
        return {"run_id": self.run_id}

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(key, value, now, step) for key, value in mlflow_names(metrics).items()])

    def finish(self, files: list[Path], status: str) -> None:
        for path in files:
            self.client.log_artifact(self.run_id, str(path), artifact_path="alignctl")
        self.client.set_terminated(self.run_id, self.STATUS.get(status, "FAILED"))


class TrackioTracker:
    def __init__(self, settings: TrackioConfig, logger: LoggerConfig, run: RunDir, name: str, earlier: dict[str, str]):
        import trackio

        # trackio has no tags: they travel in the config. It names runs; a resume continues the named one.
        config = {**run.config, "tags": list(logger.tags)}
        self.run = trackio.init(project=logger.project, name=earlier.get("name", name), config=config, space_id=settings.space_id,
                                resume="allow" if earlier else "never")

    def ids(self) -> dict[str, str]:
        return {"name": self.run.name}

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log({**trl_names(metrics), STEP_KEY: step}, step=step)

    def finish(self, files: list[Path], status: str) -> None:
        import trackio

        log_record_artifact(trackio.Artifact, self.run, f"run-{self.run.name}", files, status)
        if trackio.context_vars.current_run.get() is self.run:
            trackio.finish()  # also forgets it as trackio's current run, which its exit handler would finish again
        else:
            self.run.finish()


BUILDERS = {"wandb": (WandbTracker, "Weights & Biases"), "mlflow": (MLflowTracker, "MLflow"), "trackio": (TrackioTracker, "trackio")}


class Trackers:
    """The trackers of one run, fed every metrics record; `close` ends them once lineage.json is final."""

    def __init__(self, run_dir: Path, started: dict[str, Tracker] | None = None):
        self.run_dir = run_dir
        self.started = dict(started or {})
        self.silenced: set[str] = set()  # trackers whose logging failed: still closed, fed no more

    def log(self, record: dict[str, Any]) -> None:
        """One metrics.jsonl line (`step` and its values); text and non-finite values stay out, as on TensorBoard.
        A tracker whose logging fails (a server gone) is one line and logs no more; training goes on."""
        if not self.started:
            return
        metrics = {k: float(v) for k, v in record.items()
                   if k != "step" and isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}
        for key, tracker in self.started.items():
            if key in self.silenced:
                continue
            try:
                tracker.log(int(record["step"]), metrics)
            except Exception as err:  # noqa: BLE001 - a dashboard's failure must not end hours of training
                self.silenced.add(key)
                console.print(f"logger.{key}: {BUILDERS[key][1]} stopped taking metrics at step {record['step']} ({first_line(err)}); "
                              "training goes on, metrics.jsonl has every step", markup=False)

    def close(self, status: str) -> None:
        """End every tracker run (its record files as an artifact, its status from lineage.json's); once."""
        files = [self.run_dir / name for name in RECORD_FILES if (self.run_dir / name).exists()]
        started, self.started = self.started, {}
        for key, tracker in started.items():
            try:
                tracker.finish(files, status)
            except Exception as err:  # noqa: BLE001 - a tracker that fails to close must not hide how the run ended
                console.print(f"logger.{key}: {BUILDERS[key][1]} did not close cleanly: {first_line(err)}")


def start_trackers(logger: LoggerConfig, run: RunDir, resumed: bool) -> Trackers:
    """Start the trackers `logger` asks for (none on a process other than the main one: pass run.enabled
    False), continuing a resumed run's tracker runs. A tracker that cannot start (no account, a store
    that refuses) is one line naming it; the ones already started are closed as failed."""
    if not run.enabled or not logger.trackers():
        return Trackers(run.path)
    ids_file = run.path / IDS_FILE
    earlier = json.loads(ids_file.read_text()) if resumed and ids_file.exists() else {}
    name = logger.run_name or run.path.resolve().name
    trackers = Trackers(run.path)
    for key in logger.trackers():
        builder, title = BUILDERS[key]
        try:
            trackers.started[key] = builder(getattr(logger, key), logger, run, name, earlier.get(key, {}))
        except Exception as err:  # noqa: BLE001 - any failure of a third-party client is reported the same way
            trackers.close("failed")
            message = f"logger.{key}: {title} could not start a run: {first_line(err)}"
            run.fail(message)
            raise UserError(message) from None
    write_json_atomic(ids_file, {key: tracker.ids() for key, tracker in trackers.started.items()})
    return trackers
