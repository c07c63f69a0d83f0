"""hardware=fsdp: FSDP2 (`torch.distributed.fsdp.fully_shard`). Each process keeps a shard of every
parameter, gradient and optimiser state; a decoder layer's parameters are gathered for its forward
and backward and freed after.

Kept exact in the same way as DDP (alignctl/core/distributed.py): the loss is normalised by the global
step's items; FSDP's reduce-scatter averages over the processes, so the loop scales the loss it
backpropagates by their number (a divide factor of 1 would need PREMUL_SUM, which gloo lacks). Checkpoints
hold the full, unsharded model (a plain Hugging Face directory, written by rank 0) and the full
optimiser state keyed by parameter name, so they load in one process, under DDP or under FSDP.
Every process runs the evaluation (a sharded forward needs all of them); rank 0 reports it. Sampling
(GRPO, PPO) passes synced_gpus to generate, so a process whose completions ended keeps stepping
with the others.
"""

from __future__ import annotations

from typing import Any

import torch

from alignctl.core.errors import ConfigError
from alignctl.nn.model_parts import unwrapped

FULL = "full"  # trainer_state["optimizer_format"] of an optimiser state keyed by parameter name


def shard(model: torch.nn.Module, autocast: str | None) -> None:
    """fully_shard every decoder layer, then each model the module holds (embeddings, head, norms), in
    place. A module holding several models (PPO's policy and value) names them in `fsdp_roots()`: each
    is sharded as a root of its own, because each is called on its own."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import PreTrainedModel

    layer_names = {name for m in model.modules() if isinstance(m, PreTrainedModel) for name in (m._no_split_modules or [])}
    if not layer_names:
        raise ConfigError("hardware.strategy", f"{type(model).__name__} does not name its decoder layers (_no_split_modules); use hardware=ddp")
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if autocast == "bf16" else MixedPrecisionPolicy()
    for module in list(model.modules()):
        if type(module).__name__ in layer_names:
            fully_shard(module, mp_policy=policy)
    for root in model.fsdp_roots() if hasattr(model, "fsdp_roots") else [model]:
        # A peft model's generate() calls its base model directly: the base is the root that gathers.
        fully_shard(unwrapped(root), mp_policy=policy)


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


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
