"""The widest micro-batch a run will put through its trained model, from the data's own token lengths.

`plan` sizes activations from this shape rather than from recipe.max_length: real rows are often far
shorter than the limit, and activations grow with the padded width of the widest batch. Each stage
declares how (its `planned_batch`, registered beside its run); the rows are encoded by the stage's own functions (so the lengths are exactly the ones the run will see, and
`datasets` caches the encoding for the run). Where the data cannot be read here (a hub dataset
offline, a tokenizer not downloaded) or the stage is not covered, the shape falls back to
recipe.max_length and says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from alignctl.errors import UserError


@dataclass(frozen=True)
class BatchShape:
    rows: int  # sequences in one micro-batch of the trained model
    width: int  # padded tokens per sequence
    positions: int  # positions that reach the output layer (the loss positions)
    source: str  # how it was sized, printed by plan


def from_max_length(cfg: Any, rows: int, reason: str) -> BatchShape:
    width = getattr(cfg.recipe, "max_length", 0)
    return BatchShape(rows, width, rows * width, f"recipe.max_length ({reason})")


def longest(lengths: list[int], count: int) -> list[int]:
    return sorted(lengths, reverse=True)[:count]


@dataclass(frozen=True)
class PlanData:
    """A run's training split as its stage will encode it."""

    tokenizer: Any
    raw: Any  # the datasets.Dataset of the training split
    where: str  # how errors name it
    source: str  # how plan names the sizing


def widest_possible(cfg: Any, tokenizer_path: str) -> BatchShape:
    """A shape no micro-batch exceeds, without reading the data: full rows of recipe.max_length (DPO's
    twice that: its longest prompt and longest response may come from different rows)."""
    from alignctl.registry import stage

    spec = stage(cfg.recipe.stage)
    shape = from_max_length(cfg, spec.sequences_per_row * cfg.recipe.batch_size, "the widest the recipe allows")
    k = spec.max_length_multiple
    return BatchShape(shape.rows, k * shape.width, k * shape.positions, shape.source)


def batch_shape(cfg: Any, tokenizer_path: str) -> BatchShape:
    """The shape of the widest micro-batch of the trained model (policy, or reward model), from the
    stage's own `planned_batch` (registered beside its run)."""
    from alignctl.registry import stage

    spec = stage(cfg.recipe.stage)
    rows = spec.sequences_per_row * cfg.recipe.batch_size
    if spec.planned_batch is None:
        return from_max_length(cfg, rows, f"recipe={spec.name} is not sized from its data")
    try:
        return spec.planned_batch(cfg, _read(cfg, tokenizer_path, spec.data_format), rows)
    except (UserError, OSError, ValueError) as err:
        return from_max_length(cfg, rows, f"the data could not be read here: {str(err).strip().splitlines()[0][:120]}")


def _read(cfg: Any, tokenizer_path: str, data_format: str) -> PlanData:
    from alignctl import data as data_lib
    from alignctl.models import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path, cfg.model)
    raw = data_lib.load_split(cfg.data, data_format, cfg.data.train_split)
    return PlanData(tokenizer, raw, f"{cfg.data.path} [{cfg.data.train_split}]", f"the {len(raw):,} training rows' token lengths")
