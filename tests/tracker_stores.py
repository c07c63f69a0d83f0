"""What the experiment trackers wrote, read back from their local stores (no network): W&B's offline
transaction log, MLflow's file store, trackio's SQLite database. Shared by the unit and integration
tests of alignctl/train/trackers.py; `offline_trackers` points every tracker at a temporary folder."""

from __future__ import annotations

import json
import struct
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest


def offline_trackers(monkeypatch: pytest.MonkeyPatch, root: Path) -> dict[str, str]:
    """Every tracker's store under `root`, nothing reaching a network (and nothing waiting on one)."""
    env = {
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(root / "wandb"),
        "WANDB_SILENT": "true",
        "WANDB_DISABLE_GIT": "true",
        "MLFLOW_TRACKING_URI": f"file:{root / 'mlruns'}",
        "MLFLOW_ALLOW_FILE_STORE": "true",  # MLflow 3 keeps its file store only on request (the database store needs full mlflow)
        "MLFLOW_DISABLE_TELEMETRY": "true",  # MLflow 3 would send usage events from a background thread
        "TRACKIO_DIR": str(root / "trackio"),
        "HF_HUB_OFFLINE": "1",
    }
    (root / "wandb").mkdir(parents=True, exist_ok=True)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    trackio_utils = sys.modules.get("trackio.utils")
    # trackio reads TRACKIO_DIR once, when first imported (by the first test here): later tests keep that
    # temporary folder and stay apart by their project names.
    assert trackio_utils is None or Path(trackio_utils.TRACKIO_DIR).is_relative_to(Path(tempfile.gettempdir())), trackio_utils.TRACKIO_DIR
    return env


@dataclass
class WandbRun:
    """One offline W&B run: its id, name, tags, config, history rows and artifacts (name -> files)."""

    id: str = ""
    name: str = ""
    project: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    artifacts: dict[str, list[str]] = field(default_factory=dict)
    exit_code: int | None = None


BLOCK, HEADER = 32768, 7  # the .wandb file is a LevelDB log: 32 KiB blocks of (crc, length, type) records


def wandb_records(path: Path):
    """The protobuf records of a run-<id>.wandb transaction log."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    position, pending = HEADER, b""
    while position + HEADER <= len(data):
        left = BLOCK - position % BLOCK
        _crc, length, kind = struct.unpack("<IHB", data[position : position + HEADER])
        if left < HEADER or (kind == 0 and length == 0):  # the rest of a block is padding
            position += left
            continue
        pending += data[position + HEADER : position + HEADER + length]
        position += HEADER + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_runs(wandb_dir: Path, timeout: float = 20.0) -> list[WandbRun]:
    """Every offline run under `wandb_dir` (a WANDB_DIR, or a run directory), oldest first. W&B's service
    process may still be writing a log when finish() returns: wait until each one holds its exit record."""
    deadline = time.monotonic() + timeout
    while True:
        runs = _read_wandb_runs(wandb_dir)
        if all(run.exit_code is not None for run in runs) or time.monotonic() > deadline:
            return runs
        time.sleep(0.05)


def _read_wandb_runs(wandb_dir: Path) -> list[WandbRun]:
    runs = []
    for log in sorted(wandb_dir.glob("wandb/offline-run-*/run-*.wandb")):
        run = WandbRun()
        for record in wandb_records(log):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run.id, run.name, run.project, run.tags = record.run.run_id, record.run.display_name, record.run.project, list(record.run.tags)
                run.config.update({i.key: json.loads(i.value_json) for i in record.run.config.update if not i.key.startswith("_")})
            elif kind == "config":  # run.config.update after init
                run.config.update({i.key: json.loads(i.value_json) for i in record.config.update if not i.key.startswith("_")})
            elif kind == "history":
                run.history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
            elif kind == "artifact":
                run.artifacts[record.artifact.name] = [entry.path for entry in record.artifact.manifest.contents]
            elif kind == "exit":
                run.exit_code = record.exit.exit_code
        runs.append(run)
    return runs


def wandb_series(run: WandbRun, key: str) -> list[tuple[int, float]]:
    """(train/global_step, value) of one metric, as a W&B chart against TRL's x axis shows it."""
    return [(row["train/global_step"], row[key]) for row in run.history if key in row]


def mlflow_run(tracking_uri: str, project: str):
    """The only MLflow run of experiment `project`, and its client."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(project)
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return client, runs[0]


def mlflow_series(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))]


def trackio_series(project: str, run: str, key: str) -> list[tuple[int, float]]:
    from trackio.sqlite_storage import SQLiteStorage

    return [(row["step"], row[key]) for row in SQLiteStorage.get_logs(project=project, run=run) if key in row]


def trackio_config(project: str, run: str) -> dict:
    from trackio.sqlite_storage import SQLiteStorage

    return SQLiteStorage.get_run_config(project=project, run=run) or {}


def trackio_artifacts(project: str) -> list[dict]:
    from trackio.sqlite_storage import SQLiteStorage

    return SQLiteStorage.list_artifacts(project=project)
