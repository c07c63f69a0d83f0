"""`alignctl plan <train overrides> --fit <memory>`: the largest per-device batch that fits a memory
budget, by plan's own estimate (alignctl/cli/plan.py).

The budget is per device: one GPU's memory, or on a CPU one process's resident set (the device the
hardware group trains on, as `plan` decides it). The effective batch the user configured is kept
exactly: every candidate's recipe.batch_size x recipe.grad_accum equals the configured product (the
processes, hardware.nproc, unchanged), so the per-device batches tried are the divisors of that
product, largest first; a larger effective batch is the user's call (raise recipe.grad_accum and fit
again). Memory savers are tried in the order that costs the least: the configured adapter without
gradient checkpointing, then with it, then each lighter adapter (none or dora -> lora -> qlora, qlora
only where bitsandbytes is installed) without and with it (only with it, where the user configured
hardware.gradient_checkpointing=true). The first of these settings under which
any batch fits gives the proposal: its largest batch that fits. The estimate grows with the batch (a
wider micro-batch keeps more activations), so each setting tries its largest batch, then its smallest,
then bisects between the two: a handful of estimates per setting.

Each candidate is the user's overrides plus its own, validated and estimated by plan's own code path
(plan.estimate_of, which `plan` passes in). Two slow parts are shared between candidates: Hydra
composes once per adapter (the searched keys are then set on a copy, as an override sets them), and
the data's token lengths are computed once (plan_data.BatchShapes).
"""

from __future__ import annotations

import functools
import importlib.machinery
import math
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from alignctl.core.console import size
from alignctl.core.errors import UserError

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
SIZE_FORMS = "a number of bytes or one with a unit: 80GiB, 80GB, 512MiB, 1.5TiB (KiB/MiB/GiB/TiB = 2^10/20/30/40, KB/MB/GB/TB = 10^3/6/9/12)"
LIGHTER = {"none": ["lora", "qlora"], "dora": ["lora", "qlora"], "lora": ["qlora"], "qlora": []}
SEARCHED_KEYS = ("recipe.batch_size", "recipe.grad_accum", "hardware.gradient_checkpointing")


def parse_size(text: str) -> float:
    """Bytes in a memory size such as 80GiB, 80GB, 512MiB, 1.5TiB or 1073741824."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in UNITS or float(match.group(1)) <= 0:
        raise UserError(f"plan --fit {text!r}: not a memory size; give {SIZE_FORMS}")
    return float(match.group(1)) * UNITS[unit]


def budget_text(nbytes: float) -> str:
    """A size --fit accepts, at least `nbytes`: 1.3GiB, 494.4MiB."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{math.ceil(nbytes / scale * 10) / 10:g}{unit}"
    return str(math.ceil(nbytes))


def take_fit(args: list[str]) -> tuple[str | None, list[str]]:
    """(the value of --fit VALUE or --fit=VALUE, or None; the other arguments)."""
    rest, value, i = [], None, 0
    while i < len(args):
        name, eq, given = args[i].partition("=")
        if name == "--fit":
            if not eq:
                if i + 1 >= len(args) or args[i + 1].startswith("-"):
                    raise UserError(f"plan --fit needs a memory size per device, e.g. --fit 80GiB; give {SIZE_FORMS}")
                given, i = args[i + 1], i + 1
            value = given
        else:
            rest.append(args[i])
        i += 1
    return value, rest


@dataclass(frozen=True)
class Candidate:
    batch_size: int
    grad_accum: int
    checkpointing: bool
    adapter: str

    def overrides(self, configured_adapter: str) -> list[str]:
        """The overrides to paste; the adapter only when it differs from the configured one."""
        ours = [f"recipe.batch_size={self.batch_size}", f"recipe.grad_accum={self.grad_accum}",
                f"hardware.gradient_checkpointing={str(self.checkpointing).lower()}"]
        return ours + ([f"adapter={self.adapter}"] if self.adapter != configured_adapter else [])


@dataclass(frozen=True)
class Tried:
    candidate: Candidate
    peak: float  # plan's estimate, bytes per device
    trainable: int  # parameters the trained model trains
    fits: bool


def per_device_batches(batch_size: int, grad_accum: int) -> list[int]:
    """Per-device batches that keep batch_size x grad_accum exactly: its divisors, largest first."""
    product = batch_size * grad_accum
    return [b for b in range(product, 0, -1) if product % b == 0]


def qlora_possible() -> bool:
    """bitsandbytes installed (asked of the import system itself: the CLI holds its import back)."""
    return importlib.machinery.PathFinder.find_spec("bitsandbytes") is not None


