"""`alignctl plan <overrides as for train>`: a dry run. It prints the resolved config, the parameters
of every model the recipe holds (total, trainable, and the adapter arithmetic), an estimate of the
memory each needs, and the batch arithmetic. No weights load: models are built on the meta device
from their config, so a 70B plan runs on a laptop (a hub id needs its config.json, a local dir works
offline).

Parameter counts. LoRA adds r * (d_in + d_out) per adapted matrix; DoRA adds d_out more (the
magnitude vector). With task type SEQ_CLS (reward and value models) peft also trains a copy of the
scalar head. A 4-bit weight counts its values, as peft does.

Memory, in bytes, per model:
- weights: parameters x dtype size; QLoRA stores the adapted base matrices in NF4, 4.127 bits per
  value with double quantisation and 4.5 without (Dettmers et al. 2023), the rest in the compute dtype;
- gradients: trainable parameters x their dtype size (adapters train in float32);
- optimiser: AdamW keeps two states per trainable parameter (one byte each with paged 8-bit AdamW);
- activations (trained models only): what the widest micro-batch keeps for backward, sized from the
  data's own token lengths (alignctl/cli/plan_data.py) with the formulas of alignctl/cli/plan_memory.py.
The peak adds, to every model's weights and optimiser state, the largest of: the activations, the
gradients with AdamW's step temporary, and an RL rollout's folded weights; on a CPU also the process
itself, the moment of loading and, under glibc's malloc, its slack (plan_memory.py). Expect the real
peak within about 30 %.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignctl.cli import plan_fit
from alignctl.cli import plan_memory as memory
from alignctl.cli.plan_data import BatchShape, BatchShapes, batch_shape
from alignctl.core.console import size
from alignctl.core.errors import UserError

NF4_BITS = {True: 4.127, False: 4.5}  # bits per value with / without double quantisation


@dataclass
class ModelPlan:
    role: str
    source: str
    total: int
    trainable: int
    adapted_matrices: int
    weights: float
    gradients: float
    optimizer: float
    activations: float
    step_temporary: float = 0.0  # foreach AdamW's temporary, the size of the trainable parameters
    rollout: float = 0.0  # the native rollout engine's copy of the linear weights, adapters folded in
    loading: float = 0.0  # CPU: the checkpoint file mapped while its weights load in another dtype
    shape: BatchShape | None = None  # the widest micro-batch it trains on

    @property
    def transient(self) -> float:
        """What comes and goes within a step: its largest moment."""
        return max(self.activations, self.gradients + self.step_temporary, self.rollout)

    @property
    def memory(self) -> float:
        return self.weights + self.optimizer + self.transient


@dataclass
class Peak:
    models: float  # every model's weights and optimiser state, plus their transients
    process: float  # CPU: the process itself (Python, torch, libraries)
    loading: float  # CPU: the largest moment of loading (all weights, one file mapped beside them)
    slack: float = 0.0  # CPU under glibc's malloc: freed activations its heaps keep (plan_memory.py)

    @property
    def total(self) -> float:
        return self.process + max(self.models + self.slack, self.loading)


# ------------------------------------------------------------------------------------ arithmetic
def adapter_parameters(shapes: list[tuple[int, int]], r: int, dora: bool) -> int:
    """LoRA's r * (d_in + d_out) per adapted (d_in, d_out) matrix, plus d_out each for DoRA's magnitude."""
    return sum(r * (d_in + d_out) + (d_out if dora else 0) for d_in, d_out in shapes)


def peak(plans: list[ModelPlan], device: str) -> Peak:
    models = sum(p.memory for p in plans)
    if device != "cpu":  # device memory: the process and the host-side loading are not on it
        return Peak(models, 0.0, 0.0)
    from alignctl.core import allocator

    loading = sum(p.weights for p in plans) + max((p.loading for p in plans), default=0.0)
    # plan runs under the allocator a training run would (the CLI picks it before either starts)
    slack = sum(p.activations for p in plans) if allocator.active() == "system" else 0.0
    return Peak(models, memory.process_bytes(), loading, slack)


# ------------------------------------------------------------------------------------ the models
def meta_model(path: str, model_cfg: Any, seq_cls: bool, extra_layers: int = 0) -> Any:
    """The architecture at `path` with no weights (meta tensors), as the stage would build it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from alignctl.models.loading import add_decoder_layers

    adapter_file = Path(path) / "adapter_config.json"
    config_path = json.loads(adapter_file.read_text())["base_model_name_or_path"] if adapter_file.exists() else path
    try:
        config = AutoConfig.from_pretrained(config_path, trust_remote_code=model_cfg.trust_remote_code, revision=model_cfg.revision)
    except (OSError, ValueError) as err:
        raise UserError(f"plan: cannot read a model config from {config_path!r}: {str(err).strip().splitlines()[0]}") from None
    if seq_cls:
        config.num_labels = 1
    with torch.device("meta"):
        model = (AutoModelForSequenceClassification if seq_cls else AutoModelForCausalLM).from_config(config)
        if extra_layers:
            add_decoder_layers(model, extra_layers)
    return model


