"""The one optimisation loop, shared by every stage.

A stage hands it `next_step` (returns the micro-batches of one optimiser step, each a dict of tensors
plus ``num_items``, the count its loss is normalised by, and ``num_tokens``, the non-padding tokens it
carries; see batching.split_micro) and `step_fn`
(micro-batch, items in the whole step -> (loss share, metric shares)). Shares add up: summing them
over the micro-batches of a step gives the full-batch mean, so B x accumulation A equals a batch of
A*B exactly, whatever the padding. Evaluation and saving are callbacks on a step cadence.

With recipe.guard on, every step's metrics and every evaluation go through the guard
(alignctl/train/guard.py): a signal that trips is one printed line and a metrics.jsonl record; with
recipe.guard=stop the run ends after that step like a finished one (saved, evaluated, `guard_stop` set).

A step whose loss or gradient norm is not finite stops the run (`NonFiniteLoss`) or, with
recipe.nonfinite=skip, changes no weight and is counted in `skipped_steps`. A SIGINT/SIGTERM ends
the run after the current step with a checkpoint (alignctl/runs/interrupt.py).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from alignctl.config.schema import GuardMode, NonFinite, TrainConfig
from alignctl.core import distributed
from alignctl.core.errors import NonFiniteLoss
from alignctl.models import precision
from alignctl.runs.interrupt import Interrupted, StopRequests
from alignctl.train.guard import Guard, Trip, guard_for
from alignctl.train.metrics import MetricsLogger

Batch = dict[str, Any]
StepFn = Callable[[Batch, int], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class LoopContext:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    logger: MetricsLogger
    evaluate: Callable[[int], dict[str, float]]
    save: Callable[[int], None]
    autocast: str | None = None
    device_type: str = "cpu"
    tokens_seen: int = 0  # non-padding tokens through the model so far (TRL's num_tokens)
    skipped_steps: int = 0  # non-finite steps skipped (recipe.nonfinite=skip)
    sharded: bool = False  # FSDP: it reduce-scatters (averages) the gradients itself
    step: int = 0  # the last optimiser step that finished (what a signal arriving now interrupts after)
    guard_stop: str | None = None  # the guard's line when recipe.guard=stop ended the run early
    guard: Guard | None = None  # recipe.guard's monitor: the session builds it so a resume can restore it; else train_loop does


def _autocast(ctx: LoopContext) -> contextlib.AbstractContextManager:
    return precision.autocast(ctx.autocast, ctx.device_type)


def _evaluate(ctx: LoopContext, step: int) -> dict[str, float]:
    with _autocast(ctx):
        return ctx.evaluate(step)


def train_loop(
    ctx: LoopContext, recipe: TrainConfig, next_step: Callable[[], list[Batch]], step_fn: StepFn, start_step: int = 0
) -> dict[str, float]:
    """Run optimiser steps start_step+1 .. recipe.max_steps; return the last train and eval metrics."""
    last: dict[str, float] = {}
    if ctx.guard is None:
        ctx.guard = guard_for(recipe)
    guard = ctx.guard
    if start_step == 0 and (baseline := _evaluate(ctx, 0)):  # the untrained model, so every run shows what training changed
        ctx.logger.log({"step": 0, **baseline})
        last.update(baseline)  # all there is when max_steps=0 (alignctl eval)
        if guard is not None:
            guard.after_eval(0, baseline)
    with StopRequests(lambda signum: ctx.logger.note(f"received signal {signum}: finishing this step, then saving")) as stop:
        for step in range(start_step + 1, recipe.max_steps + 1):
            last = _one_step(ctx, recipe, next_step, step_fn, step)
            ctx.step = step
            trips = guard.after_step(step, dict(last)) if guard is not None else []
            final = step == recipe.max_steps
            evaluated = final or (recipe.eval_every and step % recipe.eval_every == 0)
            if evaluated:
                eval_metrics = _log_evaluation(ctx, step, last)
                trips += guard.after_eval(step, eval_metrics) if guard is not None else []
            guard_stops = guard is not None and _guard_stops(ctx, recipe, trips, step)
            if guard_stops and not evaluated:  # the run's eval.json describes the checkpoint it ends with
                _log_evaluation(ctx, step, last)
            # Every process stops after the same step, even if the signal reached only some of them.
            stopping = stop.signum is not None if not distributed.current().active else distributed.sum_across(stop.signum or 0) > 0
            saved = final or guard_stops or (recipe.save_every and step % recipe.save_every == 0)
            if saved or stopping:
                ctx.save(step)
            if guard_stops and not final:
                break  # a finished run, not an interrupted one: the caller records ctx.guard_stop
            if stopping and not final:
                raise Interrupted(stop.signum or 15, step)
    return last


def _log_evaluation(ctx: LoopContext, step: int, last: dict[str, float]) -> dict[str, float]:
    eval_metrics = _evaluate(ctx, step)
    if eval_metrics:
        ctx.logger.log({"step": step, **eval_metrics})
        last.update(eval_metrics)
    return eval_metrics


def _guard_stops(ctx: LoopContext, recipe: TrainConfig, trips: list[Trip], step: int) -> bool:
    """Report what tripped (one line each; with stop, the first only) and whether the run ends here.
    Evaluations run on the main process alone, so every process follows its decision."""
    stop = recipe.guard == GuardMode.stop
    for trip in trips[:1] if stop else trips:
        line = f"guard: {trip.message}; " + (f"stopping at step {step}" if stop else "training on (recipe.guard=warn)")
        ctx.logger.note(line)
        ctx.logger.log({"step": step, "guard": trip.signal, "guard_message": line})
        if stop:
            ctx.guard_stop = line
    tripped = stop and bool(trips)
    return distributed.sum_across(int(tripped)) > 0 if distributed.current().active else tripped


def _one_step(ctx: LoopContext, recipe: TrainConfig, next_step: Callable[[], list[Batch]], step_fn: StepFn, step: int) -> dict[str, float]:
    """One optimiser step (forward and backward over its micro-batches, clip, update); its metrics."""
    started = time.perf_counter()
    ctx.model.train()
    with _autocast(ctx):  # an RL stage's rollout and scoring too: over a bf16 base, every forward is mixed
        micro_batches = next_step()
    fetched = time.perf_counter()  # RL stages sample their rollout inside next_step
    # Normalise by the items of the whole step, not per micro-batch (see module docstring), across
    # every process (each holds a slice of the global step).
    num_items = int(distributed.sum_across(sum(int(mb["num_items"]) for mb in micro_batches)))
    totals: dict[str, float] = {}
    for batch in micro_batches:
        with _autocast(ctx):
            loss, metrics = step_fn(batch, num_items)
        # FSDP averages gradients over the processes: scaled, the shares still add up.
        (loss * distributed.current().world_size if ctx.sharded else loss).backward()
        for key, value in {"loss": loss, **metrics}.items():
            value = float(value.detach())  # a `_max` metric is the largest of the micro-batches, the rest add up
            totals[key] = max(totals.get(key, value), value) if distributed.is_max_metric(key) else totals.get(key, 0.0) + value
    params = [p for p in ctx.model.parameters() if p.requires_grad]
    if not ctx.sharded:
        distributed.sum_gradients(params)  # each process's shares add up to the global step's gradient
    totals = distributed.reduce_metrics(totals)
    # clip_grad_norm_ with an infinite max norm returns the norm without clipping.
    norm = torch.nn.utils.clip_grad_norm_(params, recipe.max_grad_norm or float("inf"))
    grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # a DTensor under FSDP
    lr = ctx.scheduler.get_last_lr()[0]  # the rate this step uses (read before the scheduler moves on)
    problem = _non_finite(totals["loss"], grad_norm)
    if problem and recipe.nonfinite == NonFinite.stop:
        ctx.optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLoss(step, problem)
    if problem:
        ctx.skipped_steps += 1  # no update; the schedule still advances, so step N keeps step N's rate
    else:
        ctx.optimizer.step()
    ctx.scheduler.step()
    ctx.optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - started
    tokens = int(distributed.sum_across(sum(int(mb["num_tokens"]) for mb in micro_batches)))
    ctx.tokens_seen += tokens
    record = {
        **totals,
        "grad_norm": grad_norm,
        "learning_rate": lr,
        "num_tokens": ctx.tokens_seen,
        "tokens_per_second": tokens / seconds,
        "step_seconds": seconds,
        "time/training": time.perf_counter() - fetched,  # forward, backward and optimiser step only
        **({"skipped_steps": ctx.skipped_steps} if recipe.nonfinite == NonFinite.skip else {}),
    }
    ctx.logger.log({"step": step, **record})
    ctx.logger.advance(step)
    return record


def _non_finite(loss: float, grad_norm: float) -> str | None:
    if not math.isfinite(loss):
        return f"the loss is {loss}"
    if not math.isfinite(grad_norm):
        return f"the gradient norm is {grad_norm}"
    return None