def settings(adapter: str, with_qlora: bool, checkpointing: bool = False) -> list[tuple[str, bool]]:
    """(adapter, gradient checkpointing) in the order --fit tries them: the cheapest change first.
    Checkpointing configured on stays on (the user traded the recompute for the batch already)."""
    adapters = [adapter] + [a for a in LIGHTER.get(adapter, []) if a != "qlora" or with_qlora]
    return [(a, on) for a in adapters for on in ((True,) if checkpointing else (False, True))]


def candidate_args(args: list[str], candidate: Candidate, configured_adapter: str) -> list[str]:
    """The user's overrides with the searched keys (and the adapter group, when it changes) replaced."""
    replaced = set(SEARCHED_KEYS) | ({"adapter"} if candidate.adapter != configured_adapter else set())
    kept = [a for a in args if a.split("=", 1)[0].lstrip("+~") not in replaced]
    return kept + candidate.overrides(configured_adapter)


# (a composed config) -> (plan's peak estimate in bytes, trainable parameters, device)
Estimate = Callable[[Any], tuple[float, int, str]]


class Compositions:
    """Composed configs of candidates: Hydra composes once per adapter group; the searched keys are set
    on a copy of that, which is what their overrides do."""

    def __init__(self, args: list[str], configured_adapter: str) -> None:
        self.args, self.configured_adapter = args, configured_adapter
        self.by_adapter: dict[str, Any] = {}

    def __call__(self, candidate: Candidate) -> Any:
        import copy

        from omegaconf import OmegaConf

        from alignctl.config.compose import compose_config

        if candidate.adapter not in self.by_adapter:
            self.by_adapter[candidate.adapter] = compose_config(candidate_args(self.args, candidate, self.configured_adapter))
        composed = copy.deepcopy(self.by_adapter[candidate.adapter])
        for override in candidate.overrides(self.configured_adapter)[:len(SEARCHED_KEYS)]:
            key, value = override.split("=", 1)
            OmegaConf.update(composed, key, int(value) if value.isdigit() else value == "true")
        return composed


@dataclass
class Fit:
    budget: float
    device: str
    configured: Candidate
    tried: list[Tried]
    proposal: Tried | None
    args: list[str]  # the user's overrides
    processes: int = 1

    def considered(self) -> list[Tried]:
        """The candidates tried, grouped by setting in the order tried, largest batch first."""
        settings = list(dict.fromkeys((t.candidate.adapter, t.candidate.checkpointing) for t in self.tried))
        return sorted(self.tried, key=lambda t: (settings.index((t.candidate.adapter, t.candidate.checkpointing)), -t.candidate.batch_size))

    def proposal_args(self) -> list[str]:
        return candidate_args(self.args, self.proposal.candidate, self.configured.adapter) if self.proposal else []

    def adapter_change(self) -> str | None:
        """What a proposal with another adapter trains instead, in words (None: the configured adapter)."""
        if self.proposal is None or self.proposal.candidate.adapter == self.configured.adapter:
            return None
        before = next((t.trainable for t in self.tried if t.candidate.adapter == self.configured.adapter), None)
        new, old = self.proposal.candidate.adapter, self.configured.adapter
        if before is None:
            was = "the configured ones"
        else:
            was = f"all {before:,} parameters (full fine-tuning)" if old == "none" else f"{before:,} {old} parameters"
        return (f"adapter={self.configured.adapter} -> adapter={new} changes what trains: {self.proposal.trainable:,} {new} parameters "
                f"over a frozen{' 4-bit' if new == 'qlora' else ''} base instead of {was}")


