"""Metrics out: metrics.jsonl (one line per optimiser step), a rich progress bar, TensorBoard, the
experiment trackers of alignctl/train/trackers.py, a summary.

Metric names follow TRL (loss, learning_rate, grad_norm, num_tokens, mean_token_accuracy,
eval_loss, ...) so dashboards built for TRL keep working.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from alignctl.core.console import console
from alignctl.train.trackers import Trackers

# Shown on the progress bar, in this order, when present.
PROGRESS_KEYS = ("loss", "reward", "objective/scores", "objective/kl", "rewards/accuracies", "rewards/margins", "accuracy", "learning_rate", "tokens_per_second")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.3e}"
        return f"{value:.4f}"
    return str(value)


class MetricsLogger:
    def __init__(self, run_dir: Path, total_steps: int, start_step: int, tensorboard: bool, log_every: int, enabled: bool = True,
                 trackers: Trackers | None = None):
        self.enabled = enabled
        # W&B, MLflow, trackio: fed every line; ended by the session once lineage.json says how the run ended.
        self.trackers = trackers or Trackers(run_dir)
        self.log_every = log_every
        self.last: dict[str, Any] = {}
        # A run that starts over in an existing directory replaces its metrics; a resumed one keeps the
        # lines up to its checkpoint (those logged after it are about to be trained again) and appends.
        if enabled and start_step:
            keep_until_step(run_dir / "metrics.jsonl", start_step)
        self._file = (run_dir / "metrics.jsonl").open("a" if start_step else "w") if enabled else None
        self._tb = None
        if tensorboard and enabled:
            from torch.utils.tensorboard import SummaryWriter  # optional dependency, imported only when asked

            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[metrics]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
            # On a terminal the bar redraws in place. Piped or in a log file a bar cannot redraw (rich
            # would print it once, at the end): the plain `step N:` lines of advance() stand in for it.
            disable=not enabled or not console.is_terminal,
            transient=False,
        )
        self._task = self._progress.add_task("train", total=total_steps, completed=start_step, metrics="")
        self._progress.start()

    def log(self, record: dict[str, Any]) -> None:
        """Record one line (a train step or an evaluation); `record` must carry `step`."""
        if not self.enabled:
            return
        clean = {k: (float(v) if hasattr(v, "__float__") and not isinstance(v, (int, bool)) else v) for k, v in record.items()}
        self.last.update(clean)
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in clean.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, clean["step"])
        self.trackers.log(clean)

    def advance(self, step: int) -> None:
        if not self.enabled:
            return
        fields = "  ".join(f"{k}={_fmt(self.last[k])}" for k in PROGRESS_KEYS if k in self.last)
        if step % self.log_every == 0 or step == self._progress.tasks[0].total:
            self._progress.update(self._task, completed=step, metrics=fields)
            if not console.is_terminal and fields:  # nothing logged yet (step 0 of a resume): no empty line
                print(f"step {step}: {fields}", file=sys.stdout, flush=True)
        else:
            self._progress.update(self._task, completed=step)

    def note(self, message: str) -> None:
        if self.enabled:
            self._progress.console.print(message)

    def close(self) -> None:
        if self.enabled:
            self._progress.stop()
            self._file.close()
            if self._tb is not None:
                self._tb.close()


def keep_until_step(path: Path, step: int) -> None:
    """Drop the lines of a metrics.jsonl logged after `step` (atomically)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if (at := _step_of(line)) is not None and at <= step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


def _step_of(line: str) -> int | None:
    """The step of one metrics line; None for a blank line or one cut short by a kill."""
    try:
        return int(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return None


def summary_table(title: str, rows: dict[str, Any]) -> Table:
    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in rows.items():
        table.add_row(key, _fmt(value))
    return table
