"""Validation: merge a composed Hydra config over the dataclasses of alignctl.config.schema.

A wrong type, an unknown key, a missing value or an out-of-range value becomes a `ConfigError` whose
message names the key and what would be valid, before any model loads.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import types
import typing
from enum import Enum
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import (
    ConfigKeyError,
    InterpolationResolutionError,
    MissingMandatoryValue,
    OmegaConfBaseException,
)

from alignctl.config.bounds import check_node
from alignctl.config.schema import (
    ADAPTER_SCHEMAS,
    RECIPE_SCHEMAS,
    DataConfig,
    DPOLossType,
    HardwareConfig,
    LoggerConfig,
    ModelConfig,
    Reference,
    RolloutEngine,
    RunConfig,
    TopLevelConfig,
)
from alignctl.core.errors import ConfigError, shown
from alignctl.runs.evaluation import check_evaluation
from alignctl.runs.starting_points import check_starting_points

# Why a value is required and what it looks like, for the message when it is missing (`???` in the YAML).
REQUIRED_HINTS = {
    "model.name_or_path": ("required with model=hf", "a hub id or a local model directory"),
    "data.path": ("required with data=hf", "a hub id, a dataset directory or a .jsonl/.json/.parquet/.csv file"),
}


def _describe(hint: Any) -> str:
    """A type annotation in words: 'an integer', 'a number', 'one of linear, cosine, constant', ..."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        text = " or ".join(_describe(a) for a in inner)
        return f"{text} or null" if len(inner) < len(args) else text
    if isinstance(hint, type) and issubclass(hint, Enum):
        return "one of " + ", ".join(str(m.value) for m in hint)
    if hint is bool:
        return "true or false"
    if hint is int:
        return "an integer"
    if hint is float:
        return "a number"
    if hint is str:
        return "a string"
    if origin is dict or hint is dict:
        return "a mapping (key: value)"
    if origin is list or hint is list:
        return "a list"
    if dataclasses.is_dataclass(hint):
        return f"a mapping with keys {', '.join(f.name for f in dataclasses.fields(hint))}"
    return "a valid value"


def _field_hint(schema: type, path: list[str]) -> tuple[type | None, Any]:
    """Follow `path` through nested dataclasses: (the dataclass owning the last key, that key's type)."""
    owner: Any = schema
    for i, name in enumerate(path):
        if not dataclasses.is_dataclass(owner):
            return None, None
        hints = typing.get_type_hints(owner)
        if name not in hints:
            return owner, None
        hint = hints[name]
        if i == len(path) - 1:
            return owner, hint
        inner = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        owner = next((a for a in inner if dataclasses.is_dataclass(a)), None)
    return owner, None


def _raw_value(node: Any, path: list[str]) -> Any:
    """The value the user gave at `path` (unresolved), or a sentinel if there is none."""
    try:
        value = OmegaConf.to_container(node, resolve=False) if isinstance(node, DictConfig | ListConfig) else node
        for name in path:
            value = value[int(name)] if isinstance(value, list) else value[name]
        return value
    except (KeyError, IndexError, ValueError, TypeError, OmegaConfBaseException):
        return dataclasses.MISSING


def unknown_key_message(key: str, valid: list[str]) -> str:
    """'unknown key; did you mean recipe.lr? valid keys under recipe: ...' for a key not in `valid`."""
    parent, _, leaf = key.rpartition(".")
    close = difflib.get_close_matches(leaf, valid, n=1)
    hint = f"did you mean {parent + '.' if parent else ''}{close[0]}? " if close else ""
    where = f"under {parent}" if parent else "at the top level"
    return f"unknown key; {hint}valid keys {where}: {', '.join(valid) or '(none)'}"


def _unknown_key(key: str, owner: type | None) -> str:
    if owner is None or not dataclasses.is_dataclass(owner):
        return "unknown key"
    return unknown_key_message(key, [f.name for f in dataclasses.fields(owner)])