def search(cfg: Any, args: list[str], budget: float, evaluate: Estimate) -> Fit:
    """Try the candidates in --fit's order (module docstring) until one fits. `cfg`: the configured
    run, validated; `args`: its overrides; `evaluate`: plan's estimate of a candidate's composed config."""
    if not hasattr(cfg.recipe, "grad_accum"):
        raise UserError(f"plan --fit: recipe={cfg.recipe.stage} trains nothing, so there is no batch to fit; --fit sizes training recipes")
    configured = Candidate(cfg.recipe.batch_size, cfg.recipe.grad_accum, cfg.hardware.gradient_checkpointing, cfg.adapter.kind)
    product = configured.batch_size * configured.grad_accum
    fit = Fit(budget, "cpu", configured, [], None, args, int(getattr(cfg.hardware, "nproc", 1) or 1))
    composed = Compositions(args, configured.adapter)
    batches = per_device_batches(configured.batch_size, configured.grad_accum)

    def attempt(batch: int, adapter: str, checkpointing: bool) -> Tried:
        candidate = Candidate(batch, product // batch, checkpointing, adapter)
        peak, trainable, fit.device = evaluate(composed(candidate))
        fit.tried.append(Tried(candidate, peak, trainable, peak <= budget))
        return fit.tried[-1]

    for adapter, checkpointing in settings(configured.adapter, qlora_possible(), configured.checkpointing):
        try:
            fit.proposal = largest_fitting(batches, functools.partial(attempt, adapter=adapter, checkpointing=checkpointing))
        except UserError:
            if adapter == configured.adapter:  # the run as configured is wrong: plan says so in its own words
                raise
            continue  # a lighter adapter this model cannot take (its check_rank, check_targets): not a candidate
        if fit.proposal is not None:
            return fit
    return fit


def largest_fitting(batches: list[int], attempt: Callable[[int], Tried]) -> Tried | None:
    """The largest of `batches` (largest first) that fits, assuming a larger batch never needs less."""
    largest = attempt(batches[0])
    if largest.fits or len(batches) == 1:
        return largest if largest.fits else None
    smallest = attempt(batches[-1])
    if not smallest.fits:
        return None
    no, yes = 0, len(batches) - 1  # indices into batches: one that does not fit, one that fits
    best = smallest
    while yes - no > 1:
        middle = attempt(batches[(no + yes) // 2])
        if middle.fits:
            yes, best = (no + yes) // 2, middle
        else:
            no = (no + yes) // 2
    return best


def nothing_fits(fit: Fit, text: str) -> UserError:
    smallest = min(fit.tried, key=lambda t: t.peak)
    pasted = " ".join(smallest.candidate.overrides(fit.configured.adapter))
    return UserError(f"plan --fit {text}: nothing fits in that per device on {fit.device}; the smallest configuration tried "
                     f"({pasted}) needs an estimated {budget_text(smallest.peak)}: give --fit {budget_text(smallest.peak)} or more, "
                     f"or lower recipe.max_length (or a smaller model)")


def record(fit: Fit) -> dict[str, Any]:
    """`plan --fit ... --json`: the candidates and the proposal, memory in bytes."""
    def row(t: Tried) -> dict[str, Any]:
        c = t.candidate
        return {"batch_size": c.batch_size, "grad_accum": c.grad_accum, "gradient_checkpointing": c.checkpointing,
                "adapter": c.adapter, "peak": t.peak, "trainable": t.trainable, "fits": t.fits}

    proposal = None
    if fit.proposal is not None:
        proposal = {**row(fit.proposal), "overrides": fit.proposal.candidate.overrides(fit.configured.adapter),
                    "command": shlex.join(["alignctl", "train", *fit.proposal_args()]), "adapter_change": fit.adapter_change()}
    return {"budget": fit.budget, "per": "device", "device": fit.device,
            "effective_batch": fit.configured.batch_size * fit.configured.grad_accum * fit.processes, "processes": fit.processes,
            "candidates": [row(t) for t in fit.considered()], "proposal": proposal}


def print_fit(fit: Fit, text: str) -> None:
    from rich.table import Table

    from alignctl.core.console import console

    what = "resident set (RSS) of one process" if fit.device == "cpu" else "memory of one GPU"
    table = Table(title=f"plan --fit {text} ({fit.budget:,.0f} bytes) per device: candidates by the estimated peak {what} on {fit.device}")
    for column in ("recipe.batch_size", "recipe.grad_accum", "gradient checkpointing", "adapter", "estimated peak", "fits"):
        table.add_column(column, justify="left" if column in ("adapter", "fits") else "right")
    for t in fit.considered():
        c = t.candidate
        table.add_row(str(c.batch_size), str(c.grad_accum), "on" if c.checkpointing else "off", c.adapter, size(t.peak), "yes" if t.fits else "no")
    console.print(table)
    chosen = fit.proposal
    c = chosen.candidate
    console.print(f"proposal: estimated peak {size(chosen.peak)} of {size(fit.budget)} (plan expects the real peak within about 30 %); "
                  f"the effective batch as configured, {c.batch_size} per device x {c.grad_accum} accumulation x {fit.processes} processes "
                  f"= {c.batch_size * c.grad_accum * fit.processes}")
    console.print("  " + " ".join(chosen.candidate.overrides(fit.configured.adapter)), markup=False)
    if change := fit.adapter_change():
        console.print(change, markup=False)
    console.print("to train it:  " + shlex.join(["alignctl", "train", *fit.proposal_args()]), markup=False, soft_wrap=True)


def fit_command(cfg: Any, args: list[str], text: str, as_json: bool, evaluate: Estimate) -> None:
    """`alignctl plan <overrides> --fit <memory> [--json]`; `text`: the budget as given (parse_size)."""
    import json

    fit = search(cfg, args, parse_size(text), evaluate)
    if fit.proposal is None:
        raise nothing_fits(fit, text)
    if as_json:
        print(json.dumps(record(fit), indent=2))
    else:
        print_fit(fit, text)
