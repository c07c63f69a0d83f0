"""Check the models a run starts from (model.name_or_path and inputs.*) before any of them loads.

Two mistakes are caught from the files alone, at start-up:

- a reward model (a sequence classifier, or its adapter) given where a policy goes. transformers
  would load its backbone into a causal LM, drop the scalar head, give it a fresh, untrained output
  layer and train that without a word;
- a safetensors file that is truncated or is not one (alignctl/runfiles.check_weights), or a
  config, adapter or tokenizer JSON file that does not parse, which a loader would report with a
  traceback, after the other models loaded.

Only local directories are read (a hub id is checked by its loader); no torch is imported.
"""

from __future__ import annotations

from pathlib import Path

from alignctl.core.errors import ConfigError
from alignctl.runs.runfiles import DamagedFile, check_weights, read_json

# inputs.* roles that hold a model (inputs.data holds a dataset).
MODEL_ROLES = ("policy", "init", "reward", "reference", "teacher")
# The small JSON files of a model or checkpoint directory that loaders parse.
JSON_FILES = ("config.json", "adapter_config.json", "tokenizer_config.json", "alignctl.json")


def local_model_dir(path: str | None) -> Path | None:
    """The local directory a model path stands for (a run directory: its checkpoint), else None."""
    if not path:
        return None
    directory = Path(path).expanduser()
    if (directory / "lineage.json").exists() and (directory / "checkpoint").exists():
        return directory / "checkpoint"
    return directory if directory.is_dir() else None


def sequence_classifier(directory: Path) -> str | None:
    """What makes `directory` a reward model ('LlamaForSequenceClassification', ...), or None."""
    adapter = directory / "adapter_config.json"
    if adapter.exists():
        return "a sequence-classification adapter" if read_json(adapter).get("task_type") == "SEQ_CLS" else None
    config = directory / "config.json"
    if not config.exists():
        return None
    architectures = read_json(config).get("architectures") or []
    if architectures and all(str(a).endswith("ForSequenceClassification") for a in architectures):
        return ", ".join(map(str, architectures))
    return None


def check_starting_points(run) -> None:
    """Refuse a reward model where the run expects a policy, and damaged weight files, naming the key."""
    models = [(f"inputs.{role}", run.inputs.get(role)) for role in MODEL_ROLES]
    models.append(("model.name_or_path", run.model.name_or_path))
    # The policy a stage trains (or keeps as its reference) must be a causal LM. recipe=reward starts
    # its scorer from model.name_or_path or inputs.init, where a reward model is fine.
    policies = ["inputs.policy", "inputs.reference", "inputs.teacher"]
    if run.recipe.stage != "reward" and not run.inputs.get("policy"):
        policies.append("model.name_or_path")
    for key, path in models:
        directory = local_model_dir(path)
        if directory is None:
            continue
        try:
            for name in JSON_FILES:
                if (directory / name).exists():
                    read_json(directory / name)
            check_weights(directory)
            kind = sequence_classifier(directory) if key in policies else None
        except DamagedFile as err:
            raise ConfigError(key, str(err)) from None
        if kind:
            raise ConfigError(
                key,
                f"{path} is a reward model ({kind}), not a policy; a policy is a causal LM (an sft, dpo, kto, grpo or "
                "ppo run). Give a reward model as inputs.reward (it scores ppo, grpo and pairs) or as inputs.init "
                "(the start of a reward or value model)",
            )
