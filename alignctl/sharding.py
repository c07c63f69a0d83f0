"""hardware=fsdp: FSDP2 (`torch.distributed.fsdp.fully_shard`). Each process keeps a shard of every
parameter, gradient and optimiser state; a decoder layer's parameters are gathered for its forward
and backward and freed after.

Kept exact in the same way as DDP (alignctl/distributed.py): the loss is normalised by the global
step's items; FSDP's reduce-scatter averages over the processes, so the loop scales the loss it
backpropagates by their number (a divide factor of 1 would need PREMUL_SUM, which gloo lacks). Checkpoints
hold the full, unsharded model (a plain Hugging Face directory, written by rank 0) and the full
optimiser state keyed by parameter name, so they load in one process, under DDP or under FSDP.
Every process runs the evaluation (a sharded forward needs all of them); rank 0 reports it.
"""

from __future__ import annotations

from typing import Any

import torch

from alignctl.errors import ConfigError

FULL = "full"  # trainer_state["optimizer_format"] of an optimiser state keyed by parameter name


def shard(model: torch.nn.Module, autocast: str | None) -> None:
    """fully_shard every decoder layer, then the whole model (embeddings, head, norms), in place."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layer_names = set(getattr(base, "_no_split_modules", None) or [])
    if not layer_names:
        raise ConfigError("hardware.strategy", f"{type(base).__name__} does not name its decoder layers (_no_split_modules); use hardware=ddp")
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if autocast == "bf16" else MixedPrecisionPolicy()
    for module in list(model.modules()):
        if type(module).__name__ in layer_names:
            fully_shard(module, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_states(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """The whole model's and optimiser's state, gathered (every process must call it; rank 0 gets them)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)


def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """An optimiser state keyed by parameter name, into a sharded or a plain model's optimiser."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
