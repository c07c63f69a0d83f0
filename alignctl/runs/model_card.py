"""A model card (README.md) for a checkpoint or an export, built from the run's lineage.json and config.yaml.

The Hugging Face hub reads the YAML block at the top (base_model, library_name, pipeline_tag, tags,
datasets); the body says what a reader needs to trust and reproduce the model: the recipe and its
hyperparameters, the adapter, the data and its fingerprint, the final metrics, the chain of runs it
descends from, and the command that trains it again. No torch: the CLI writes cards on export too.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import Any

import yaml

from alignctl.runs.runfiles import read_lineage, recorded_overrides

CARD = "README.md"
# The hyperparameters a card lists (those the recipe has), in this order; the full config is config.yaml.
HYPERPARAMETERS = ("max_steps", "lr", "batch_size", "grad_accum", "max_length", "beta", "loss_type", "nll_weight",
                   "num_generations", "max_new_tokens", "temperature", "epsilon", "advantage", "policy_loss", "seed")
SEQUENCE_SCORERS = ("reward",)  # stages whose checkpoint is a sequence classifier, not a causal LM


def _config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.yaml"
    return yaml.safe_load(path.read_text()) if path.exists() else {}


def _lineage(run_dir: Path) -> dict[str, Any]:
    try:
        return read_lineage(run_dir)
    except Exception:  # a parent moved or damaged: the card says so instead of failing the run
        return {}


def ancestry(run_dir: Path, limit: int = 32) -> list[dict[str, Any]]:
    """This run, then the run it started from (inputs.policy, else inputs.init, else any parent), and so
    on up the chain: one record per run (stage, directory, role through which the child used it)."""
    chain: list[dict[str, Any]] = []
    current, role = run_dir, None
    while current is not None and len(chain) < limit:
        lineage = _lineage(current)
        chain.append({"run_dir": str(current), "stage": lineage.get("stage", "?"), "role": role,
                      "final_metrics": lineage.get("final_metrics", {}), "config": _config(current)})
        parents = lineage.get("parents", {})
        role = next((r for r in ("policy", "init") if r in parents), next(iter(parents), None))
        current = Path(parents[role]["run_dir"]) if role and parents[role].get("run_dir") else None
    return chain


def base_model(chain: list[dict[str, Any]]) -> str | None:
    """The model the chain's first run started from: a hub id or directory, or None for the built-in tiny model."""
    model = chain[-1]["config"].get("model", {}) if chain else {}
    return model.get("name_or_path") if model.get("source") != "tiny" else None


def _datasets(config: dict[str, Any]) -> list[str]:
    """Dataset names the hub can link: a hub id (owner/name that is not a local path); local files are in the body."""
    path = (config.get("data") or {}).get("path")
    if isinstance(path, str) and path.count("/") == 1 and not os.path.exists(path) and not path.startswith((".", "~")):
        return [path]
    return []


def card_text(run_dir: Path, export: dict[str, Any] | None = None) -> str:
    """The README.md of `run_dir`'s checkpoint (or of an export of it, described by `export`)."""
    chain = ancestry(run_dir)
    lineage, config = _lineage(run_dir), chain[0]["config"]
    stage = lineage.get("stage", "?")
    adapter = (config.get("adapter") or {}).get("kind", "none")
    merged = bool(export and export.get("merge"))
    base = base_model(chain)
    meta: dict[str, Any] = {
        "library_name": "peft" if adapter != "none" and not merged else "transformers",
        "pipeline_tag": "text-classification" if stage in SEQUENCE_SCORERS else "text-generation",
        "tags": ["alignctl", stage, *([adapter] if adapter != "none" else [])],
    }
    if base:
        meta["base_model"] = base
    if datasets := _datasets(config):
        meta["datasets"] = datasets
    recipe, data = config.get("recipe") or {}, config.get("data") or {}
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
             f"# {Path(lineage.get('run_dir', run_dir)).name}: {stage}" + (" (exported, adapter merged)" if merged else ""), "",
             f"Trained with alignctl, recipe `{stage}` from "
             f"{'`' + base + '`' if base else 'the built-in tiny model'}"
             f"{f', adapter `{adapter}`' if adapter != 'none' else ''}. Status: {lineage.get('status', '?')}.", ""]
    lines += ["## Hyperparameters", "", "| key | value |", "|---|---|"]
    lines += [f"| `recipe.{key}` | {recipe[key]} |" for key in HYPERPARAMETERS if recipe.get(key) is not None]
    if adapter != "none":
        lines += [f"| `adapter.{key}` | {value} |" for key, value in (config.get("adapter") or {}).items() if key in ("r", "alpha", "dropout", "target_modules")]
    source = data.get("path") or data.get("task") or "the built-in arithmetic task"
    lines += ["", "## Data", "", f"- source: `{source}`", f"- fingerprint: `{lineage.get('data_fingerprint')}`", ""]
    if metrics := lineage.get("final_metrics"):
        lines += ["## Final metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |" for key, value in sorted(metrics.items())]
        lines.append("")
    lines += ["## Lineage", "", "| run | stage | used as | headline |", "|---|---|---|---|"]
    for link in chain:
        headline = next((f"{k} {v:.4g}" for k, v in link["final_metrics"].items() if k.startswith("eval_") and isinstance(v, float)), "")
        lines.append(f"| `{link['run_dir']}` | {link['stage']} | {link['role'] and 'inputs.' + link['role'] or 'this run'} | {headline} |")
    command = "alignctl train " + " ".join(shlex.quote(o) for o in recorded_overrides(run_dir, without=("hydra.", "resume")))
    lines += ["", "## Reproduce", "", "```bash", command.strip(), "```", "",
              f"alignctl {lineage.get('versions', {}).get('alignctl')}, git `{lineage.get('git_sha')}`, "
              f"config hash `{lineage.get('config_hash')}`; the full config is in the run's config.yaml."]
    if export:
        lines += ["", "## Export", "", "```json", json.dumps(export, indent=2, default=str), "```"]
    return "\n".join(lines) + "\n"


def write_card(folder: Path, run_dir: Path, export: dict[str, Any] | None = None) -> Path:
    """Write `folder`/README.md atomically (a peft adapter's own stub card is replaced)."""
    path = folder / CARD
    tmp = folder / f".{CARD}.tmp-{os.getpid()}"
    tmp.write_text(card_text(run_dir, export))
    os.replace(tmp, path)
    return path
