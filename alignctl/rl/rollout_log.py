"""The log of an online RL run's rollouts: which engine sampled them, and every `samples_every`-th
rollout's completions, as a table in the run's output and in full in <run dir>/samples.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from rich.table import Table
from rich.text import Text

from alignctl.rl.online_rl import ScoredRollout
from alignctl.rl.rollout import ENGINES
from alignctl.train.metrics import keep_until_step


def readable_prompt(prompt: str | list[dict]) -> str:
    """A prompt as a person reads it in a log: a conversation's last user message, or the text."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return users[-1] if users else (prompt[-1]["content"] if prompt else "")


def samples_table(step: int, prompts: list, texts: list[str], rewards: torch.Tensor, count: int = 6) -> Table:
    """The first `count` samples, whole: the prompt as `readable_prompt` shows it, the completion's full text."""
    table = Table(title=f"samples at step {step}", show_header=True, header_style="bold", show_lines=True)
    table.add_column("prompt", ratio=1)
    table.add_column("completion", ratio=2)
    table.add_column("reward", justify="right")
    for prompt, text, reward in list(zip(prompts, texts, rewards.tolist()))[:count]:
        # Text, not str: a completion's brackets are what the model wrote, never rich markup.
        table.add_row(Text(readable_prompt(prompt)), Text(text), f"{reward:.3f}")
    return table


def sample_records(step: int, rollout: ScoredRollout, rewards: torch.Tensor) -> list[dict]:
    """One JSON-ready record per completion of a rollout: its step, prompt, completion and rewards."""
    per_source = {name: values.tolist() for name, values in rollout.per_source.items()}
    return [{"step": step, "prompt": prompt, "completion": text, "reward": reward, "rewards": {name: values[i] for name, values in per_source.items()},
             "truncated": truncated}
            for i, (prompt, text, reward, truncated) in enumerate(zip(rollout.prompts, rollout.texts, rewards.tolist(), rollout.completions.truncated))]


class RolloutLog:
    """What a run's log says about its rollouts: which engine sampled them (when it first does, and if
    it changes), and every `every`-th rollout's samples: a table of a few, and all of them appended to
    samples.jsonl in the run directory. `steps_per_rollout` optimiser steps follow each rollout."""

    def __init__(self, logger, run_dir: Path, every: int, steps_per_rollout: int):
        self.logger, self.path, self.every, self.steps_per_rollout = logger, Path(run_dir) / "samples.jsonl", every, steps_per_rollout
        self.engine = ""
        self.written = False

    def after(self, number: int, rollout: ScoredRollout, rewards: torch.Tensor) -> None:
        """Log rollout `number` (1-based); `rewards` are the ones the update uses."""
        if rollout.completions.engine != self.engine:
            self.engine = rollout.completions.engine
            self.logger.note(f"rollouts are sampled by {ENGINES.get(self.engine, self.engine)}")
        if not self.every or (number - 1) % self.every:
            return
        step = (number - 1) * self.steps_per_rollout + 1  # the first optimiser step that trains on it
        self.logger.note(samples_table(step, rollout.prompts, rollout.texts, rewards))
        if self.logger.enabled:  # the main process only
            if not self.written:  # a resumed run samples again from here on: drop what an earlier life logged from here
                keep_until_step(self.path, step - 1)
                self.written = True
            with self.path.open("a") as file:
                file.writelines(json.dumps(record) + "\n" for record in sample_records(step, rollout, rewards))