def linear_shapes(model: Any, target_modules: Any) -> list[tuple[int, int]]:
    """(d_in, d_out) of the linear layers an adapter with `target_modules` adapts (all-linear: every
    linear layer but the output head, as peft chooses)."""
    from alignctl.models.adapters import adapted_linears

    return [(layer.in_features, layer.out_features) for _, layer in adapted_linears(model, target_modules)]


def planned_device(hardware: Any) -> str:
    """The device the run would train on; a plan for hardware.device=cuda needs no GPU here."""
    import torch

    if hardware.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return hardware.device


def absent_gpu_native(device: str) -> bool | None:
    """A GPU that is not visible here is planned as one that computes bf16 natively (Ampere or later);
    None: ask the device itself."""
    import torch

    return True if device == "cuda" and not torch.cuda.is_available() else None


def settle_for_plan(cfg: Any) -> str:
    """Settle hardware.autocast/dtype=auto for the planned device, and return that device."""
    from alignctl.models.precision import settle

    device = planned_device(cfg.hardware)
    settle(cfg, device, native=absent_gpu_native(device))
    return device


def plan_model(role: str, path: str, cfg: Any, trained: bool, seq_cls: bool = False, extra_layers: int = 0,
               shape: BatchShape | None = None, shared_base: bool = False, rollout: bool = False) -> ModelPlan:
    """Parameters and memory of one model the recipe holds; `trained` ones get the adapter (if any).
    `shape`: the widest micro-batch the model trains on (no activations without one).
    `shared_base`: a second adapter on another model's base (PPO's value with LoRA), so no base weights.
    `rollout`: the policy of an RL recipe, whose weights the native rollout engine reads into a copy."""
    device = settle_for_plan(cfg)
    model = meta_model(path, cfg.model, seq_cls, extra_layers)
    config = model.config
    total = sum(p.numel() for p in model.parameters())
    adapter = cfg.adapter if trained else None
    kind = adapter.kind if adapter is not None else "none"
    quantized = kind == "qlora"
    dtype = adapter.compute_dtype if quantized else cfg.hardware.dtype
    size = memory.DTYPE_BYTES[dtype]
    file_size = memory.file_dtype_bytes(config)
    if kind != "none":
        from alignctl.models.adapters import check_rank, check_targets

        check_rank(model, check_targets(model, adapter.target_modules), adapter.r)
    shapes = linear_shapes(model, adapter.target_modules) if kind != "none" else []
    if kind == "none":
        trainable = total if trained else 0
        adapter_params, head = 0, 0
    else:
        adapter_params = adapter_parameters(shapes, adapter.r, kind == "dora")
        head = config.hidden_size * config.num_labels if seq_cls else 0  # peft trains a copy of the scalar head
        trainable = adapter_params + head
    linear = sum(d_in * d_out for d_in, d_out in linear_shapes(model, "all-linear"))
    weights = total * size
    if quantized:  # the adapted-able base matrices in NF4, the rest (embeddings, norms, head) in the compute dtype
        weights -= linear * size - linear * NF4_BITS[adapter.double_quant] / 8
        if device == "cpu" and size == file_size:
            # The rest loads as views of the mapped file, which keeps the float32 pages read for quantising resident.
            weights += linear * file_size
    loading = total * file_size if device == "cpu" and size != file_size and not shared_base else 0.0
    if shared_base:  # its parameters are the adapter and the head; the base is the policy's
        weights, total = 0.0, 0
    weights += (adapter_params + head) * 4  # adapters and a trained head are kept in float32 (precision.py)
    total += adapter_params + head  # as the loaded model counts: the base, the adapter, peft's copy of the head
    grad_size = 4 if kind != "none" else size
    gradients = trainable * grad_size if trained else 0.0
    paged = quantized and adapter.paged_optimizer and device == "cuda"
    optimizer = trainable * (2 if paged else 2 * grad_size) if trained else 0.0
    step_temporary = 0.0 if paged or not trained else trainable * grad_size
    activations = 0.0
    if trained and shape is not None and shape.rows:
        activations = model_activations(cfg, config, kind, size, shape, seq_cls, linear)
    from alignctl.rl.decode import SUPPORTED_MODEL_TYPES

    copy = 0.0
    if rollout and not quantized and getattr(config, "model_type", "") in SUPPORTED_MODEL_TYPES and cfg.recipe.rollout_engine.value in ("auto", "native"):
        copy = linear * (4 if kind != "none" else size)  # a bf16 weight plus a float32 update is float32
    return ModelPlan(role, path, total, trainable, len(shapes), weights, gradients, optimizer, activations, step_temporary, copy, loading,
                     shape if trained else None)


