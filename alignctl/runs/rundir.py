"""The run directory: the unit of lineage.

Every run writes ``config.yaml`` (the resolved config) and ``lineage.json``: stage, status, config
hash, git sha, package versions, data fingerprint, parents (earlier runs it started from) and final
metrics. Pipelines compare config hashes and parents to decide whether a stage must run again.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from alignctl.core import allocator
from alignctl.runs.parents import ALLOW_RUNNING, parent_paths
from alignctl.runs.parents import record as parent_record
from alignctl.runs.resume import resume_command
from alignctl.runs.runfiles import RECORDED_OVERRIDES, read_lineage

PACKAGES = ("alignctl", "torch", "transformers", "peft", "datasets", "hydra-core", "bitsandbytes")
# Keys that change what is displayed or how a run is started, not what it trains: left out of the
# config hash (a resumed run is the same run).
UNHASHED = ("logger", "hydra", "resume")


def config_hash(cfg: DictConfig) -> str:
    body = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in UNHASHED}
    if isinstance(body.get("inputs"), dict):  # a permission, not what is trained
        body["inputs"] = {k: v for k, v in body["inputs"].items() if k != ALLOW_RUNNING}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]


def git_sha() -> str | None:
    """The commit of the alignctl source tree, with '-dirty' when it has local changes (None outside git)."""
    here = Path(__file__).resolve().parents[1]  # the alignctl package
    try:
        sha = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--", "."], capture_output=True, text=True, timeout=5)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return None


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found | {"host_allocator": allocator.active()}


def write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)


class RunDir:
    """Writes config.yaml and keeps lineage.json up to date for one run."""

    def __init__(self, path: Path, cfg: DictConfig, stage: str, parents: dict[str, str | None], data_fingerprint: str | None,
                 resumed_from: int | None = None, enabled: bool = True):
        self.path = path
        self.enabled = enabled  # False in every process but rank 0 of a multi-process run
        path.mkdir(parents=True, exist_ok=True)
        earlier = read_lineage(path) if resumed_from is not None else {}
        # The resolved config, as config.yaml holds it (experiment trackers report it too).
        self.config: dict[str, Any] = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "hydra"}
        if enabled:
            (path / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(self.config)))
        self.lineage: dict[str, Any] = {
            "stage": stage,
            "status": "running",
            "run_dir": str(path.resolve()),
            # Relative paths on the command line (inputs.policy=runs/sft) are relative to this: `alignctl eval` replays them from anywhere.
            "launched_from": os.getcwd(),
            "config_hash": config_hash(cfg),
            # unset inputs are not parents; each parent with the checkpoint it resolved to (alignctl/runs/parents.py)
            "parents": {role: parent_record(p) for role, p in parent_paths(parents).items()} if enabled else {},
            "data_fingerprint": data_fingerprint,
            "git_sha": git_sha(),
            "versions": versions(),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "final_metrics": {},
        }
        if resumed_from is not None:  # the same run, continued: keep when it started, record each resume
            now = self.lineage["started_at"]
            self.lineage["started_at"] = earlier.get("started_at", now)
            self.lineage["resumes"] = [*earlier.get("resumes", []), {"from_step": resumed_from, "at": now}]
        self._write()

    def _write(self) -> None:
        if self.enabled:
            write_json_atomic(self.path / "lineage.json", self.lineage)

    def finish(self, metrics: dict[str, float], **record: object) -> None:
        """`record`: what else the run's outcome says, e.g. guard_stop (where and why recipe.guard=stop ended it)."""
        self.lineage.update(status="finished", finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"), final_metrics=metrics, **record)
        self._write()

    def interrupt(self, signal_name: str, step: int | None) -> None:
        self.lineage.update(status="interrupted", error=f"{signal_name} after step {step}", resume_command=resume_command(self.path))
        self._write()

    def fail(self, reason: str) -> None:
        self.lineage.update(status="failed", error=reason)
        self._write()


def record_overrides(run_dir: Path, overrides: list[str]) -> None:
    import yaml

    (run_dir / RECORDED_OVERRIDES).parent.mkdir(parents=True, exist_ok=True)
    (run_dir / RECORDED_OVERRIDES).write_text(yaml.safe_dump(overrides))


def fingerprint_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]