def _typed(section: str, schema: type, node: Any) -> Any:
    """Merge `node` over `schema` and build the dataclass, turning OmegaConf errors into ConfigError.

    `section` is the config path of `node` ("recipe", "model", ...; "" for the top level): every
    message names the full key, e.g. `recipe.lr: expected a number, got 'abc'`.
    """

    def full(key: str) -> str:
        return f"{section}.{key}" if section and key else (key or section)

    if not isinstance(node, DictConfig):
        raise ConfigError(section, f"expected {_describe(schema)}, got {shown(node)}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), node)
        # Ranges and finiteness before the dataclass is built: its __post_init__ compares fields,
        # and a nan or an inf there would pass or fail for the wrong reason.
        plain = OmegaConf.to_container(merged, resolve=True, throw_on_missing=False)
        check_node("", schema, plain)  # keys relative to `section`, prefixed below like __post_init__'s
        return OmegaConf.to_object(merged)
    except ConfigError as err:
        raise ConfigError(full(err.key), str(err).split(": ", 1)[1]) from None
    except OmegaConfBaseException as err:
        relative = str(getattr(err, "full_key", None) or "")
        if section and relative.startswith(section + "."):
            relative = relative[len(section) + 1 :]
        path = [p for p in relative.split(".") if p]
        key = full(relative)
        owner, hint = _field_hint(schema, path)
        message = str(getattr(err, "msg", None) or err).strip().splitlines()[0]
        if isinstance(err, ConfigKeyError) or (hint is None and owner is not None and "not in" in message):
            raise ConfigError(key, _unknown_key(key, owner)) from None
        if isinstance(err, MissingMandatoryValue):
            why, wanted = REQUIRED_HINTS.get(key) or ("has no value", _describe(hint) if hint is not None else "a value")
            raise ConfigError(key, f"{why}; set {key}=<{wanted}>") from None
        if isinstance(err, InterpolationResolutionError):
            raise ConfigError(key, f"cannot resolve {shown(_raw_value(node, path))}: {message}") from None
        if "Could not create instance" in message:  # a __post_init__ check tripped over a wrong type
            detail = message.split(": ", 1)[-1]
            raise ConfigError(key or section, f"invalid value ({detail})") from None
        if hint is not None:
            value = _raw_value(node, path)
            got = "" if value is dataclasses.MISSING else f", got {shown(value)}"
            raise ConfigError(key, f"expected {_describe(hint)}{got}") from None
        raise ConfigError(key, message) from None


def _pick(section: str, selector: str, node: Any, schemas: dict[str, type]) -> type:
    name = node.get(selector) if isinstance(node, DictConfig) else None
    if name not in schemas:
        raise ConfigError(f"{section}.{selector}", f"unknown value {shown(name)}; valid: {', '.join(sorted(schemas))}")
    return schemas[name]


def _resolved(cfg: DictConfig, key: str) -> Any:
    """`cfg[key]` with its interpolations resolved against the whole config, detached from it."""
    if OmegaConf.is_missing(cfg, key):
        return "???"
    try:
        value = cfg[key]
        if isinstance(value, DictConfig | ListConfig):
            return OmegaConf.create(OmegaConf.to_container(value, resolve=True))
        return value
    except InterpolationResolutionError as err:
        culprit = str(getattr(err, "full_key", None) or key)
        message = str(getattr(err, "msg", None) or err).strip().splitlines()[0]
        raise ConfigError(culprit, f"cannot resolve interpolation ({message})") from None


def validate(cfg: DictConfig) -> RunConfig:
    """Turn a composed Hydra config into a typed, validated RunConfig (or raise ConfigError)."""
    known = {f.name for f in dataclasses.fields(RunConfig)} | {"hydra"}
    for key in cfg:
        if key not in known:
            raise ConfigError(str(key), unknown_key_message(str(key), sorted(known - {"hydra"})))
    for key in ("recipe", "model", "adapter", "data", "hardware", "logger", "seed"):
        if key not in cfg:
            raise ConfigError(key, "is missing from the config")
    sections = {key: _resolved(cfg, key) for key in ("recipe", "model", "adapter", "data", "hardware", "logger")}
    inputs = _resolved(cfg, "inputs") if "inputs" in cfg else None
    resume = _resolved(cfg, "resume") if "resume" in cfg else False
    top = _typed("", TopLevelConfig, OmegaConf.create({"seed": _resolved(cfg, "seed"), "inputs": inputs or {}, "resume": resume}))
    run = RunConfig(
        recipe=_typed("recipe", _pick("recipe", "stage", sections["recipe"], RECIPE_SCHEMAS), sections["recipe"]),
        model=_typed("model", ModelConfig, sections["model"]),
        adapter=_typed("adapter", _pick("adapter", "kind", sections["adapter"], ADAPTER_SCHEMAS), sections["adapter"]),
        data=_typed("data", DataConfig, sections["data"]),
        hardware=_typed("hardware", HardwareConfig, sections["hardware"]),
        logger=_typed("logger", LoggerConfig, sections["logger"]),
        seed=top.seed,
        inputs=top.inputs,
        resume=top.resume,
    )
    _check_across_groups(run)
    check_starting_points(run)  # reads only small files of local model directories, no weights
    if run.inputs.get("data"):
        run.data = _generated_data(run.data, run.inputs["data"])
    check_evaluation(run)  # alignctl eval: nothing to train, something to evaluate on
    return run


def _generated_data(data: DataConfig, producer: str) -> DataConfig:
    """inputs.data=<run dir>: train on the data.jsonl that run generated (e.g. a pairs run), while the
    built-in task of data.path, if it is one, still measures held-out exact match."""
    task = data.eval_task or (data.path if data.path.startswith("builtin:") else None)
    return dataclasses.replace(data, path=str(Path(producer).expanduser() / "data.jsonl"), eval_split=None, eval_task=task)


def _check_tracker_packages(logger: LoggerConfig) -> None:
    """Each logger asked for is installed: found here, before a model loads or a run directory is written.
    A tracker's package, its block under logger and its extra share one name."""
    for name in (["tensorboard"] if logger.tensorboard else []) + logger.trackers():
        if importlib.util.find_spec(name) is None:
            raise ConfigError("logger", f"{name} is not installed: pip install 'alignctl[{name}]'")


def _check_across_groups(run: RunConfig) -> None:
    """Settings that are each valid alone but not together."""
    if run.hardware.strategy == "fsdp" and run.recipe.stage == "pairs":
        raise ConfigError("hardware", "recipe=pairs trains nothing: run it in one process (hardware=cpu or hardware=gpu)")
    if getattr(run.recipe, "rollout_engine", None) == RolloutEngine.vllm and importlib.util.find_spec("vllm") is None:
        # Here, before anything runs; a missing GPU is found when the engine starts (that check imports torch).
        raise ConfigError("recipe.rollout_engine", "vllm is not installed (pip install vllm; it needs a CUDA GPU); use auto, native or hf")
    _check_tracker_packages(run.logger)
    if run.resume and not hasattr(run.recipe, "max_steps"):
        raise ConfigError("resume", f"recipe={run.recipe.stage} trains nothing and writes no checkpoint; run it again without resume")
    reference = getattr(run.recipe, "reference", None)
    if reference == Reference.adapter_disabled and run.adapter.kind == "none":
        raise ConfigError("recipe.reference", "adapter_disabled needs an adapter (adapter=lora); use separate or precomputed")
    if getattr(run.recipe, "extra_layers", 0) and run.adapter.kind != "none":
        raise ConfigError("recipe.extra_layers", "needs adapter=none: an adapter checkpoint keeps only the adapter, and its base model has no extra layers; set recipe.extra_layers=0 to train an adapter")
    if getattr(run.recipe, "label_smoothing", 0) and run.recipe.loss_type in (DPOLossType.hinge, DPOLossType.ipo):
        raise ConfigError("recipe.label_smoothing", f"has no effect with loss_type={run.recipe.loss_type.value}; use sigmoid, robust or simpo")
