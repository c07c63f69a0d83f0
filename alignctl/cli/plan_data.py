"""The widest micro-batch a run will put through its trained model, from the data's own token lengths.

`plan` sizes activations from this shape rather than from recipe.max_length: real rows are often far
shorter than the limit, and activations grow with the padded width of the widest batch. Each stage
declares how (its `planned_batch`, in its STAGE beside its run: alignctl/train/stage_spec.py); the rows are encoded by the stage's own functions (so the lengths are exactly the ones the run will see, and
`datasets` caches the encoding for the run). Where the data cannot be read here (a hub dataset
offline, a tokenizer not downloaded) or the stage is not covered, the shape falls back to
recipe.max_length and says so.
"""

from __future__ import annotations

from typing import Any

from alignctl.core.errors import UserError
from alignctl.data import loading as data_lib
from alignctl.models.loading import load_tokenizer
from alignctl.stages.registry import stage
from alignctl.train.stage_spec import BatchShape, PlanData, from_max_length


def widest_possible(cfg: Any, tokenizer_path: str) -> BatchShape:
    """A shape no micro-batch exceeds, without reading the data: full rows of recipe.max_length (DPO's
    twice that: its longest prompt and longest response may come from different rows)."""
    spec = stage(cfg.recipe.stage)
    shape = from_max_length(cfg, spec.sequences_per_row * cfg.recipe.batch_size, "the widest the recipe allows")
    k = spec.max_length_multiple
    return BatchShape(shape.rows, k * shape.width, k * shape.positions, shape.source)


def batch_shape(cfg: Any, tokenizer_path: str) -> BatchShape:
    """The shape of the widest micro-batch of the trained model (policy, or reward model), from the
    stage's own `planned_batch` (in its STAGE, beside its run)."""
    return BatchShapes()(cfg, tokenizer_path)


class BatchShapes:
    """batch_shape for configs that differ only in batch size, accumulation, gradient checkpointing and
    adapter (`plan --fit`'s candidates): the data is read, and its token lengths computed, once per
    tokenizer (PlanData.once); a split that cannot be read is tried once."""

    def __init__(self) -> None:
        self.read: dict[str, PlanData | str] = {}  # tokenizer path -> its data, or why it cannot be read

    def __call__(self, cfg: Any, tokenizer_path: str) -> BatchShape:
        spec = stage(cfg.recipe.stage)
        rows = spec.sequences_per_row * cfg.recipe.batch_size
        if spec.planned_batch is None:
            return from_max_length(cfg, rows, f"recipe={spec.name} is not sized from its data")
        if not isinstance(self.read.get(tokenizer_path), str):
            try:
                if tokenizer_path not in self.read:
                    self.read[tokenizer_path] = _read(cfg, tokenizer_path, spec.data_format)
                return spec.planned_batch(cfg, self.read[tokenizer_path], rows)
            except (UserError, OSError, ValueError) as err:
                self.read[tokenizer_path] = str(err).strip().splitlines()[0][:120]
        return from_max_length(cfg, rows, f"the data could not be read here: {self.read[tokenizer_path]}")


def _read(cfg: Any, tokenizer_path: str, data_format: str) -> PlanData:
    tokenizer = load_tokenizer(tokenizer_path, cfg.model)
    raw = data_lib.load_split(cfg.data, data_format, cfg.data.train_split)
    return PlanData(tokenizer, raw, f"{cfg.data.path} [{cfg.data.train_split}]", f"the {len(raw):,} training rows' token lengths")