def model_activations(cfg: Any, config: Any, kind: str, size: int, shape: BatchShape, seq_cls: bool, linear: int) -> float:
    """Saved activations of the widest micro-batch (alignctl/cli/plan_memory.py), with the 16-bit copies
    autocast makes of float32 weights that train."""
    sixteen = cfg.hardware.autocast in ("bf16", "fp16")
    compute = 2 if sixteen else size
    precision = memory.Precision(compute=compute, casts_inputs=sixteen and size == 4, four_bit=kind == "qlora", norms_trained=kind == "none")
    shapes = memory.Shapes.of(config)
    if seq_cls:  # a scalar head: no vocabulary-wide logits
        shapes = memory.Shapes(shapes.hidden, shapes.kv, shapes.intermediate, shapes.layers, 1)
    recipe = cfg.recipe
    chunk = getattr(recipe, "lm_head_chunk", 0) if not seq_cls else 0
    total = memory.activation_bytes(shape.rows, shape.width, shape.positions, shapes, precision, getattr(recipe, "fused_mlp", False),
                                    chunk, cfg.hardware.gradient_checkpointing, getattr(recipe, "fused_rms_norm", False))
    if kind == "none" and sixteen and size == 4:
        total += linear * 2  # autocast's bf16 copy of each trained linear weight, saved for backward
    return total


def recipe_models(cfg: Any, shape_of: Callable[[Any, str], BatchShape] = batch_shape) -> list[ModelPlan]:
    """Every model the recipe holds in memory while it trains, as its stage declares them
    (`held_models` beside each stage's run). Trained models are sized on the widest micro-batch
    `shape_of(cfg, tokenizer path)` gives: of the data, read with the first model's tokenizer (or
    plan_data.widest_possible, an upper bound without the data)."""
    from alignctl.stages.registry import stage

    held = stage(cfg.recipe.stage).models(cfg)
    shape = shape_of(cfg, held[0].path) if held[0].trained else None
    return [plan_model(m.role, m.path, cfg, m.trained, seq_cls=m.scalar_head, extra_layers=m.extra_layers, shape=shape if m.trained else None,
                       shared_base=m.shared_base, rollout=m.samples) for m in held]


