"""Several processes, one run: torchrun starts them, torch.distributed connects them.

`alignctl train ... hardware=ddp hardware.nproc=2` re-runs itself under torchrun (alignctl/cli/launch.py, as `tune run
--nproc_per_node` does); when torchrun or srun already started the processes (RANK / WORLD_SIZE, or
SLURM_PROCID / SLURM_NTASKS in the environment) each process joins the group directly.

What the processes share, and how it stays exact:
- the data: `BatchStream` draws global batches and hands each rank its slice;
- the loss: every rank divides by the items of the *global* step (an all-reduced count), and the
  gradients are summed across ranks after backward, so 2 processes x batch B compute the gradient
  of 1 process x batch 2B (data parallelism with DDP's result; the sum is one flat all-reduce after
  the backward pass rather than DDP's overlapped buckets);
- the weights: every rank starts from the same seed and applies the same update;
- the outputs: rank 0 alone logs, evaluates and writes the run directory and checkpoints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Group:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def shard(self) -> dict[str, int]:
        """BatchStream's arguments for this process's slice of every global batch."""
        return {"rank": self.rank, "world_size": self.world_size}


_GROUP = Group()


def current() -> Group:
    return _GROUP


def launched_env() -> Group | None:
    """The rank this process was started as (torchrun, or srun), or None for a single process."""
    env = os.environ
    if "WORLD_SIZE" in env and "RANK" in env:
        return Group(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_NTASKS" in env and "SLURM_PROCID" in env and int(env["SLURM_NTASKS"]) > 1:
        return Group(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return None


def setup(device_type: str) -> Group:
    """Join the process group when this process was launched as one rank of several."""
    global _GROUP
    group = launched_env()
    if group is None or group.world_size == 1 or torch.distributed.is_initialized():
        return _GROUP
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(group.local_rank)
    torch.distributed.init_process_group(backend, rank=group.rank, world_size=group.world_size)
    _GROUP = group
    return group


def teardown() -> None:
    global _GROUP
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _GROUP = Group()


def sum_across(value: float | int) -> float:
    """`value` summed over the ranks (itself in a single process)."""
    if not _GROUP.active:
        return value
    tensor = torch.tensor(float(value), dtype=torch.float64, device=_reduce_device())
    torch.distributed.all_reduce(tensor)
    return tensor.item()


def sum_dict(values: dict[str, float]) -> dict[str, float]:
    """Each value summed over the ranks (one all-reduce; every rank has the same keys)."""
    if not _GROUP.active:
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=_reduce_device())
    torch.distributed.all_reduce(tensor)
    return dict(zip(keys, tensor.tolist()))


def max_dict(values: dict[str, float]) -> dict[str, float]:
    """Each value's max over the ranks (one all-reduce; every rank has the same keys)."""
    if not _GROUP.active or not values:
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=_reduce_device())
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return dict(zip(keys, tensor.tolist()))


def reduce_metrics(values: dict[str, float]) -> dict[str, float]:
    """Metrics over the ranks: a name ending in ``_max`` is a maximum, every other one an additive share."""
    maxima = {k: v for k, v in values.items() if is_max_metric(k)}
    return sum_dict({k: v for k, v in values.items() if k not in maxima}) | max_dict(maxima)


def is_max_metric(name: str) -> bool:
    """Metrics whose name ends in ``_max`` are reduced by max over micro-batches and ranks, not summed."""
    return name.endswith("_max")


def sum_gradients(parameters: list[torch.nn.Parameter]) -> None:
    """Replace each gradient by its sum over the ranks: one flat all-reduce."""
    if not _GROUP.active:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if len(grads) != len(parameters):  # a rank whose step touched no weight of some parameter
        for p in parameters:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in parameters]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def gather_objects(value: object) -> list[object]:
    """Every rank's `value`, in rank order (a one-item list in a single process)."""
    if not _GROUP.active:
        return [value]
    out: list[object] = [None] * _GROUP.world_size
    torch.distributed.all_gather_object(out, value)
    return out


def barrier() -> None:
    if _GROUP.active:
        torch.distributed.barrier()


def _reduce_device() -> torch.device:
    return torch.device("cuda", _GROUP.local_rank) if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
