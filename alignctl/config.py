"""Typed configuration: one dataclass per config group, carrying types and validation only.

Defaults live in the YAML under conf/; these classes have no defaults of their own (a field left
out of the YAML is a missing value, reported at start-up). `validate` merges the composed Hydra
config over the matching dataclasses, so a wrong type, an unknown key or an out-of-range value
fails before any model loads, as a `ConfigError` naming the key and what would be valid.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

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
            _check(getattr(self, name) > 0, f"tiny.{name}", "must be a positive integer")
        _check(self.hidden_size % self.num_heads == 0, "tiny.num_heads", "must divide tiny.hidden_size")


@dataclass
class ModelConfig:
    source: str  # "tiny" builds locally; "hf" loads a hub id, a local directory or a run directory
    name_or_path: str | None
    tiny: TinyModelConfig | None
    trust_remote_code: bool
    revision: str | None
    attn_implementation: str | None

    def __post_init__(self) -> None:
        _check(self.source in ("tiny", "hf"), "source", "must be 'tiny' or 'hf'")
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
        _check(self.bias in ("none", "all", "lora_only"), "bias", "must be one of none, all, lora_only")
        if not isinstance(self.target_modules, str):
            _check(len(self.target_modules) > 0, "target_modules", "must name at least one module")


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
        _check(bool(self.path), "path", "is required")
        if self.eval_limit is not None:
            _check(self.eval_limit > 0, "eval_limit", "must be a positive integer or null")


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
        _check(self.device in ("cpu", "cuda", "auto"), "device", "must be one of cpu, cuda, auto")
        _check(self.dtype in ("float32", "bfloat16", "float16"), "dtype", "must be float32, bfloat16 or float16")
        _check(self.autocast in (None, "bf16", "fp16"), "autocast", "must be bf16, fp16 or null")
        if self.num_threads is not None:
            _check(self.num_threads > 0, "num_threads", "must be a positive integer or null")


# -------------------------------------------------------------------------------------- logger
@dataclass
class LoggerConfig:
    tensorboard: bool
    log_every: int  # console/progress refresh, in optimiser steps (metrics.jsonl gets every step)
    samples_every: int  # show sample generations every N steps (0: never)

    def __post_init__(self) -> None:
        _check(self.log_every > 0, "log_every", "must be a positive integer")


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
        _check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        if self.max_grad_norm is not None:
            _check(self.max_grad_norm > 0, "max_grad_norm", "must be > 0 or null (no clipping)")
        _check("_target_" in self.optimizer, "optimizer._target_", "must name an optimiser class")
        _check(self.eval_every >= 0, "eval_every", "must be >= 0 (0: only at the end)")
        _check(self.save_every >= 0, "save_every", "must be >= 0 (0: only at the end)")
        _check(self.keep_last >= 1, "keep_last", "must be at least 1")
        _check(self.eval_batch_size > 0, "eval_batch_size", "must be a positive integer")
        _check(self.eval_max_new_tokens > 0, "eval_max_new_tokens", "must be a positive integer")


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


def _typed(section: str, schema: type, node: DictConfig) -> Any:
    """Merge `node` over `schema` and build the dataclass, turning OmegaConf errors into ConfigError."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), node)
        return OmegaConf.to_object(merged)
    except ConfigError as err:
        raise ConfigError(f"{section}.{err.key}", str(err).split(": ", 1)[1]) from None
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or section
        key = key if key.startswith(section) else f"{section}.{key}"
        message = getattr(err, "msg", str(err)).splitlines()[0]
        if "not in struct" in message or "not in" in message and "Key" in message:
            valid = ", ".join(f.name for f in dataclasses.fields(schema))
            raise ConfigError(key, f"unknown key; valid keys here: {valid}") from None
        if "Missing mandatory value" in message:
            raise ConfigError(key, "is required but has no value") from None
        raise ConfigError(key, message) from None


def _pick(section: str, selector: str, node: DictConfig, schemas: dict[str, type]) -> type:
    name = node.get(selector) if isinstance(node, DictConfig) else None
    if name not in schemas:
        raise ConfigError(f"{section}.{selector}", f"unknown value {name!r}; valid: {', '.join(sorted(schemas))}")
    return schemas[name]


def validate(cfg: DictConfig) -> RunConfig:
    """Turn a composed Hydra config into a typed, validated RunConfig (or raise ConfigError)."""
    known = {f.name for f in dataclasses.fields(RunConfig)} | {"hydra"}
    for key in cfg:
        if key not in known:
            raise ConfigError(str(key), f"unknown top-level key; valid: {', '.join(sorted(known - {'hydra'}))}")
    try:
        seed = int(cfg.seed)
        inputs = {str(k): (None if v is None else str(v)) for k, v in (cfg.get("inputs") or {}).items()}
    except (ValueError, TypeError, OmegaConfBaseException) as err:
        raise ConfigError("seed", f"must be an integer ({err})") from None
    return RunConfig(
        recipe=_typed("recipe", _pick("recipe", "stage", cfg.recipe, RECIPE_SCHEMAS), cfg.recipe),
        model=_typed("model", ModelConfig, cfg.model),
        adapter=_typed("adapter", _pick("adapter", "kind", cfg.adapter, ADAPTER_SCHEMAS), cfg.adapter),
        data=_typed("data", DataConfig, cfg.data),
        hardware=_typed("hardware", HardwareConfig, cfg.hardware),
        logger=_typed("logger", LoggerConfig, cfg.logger),
        seed=seed,
        inputs=inputs,
    )
