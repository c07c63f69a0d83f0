"""Typed configuration: one dataclass per config group, carrying types and validation only.

Defaults live in the YAML under conf/; these classes have no defaults of their own (a field left
out of the YAML is a missing value, reported at start-up). `validate` merges the composed Hydra
config over the matching dataclasses, so a wrong type, an unknown key or an out-of-range value
fails before any model loads, as a `ConfigError` naming the key and what would be valid.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import (
    ConfigKeyError,
    InterpolationResolutionError,
    MissingMandatoryValue,
    OmegaConfBaseException,
)

from alignctl.errors import ConfigError


class Scheduler(str, Enum):
    linear = "linear"
    cosine = "cosine"
    constant = "constant"


class Overlong(str, Enum):
    error = "error"
    drop = "drop"
    truncate = "truncate"


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


# --------------------------------------------------------------------------------------- model
@dataclass
class TinyModelConfig:
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    init_seed: int

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "max_position_embeddings"):
            _check(getattr(self, name) > 0, f"tiny.{name}", f"must be a positive integer, got {getattr(self, name)}")
        _check(
            self.hidden_size % self.num_heads == 0,
            "tiny.num_heads",
            f"must divide hidden_size ({self.hidden_size}), got {self.num_heads}",
        )


@dataclass
class ModelConfig:
    source: str  # "tiny" builds locally; "hf" loads a hub id, a local directory or a run directory
    name_or_path: str | None
    tiny: TinyModelConfig | None
    trust_remote_code: bool
    revision: str | None
    attn_implementation: str | None

    def __post_init__(self) -> None:
        _check(self.source in ("tiny", "hf"), "source", f"must be 'tiny' or 'hf', got {self.source!r}")
        if self.source == "hf":
            _check(bool(self.name_or_path), "name_or_path", "is required with model=hf (a hub id or a local dir)")
        if self.source == "tiny":
            _check(self.tiny is not None, "tiny", "is required with model=tiny")


# ------------------------------------------------------------------------------------- adapter
@dataclass
class NoAdapterConfig:
    kind: str


@dataclass
class LoraConfig:
    kind: str
    r: int
    alpha: float
    dropout: float
    target_modules: Any  # "all-linear" or a list of module names
    use_rslora: bool
    init_lora_weights: Any  # true (B = 0), "gaussian", "pissa", ... as peft accepts
    bias: str

    def __post_init__(self) -> None:
        _check(self.r > 0, "r", f"must be a positive integer, got {self.r}")
        _check(self.alpha > 0, "alpha", f"must be > 0, got {self.alpha}")
        _check(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")
        _check(self.bias in ("none", "all", "lora_only"), "bias", f"must be one of none, all, lora_only, got {self.bias!r}")
        if not isinstance(self.target_modules, str):
            names = self.target_modules
            is_list = isinstance(names, Sequence | ListConfig) and all(isinstance(n, str) for n in names)
            _check(is_list, "target_modules", f"must be all-linear or a list of module names, got {names!r}")
            _check(len(names) > 0, "target_modules", "must name at least one module")
        _check(
            isinstance(self.init_lora_weights, bool | str),
            "init_lora_weights",
            f"must be true, false or the name of a peft initialisation (gaussian, pissa, ...), got {self.init_lora_weights!r}",
        )


ADAPTER_SCHEMAS: dict[str, type] = {"none": NoAdapterConfig, "lora": LoraConfig}


# ---------------------------------------------------------------------------------------- data
@dataclass
class DataConfig:
    path: str  # "builtin:arithmetic", a hub id, a local dir, or a .jsonl/.json/.parquet/.csv file
    config_name: str | None
    train_split: str
    eval_split: str | None
    overlong: Overlong  # a prompt that alone fills max_length: error (default), drop it, or cut it from the left
    num_proc: int | None
    eval_limit: int | None  # use only the first N eval rows (None: all)

    def __post_init__(self) -> None:
        _check(bool(self.path), "path", "is required (builtin:arithmetic, a hub id, a directory or a data file)")
        if self.eval_limit is not None:
            _check(self.eval_limit > 0, "eval_limit", f"must be a positive integer or null, got {self.eval_limit}")
        if self.num_proc is not None:
            _check(self.num_proc > 0, "num_proc", f"must be a positive integer or null, got {self.num_proc}")


# ------------------------------------------------------------------------------------ hardware
@dataclass
class HardwareConfig:
    device: str  # cpu | cuda | auto
    dtype: str  # parameter dtype when loading: float32 | bfloat16 | float16
    autocast: str | None  # bf16 | fp16 | null: mixed precision for forward passes
    tf32: bool
    gradient_checkpointing: bool
    num_threads: int | None

    def __post_init__(self) -> None:
        _check(self.device in ("cpu", "cuda", "auto"), "device", f"must be one of cpu, cuda, auto, got {self.device!r}")
        _check(
            self.dtype in ("float32", "bfloat16", "float16"), "dtype", f"must be float32, bfloat16 or float16, got {self.dtype!r}"
        )
        _check(self.autocast in (None, "bf16", "fp16"), "autocast", f"must be bf16, fp16 or null, got {self.autocast!r}")
        if self.num_threads is not None:
            _check(self.num_threads > 0, "num_threads", f"must be a positive integer or null, got {self.num_threads}")


# -------------------------------------------------------------------------------------- logger
@dataclass
class LoggerConfig:
    tensorboard: bool
    log_every: int  # console/progress refresh, in optimiser steps (metrics.jsonl gets every step)
    samples_every: int  # show sample generations every N steps (0: never)

    def __post_init__(self) -> None:
        _check(self.log_every > 0, "log_every", f"must be a positive integer, got {self.log_every}")
        _check(self.samples_every >= 0, "samples_every", f"must be >= 0 (0: never), got {self.samples_every}")


# -------------------------------------------------------------------------------------- recipe
@dataclass
class TrainConfig:
    """What every training stage shares: the loop, the optimiser and the schedule."""

    stage: str
    max_steps: int
    lr: float
    batch_size: int  # per device, per micro-step
    grad_accum: int
    max_length: int
    scheduler: Scheduler
    warmup_ratio: float
    weight_decay: float
    max_grad_norm: float | None
    optimizer: dict[str, Any]  # `_target_` plus keyword arguments; lr and weight_decay come from above
    eval_every: int  # optimiser steps between evaluations (0: only at the end)
    save_every: int  # optimiser steps between checkpoints (0: only at the end)
    keep_last: int  # intermediate checkpoints to keep on disk
    eval_batch_size: int
    eval_max_new_tokens: int

    def __post_init__(self) -> None:
        _check(self.max_steps > 0, "max_steps", f"must be a positive integer, got {self.max_steps}")
        _check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        _check(self.batch_size > 0, "batch_size", f"must be a positive integer, got {self.batch_size}")
        _check(self.grad_accum > 0, "grad_accum", f"must be a positive integer, got {self.grad_accum}")
        _check(self.max_length > 1, "max_length", f"must be at least 2, got {self.max_length}")
        _check(0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        _check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        if self.max_grad_norm is not None:
            _check(self.max_grad_norm > 0, "max_grad_norm", f"must be > 0 or null (no clipping), got {self.max_grad_norm}")
        target = self.optimizer.get("_target_")
        _check(
            isinstance(target, str) and bool(target),
            "optimizer._target_",
            "must name an optimiser class (e.g. torch.optim.AdamW)",
        )
        _check(self.eval_every >= 0, "eval_every", f"must be >= 0 (0: only at the end), got {self.eval_every}")
        _check(self.save_every >= 0, "save_every", f"must be >= 0 (0: only at the end), got {self.save_every}")
        _check(self.keep_last >= 1, "keep_last", f"must be at least 1, got {self.keep_last}")
        _check(self.eval_batch_size > 0, "eval_batch_size", f"must be a positive integer, got {self.eval_batch_size}")
        _check(
            self.eval_max_new_tokens > 0, "eval_max_new_tokens", f"must be a positive integer, got {self.eval_max_new_tokens}"
        )


@dataclass
class SFTConfig(TrainConfig):
    completion_only_loss: bool  # loss on completion tokens only (prompt tokens are masked)
    packing: bool  # concatenate examples into max_length blocks instead of padding


RECIPE_SCHEMAS: dict[str, type] = {"sft": SFTConfig}


# --------------------------------------------------------------------------------------- whole
@dataclass
class RunConfig:
    recipe: Any
    model: ModelConfig
    adapter: Any
    data: DataConfig
    hardware: HardwareConfig
    logger: LoggerConfig
    seed: int
    inputs: dict[str, str | None] = field(default_factory=dict)  # role -> run dir of a parent stage


@dataclass
class TopLevelConfig:
    """The keys at the top of the config that are not groups."""

    seed: int
    inputs: dict[str, str | None]


# Why a value is required and what it looks like, for the message when it is missing (`???` in the YAML).
REQUIRED_HINTS = {
    "model.name_or_path": ("required with model=hf", "a hub id or a local model directory"),
    "data.path": ("required with data=hf", "a hub id, a dataset directory or a .jsonl/.json/.parquet/.csv file"),
}


def _show(value: Any) -> str:
    """A value as a user would type it: 'abc', 1.5, true, null, [1, 2]."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, Enum):
        return repr(value.value)
    if isinstance(value, str):
        return repr(value)
    return str(value)


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
        raise ConfigError(section, f"expected {_describe(schema)}, got {_show(node)}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), node)
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
            raise ConfigError(key, f"cannot resolve {_show(_raw_value(node, path))}: {message}") from None
        if "Could not create instance" in message:  # a __post_init__ check tripped over a wrong type
            detail = message.split(": ", 1)[-1]
            raise ConfigError(key or section, f"invalid value ({detail})") from None
        if hint is not None:
            value = _raw_value(node, path)
            got = "" if value is dataclasses.MISSING else f", got {_show(value)}"
            raise ConfigError(key, f"expected {_describe(hint)}{got}") from None
        raise ConfigError(key, message) from None


def _pick(section: str, selector: str, node: Any, schemas: dict[str, type]) -> type:
    name = node.get(selector) if isinstance(node, DictConfig) else None
    if name not in schemas:
        raise ConfigError(f"{section}.{selector}", f"unknown value {_show(name)}; valid: {', '.join(sorted(schemas))}")
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
    top = _typed("", TopLevelConfig, OmegaConf.create({"seed": _resolved(cfg, "seed"), "inputs": inputs or {}}))
    return RunConfig(
        recipe=_typed("recipe", _pick("recipe", "stage", sections["recipe"], RECIPE_SCHEMAS), sections["recipe"]),
        model=_typed("model", ModelConfig, sections["model"]),
        adapter=_typed("adapter", _pick("adapter", "kind", sections["adapter"], ADAPTER_SCHEMAS), sections["adapter"]),
        data=_typed("data", DataConfig, sections["data"]),
        hardware=_typed("hardware", HardwareConfig, sections["hardware"]),
        logger=_typed("logger", LoggerConfig, sections["logger"]),
        seed=top.seed,
        inputs=top.inputs,
    )