def batch_rows(cfg: Any) -> list[tuple[str, str]]:
    """The batch arithmetic, as (quantity, value) rows."""
    recipe = cfg.recipe
    if not hasattr(recipe, "max_steps"):
        return [("prompts", str(recipe.num_prompts)), ("completions per prompt", str(recipe.num_generations))]
    processes = int(getattr(cfg.hardware, "nproc", 1) or 1)
    step = recipe.batch_size * recipe.grad_accum * processes
    rows = [("processes", str(processes)),
            ("global batch", f"{recipe.batch_size} per device x {recipe.grad_accum} accumulation x {processes} processes = {step}"),
            ("examples seen", f"{recipe.max_steps} steps x {step} = {recipe.max_steps * step:,}")]
    if hasattr(recipe, "steps_per_generation"):  # the online stages: grpo, ppo, distill
        per_rollout = step * recipe.steps_per_generation
        # grpo's num_iterations, ppo's num_ppo_epochs; distill makes one pass over each rollout.
        passes = getattr(recipe, "num_iterations", getattr(recipe, "num_ppo_epochs", 1))
        k = getattr(recipe, "num_generations", 1)
        rows += [("completions per rollout", f"{step} x {recipe.steps_per_generation} steps_per_generation = {per_rollout}"),
                 ("prompts per rollout", f"{per_rollout} / {k} completions each = {per_rollout // k}"),
                 ("optimiser steps per rollout", f"{recipe.steps_per_generation} x {passes} passes = {recipe.steps_per_generation * passes}"),
                 ("rollouts", str(-(-recipe.max_steps // (recipe.steps_per_generation * passes))))]
    return rows


def estimate_of(composed: Any, shape_of: Callable[[Any, str], BatchShape] = batch_shape) -> tuple[float, int, str]:
    """(peak estimate in bytes, trainable parameters, device) of a composed config: what `plan` prints
    for it (plan --fit's candidates)."""
    from alignctl.config.validation import validate

    cfg = validate(composed)
    plans = recipe_models(cfg, shape_of)
    device = settle_for_plan(cfg)
    return peak(plans, device).total, sum(p.trainable for p in plans), device


# -------------------------------------------------------------------------------------- command
def plan_record(cfg: Any, plans: list[ModelPlan], estimate: Peak, device: str) -> dict[str, Any]:
    """`alignctl plan --json`: every figure the tables show, memory in bytes."""
    shape = next((p.shape for p in plans if p.shape is not None), None)
    models = [{"model": p.role, "source": p.source, "params": p.total, "trainable": p.trainable, "adapted_matrices": p.adapted_matrices,
               "weights": p.weights, "gradients": p.gradients, "optimizer": p.optimizer, "activations": p.activations, "peak": p.memory}
              for p in plans]
    return {"recipe": cfg.recipe.stage, "adapter": cfg.adapter.kind, "device": device, "models": models,
            "peak": {"total": estimate.total, "models": estimate.models, "process": estimate.process, "loading": estimate.loading, "slack": estimate.slack},
            "batch": dict(batch_rows(cfg)), "activations_shape": None if shape is None else {"rows": shape.rows, "width": shape.width,
                                                                                             "positions": shape.positions, "source": shape.source}}


def plan_command(args: list[str]) -> None:
    from omegaconf import OmegaConf
    from rich.table import Table

    from alignctl.cli import app as hydra_app
    from alignctl.config.validation import validate
    from alignctl.core.console import console

    fit, args = plan_fit.take_fit(args)
    if fit is not None:
        plan_fit.parse_size(fit)  # a bad size is refused before anything is composed
    as_json, args = hydra_app.json_and_overrides("plan", args, " --fit <memory per device>")
    (composed,) = hydra_app.check_jobs(args, multirun=False)
    hydra_app.quiet_libraries()
    cfg = validate(composed)
    if fit is not None:
        shapes = BatchShapes()  # the data's token lengths, computed once for every candidate
        plan_fit.fit_command(cfg, args, fit, as_json, lambda candidate: estimate_of(candidate, shapes))
        return
    if as_json:  # for scripts: the same figures, in bytes, and nothing else on stdout
        plans, device = recipe_models(cfg), settle_for_plan(cfg)
        print(json.dumps(plan_record(cfg, plans, peak(plans, device), device), indent=2))
        return
    console.print(OmegaConf.to_yaml(hydra_app.without_hydra(composed)), markup=False)
    plans = recipe_models(cfg)
    from alignctl.models.precision import describe

    device = settle_for_plan(cfg)
    console.print(describe(cfg, device, absent_gpu_native(device)))
    table = Table(title=f"models held by recipe={cfg.recipe.stage} with adapter={cfg.adapter.kind} on {device} (memory in bytes, K/M/G = 2^10/20/30)")
    for column in ("model", "params", "trainable", "adapted", "weights", "grads", "optim", "activ", "peak"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for p in plans:
        share = f" ({100 * p.trainable / p.total:.1f}%)" if p.total else ""
        table.add_row(p.role, f"{p.total:,}", f"{p.trainable:,}{share}", str(p.adapted_matrices),
                      size(p.weights), size(p.gradients), size(p.optimizer), size(p.activations), size(p.memory))
    estimate = peak(plans, device)
    if device == "cpu":
        table.add_row("the process (Python, torch, libraries)", "", "", "", "", "", "", "", size(estimate.process))
        table.add_row("loading (weights, one file mapped beside them)", "", "", "", "", "", "", "", size(estimate.loading))
        if estimate.slack:
            table.add_row("allocator slack (glibc malloc keeps freed activations)", "", "", "", "", "", "", "", size(estimate.slack))
    table.add_row("peak", "", "", "", "", "", "", "", size(estimate.total))
    console.print(table)
    shape = next((p.shape for p in plans if p.shape is not None), None)
    if shape is not None:
        console.print(f"activations: micro-batches of up to {shape.rows} x {shape.width} tokens, {shape.positions} of them reaching the "
                      f"output layer (from {shape.source})")
    if cfg.adapter.kind != "none":
        formula = "r x (d_in + d_out)" + (" + d_out" if cfg.adapter.kind == "dora" else "")
        console.print(f"{cfg.adapter.kind}: {formula} per adapted matrix, r = {cfg.adapter.r}")
    arithmetic = Table(title="batch arithmetic", show_header=False)
    for name, value in batch_rows(cfg):
        arithmetic.add_row(name, value)
    console.print(arithmetic)
    what = "resident set (RSS)" if device == "cpu" else "torch.cuda.max_memory_allocated"
    console.print(f"peak is an estimate of the {what} (see alignctl/cli/plan.py); expect the real peak within about 30 %")
