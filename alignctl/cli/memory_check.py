"""Before any weights load: refuse a run that clearly cannot fit in the memory this machine has.

The estimate is `alignctl plan`'s (alignctl/cli/plan.py, from the models' configs on the meta device, so
an adapter that does not fit the model, e.g. a rank above its matrices' width, is refused here too).
It is compared with what is free now: on a CPU, MemAvailable (or the cgroup's room, if smaller) plus
this process's own resident set, which the estimate counts; on a GPU, the device's free memory. Only
an estimate above MARGIN x that is refused: plan expects the real peak within about 30 %, and a run
near the edge should get its chance. `hardware.memory_check=false` skips the comparison (not the
adapter's check).

The screen is cheap: models on the meta device and micro-batches as wide as the recipe allows; only
when that bound does not fit is the data read to size the widest batch it really holds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alignctl.cli.plan_fit import budget_text
from alignctl.core.console import size
from alignctl.core.errors import AdapterError, UserError

MARGIN = 1.2


class NotEnoughMemory(UserError):
    """A run whose estimated peak memory is clearly more than the machine has free."""


def _meminfo_available() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cgroup_room() -> float | None:
    """What the cgroup (v2) this process runs in still lets it allocate; None without a limit."""
    try:
        group = Path("/proc/self/cgroup").read_text().strip().splitlines()[0].split(":", 2)[2]
        folder = Path("/sys/fs/cgroup") / group.lstrip("/")
        limit = (folder / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return float(limit) - float((folder / "memory.current").read_text())
    except (OSError, IndexError, ValueError):
        return None


def available_memory(device: str) -> tuple[float, str] | None:
    """(bytes a run may still use, where the figure comes from), or None where it cannot be read."""
    if device == "cuda":
        import torch

        from alignctl.core import distributed

        if not torch.cuda.is_available():
            return None
        free, _ = torch.cuda.mem_get_info(distributed.current().local_rank)
        return float(free), "free GPU memory"
    from alignctl.cli.plan_memory import process_bytes

    found = [(v, what) for v, what in ((_meminfo_available(), "MemAvailable"), (_cgroup_room(), "the cgroup's memory.max")) if v is not None]
    if not found:
        return None
    room, what = min(found)
    return room + process_bytes(), f"{what}, plus this process"


def ways_to_reduce(cfg: Any, plans: list) -> list[str]:
    """The settings of this run that would lower its estimate, the ones for the largest part first."""
    recipe, hardware, kind = cfg.recipe, cfg.hardware, cfg.adapter.kind
    activations = sum(p.activations for p in plans)
    fixed = sum(p.weights + p.optimizer for p in plans)
    batch = []
    if getattr(recipe, "batch_size", 1) > 1:
        batch.append("a smaller recipe.batch_size (a larger recipe.grad_accum keeps the global batch)")
    if hasattr(recipe, "max_new_tokens"):
        batch.append("a smaller recipe.max_new_tokens")
    if hasattr(recipe, "max_length"):
        batch.append("a smaller recipe.max_length")
    if not hardware.gradient_checkpointing:
        batch.append("hardware.gradient_checkpointing=true")
    if not getattr(recipe, "lm_head_chunk", 1) and hasattr(recipe, "lm_head_chunk"):
        batch.append("recipe.lm_head_chunk=1024")
    model = {"none": ["adapter=lora"], "lora": ["adapter=qlora (GPU)"], "dora": ["adapter=lora"]}.get(kind, [])
    if hardware.dtype == "float32" and kind != "none":  # the frozen base: full fine-tuning keeps float32 master weights
        model.append("hardware.dtype=bfloat16")
    return batch + model if activations >= fixed else model + batch


def check_memory(cfg: Any) -> None:
    """Raise NotEnoughMemory when `alignctl plan`'s peak estimate is above MARGIN x the free memory
    (x hardware.nproc on a CPU, where the processes share it); an adapter that does not fit the model
    raises its AdapterError (with hardware.memory_check=false too). Nothing is checked where the configs cannot be read here (the stage then
    reports the model in its own words) or the free memory is unknown."""
    from alignctl.cli import plan
    from alignctl.cli.plan_data import widest_possible

    device = plan.planned_device(cfg.hardware)
    processes = cfg.hardware.nproc if device == "cpu" else 1

    def need(shape_of) -> tuple[float, list]:
        try:
            plans = plan.recipe_models(cfg, shape_of)
        except AdapterError:
            raise
        except Exception:  # an estimate that cannot be made here never stops a run: the stage reports a bad model itself
            return 0.0, []
        return plan.peak(plans, device).total * processes, plans

    def agreed(value: Any) -> Any:
        """Rank 0's figures (each process measures slightly different ones): with several processes
        every one makes the same decision, and a refusal is the same line from each (said once)."""
        from alignctl.core import distributed

        return distributed.gather_objects(value)[0]

    estimate, plans = need(widest_possible)  # also checks the adapter against the model's config, always
    if not cfg.hardware.memory_check:
        return
    estimate, free = agreed((estimate, available_memory(device)))
    if free is None or estimate <= MARGIN * free[0]:
        return
    estimate, plans = need(plan.batch_shape)
    estimate = agreed(estimate)
    if estimate <= MARGIN * free[0]:
        return
    each = f" ({processes} processes)" if processes > 1 else ""
    raise NotEnoughMemory(
        f"not enough memory: alignctl plan estimates a peak of {size(estimate)}{each} on {device}, "
        f"{estimate / free[0]:.1f}x the {size(free[0])} available ({free[1]}); "
        f"lower it with {', '.join(ways_to_reduce(cfg, plans))} (alignctl plan <these overrides> --fit {budget_text(free[0] / processes)} "
        f"proposes settings that fit), or hardware.memory_check=false to start anyway"
    )
