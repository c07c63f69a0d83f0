"""SFT: supervised fine-tuning with cross-entropy on the response tokens.

Trains: a causal LM (full weights with adapter=none, a LoRA adapter with adapter=lora).
Needs: rows in a TRL SFT format: prompt/completion, messages, or text (standard or conversational).
Starts from: ``model`` (tiny, a hub id, a local dir) or ``inputs.policy=<run dir>``.
Writes: ``checkpoint/`` (a Hugging Face model or peft adapter dir, with tokenizer), metrics.jsonl,
eval.json, lineage.json, config.yaml.
Evaluates: loss on the eval split and, on a built-in task, greedy exact-match accuracy.
Assumes: prompts fit in recipe.max_length (see data.overlong); completions are cut to fit.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch
from datasets import Dataset
from omegaconf import DictConfig

from alignctl.config.schema import RunConfig, SFTConfig
from alignctl.core import distributed
from alignctl.core.errors import DataError
from alignctl.data import loading as data_lib
from alignctl.data.batching import (
    BatchStream,
    collate_lm,
    column_counts_other_than,
    column_lengths,
    split_micro,
)
from alignctl.data.encode import IGNORE, encode_rows, sft_example
from alignctl.models.adapters import apply_adapter, parameter_counts
from alignctl.models.loading import base_dir_of, load_causal_lm, load_tokenizer, model_path
from alignctl.nn.lm_head import final_hidden, output_head
from alignctl.nn.losses import sft_loss, sft_loss_from_hidden
from alignctl.nn.varlen_attention import packed_attention
from alignctl.train.evaluate import task_accuracy
from alignctl.train.session import (
    start_process,
    start_training,
)
from alignctl.train.stage_spec import BatchShape, HeldModel, PlanData, Stage


def encode_split(dataset: Dataset, tokenizer, recipe: SFTConfig, cfg: RunConfig, where: str) -> tuple[Dataset, int]:
    """Tokenise rows into input_ids/labels; returns the encoded split and how many rows were dropped."""
    columns = data_lib.format_columns(dataset, "sft", where)  # load_split already checked the values
    # Bound here, not read from `recipe` or `cfg` inside: datasets fingerprints the function with what it
    # closes over, and a setting that changes no row (recipe.lr, recipe.max_steps, logger=wandb) must not
    # re-encode the data.
    max_length, completion_only, overlong = recipe.max_length, recipe.completion_only_loss, cfg.data.overlong.value

    def encode(row: dict, index: int) -> dict | None:
        return sft_example(tokenizer, row, columns, max_length, completion_only, overlong, f"{where}: row {index}")

    kept = encode_rows(dataset, encode, {"input_ids": [], "labels": []}, cfg.data.num_proc, where, recipe.max_length)
    dropped = len(dataset) - len(kept)
    if not recipe.packing:
        return kept, dropped
    packed = pack(kept, recipe.max_length)
    if not len(packed):
        tokens = sum(len(ids) for ids in kept["input_ids"])
        raise DataError(f"{where}: recipe.packing=true needs at least one block of recipe.max_length={recipe.max_length} tokens, "
                        f"and the {len(kept)} rows hold {tokens}; lower recipe.max_length, add rows or set recipe.packing=false")
    return packed, dropped


def pack(dataset: Dataset, block: int) -> Dataset:
    """Concatenate examples and cut the stream into blocks of `block` tokens (attention spans examples)."""
    ids = [t for row in dataset["input_ids"] for t in row]
    labels = [t for row in dataset["labels"] for t in row]
    starts = range(0, len(ids) - block + 1, block)
    return Dataset.from_dict({"input_ids": [ids[s : s + block] for s in starts], "labels": [labels[s : s + block] for s in starts]})


def to_batch(rows: dict[str, list], pad_id: int, device: torch.device, padding_free: bool = False) -> dict:
    if padding_free:
        return packed_batch(rows, device)
    batch = collate_lm([{"input_ids": ids, "labels": labels} for ids, labels in zip(rows["input_ids"], rows["labels"])], pad_id)
    # Labels are shifted inside the loss: the first token of a row is never a target.
    num_items = int((batch["labels"][:, 1:] != IGNORE).sum())
    num_tokens = int(batch["attention_mask"].sum())
    return {**{k: v.to(device) for k, v in batch.items()}, "num_items": num_items, "num_tokens": num_tokens}


def packed_batch(rows: dict[str, list], device: torch.device) -> dict:
    """The rows end to end in one row with no padding (recipe.padding_free), kept apart by position ids
    that restart at 0: attention then stays within each sequence (FlashAttention-2's varlen kernel on
    GPU, alignctl/nn/varlen_attention.py otherwise). Each row's first label is dropped, as padded batches do,
    so the previous row's last position predicts nothing."""
    ids = [t for row in rows["input_ids"] for t in row]
    labels = [t for row in rows["labels"] for t in [IGNORE, *row[1:]]]
    positions = [p for row in rows["input_ids"] for p in range(len(row))]
    batch = {"input_ids": torch.tensor([ids]), "position_ids": torch.tensor([positions]), "labels": torch.tensor([labels])}
    return {**{k: v.to(device) for k, v in batch.items()}, "num_items": sum(t != IGNORE for t in labels), "num_tokens": len(ids)}


def held_models(cfg: RunConfig) -> list[HeldModel]:
    return [HeldModel("policy (trained)", model_path(cfg.model, cfg.inputs.get("policy")), trained=True)]


def labelled_lengths(cfg: RunConfig, data: PlanData) -> list[tuple[int, int]]:
    """(tokens, labelled tokens) of every encoded training row, longest first."""
    encoded = encode_split(data.raw, data.tokenizer, cfg.recipe, cfg, data.where)[0]
    lengths, labelled = column_lengths(encoded, "input_ids").tolist(), column_counts_other_than(encoded, "labels", IGNORE).tolist()
    return sorted(zip(lengths, labelled), reverse=True)


def planned_batch(cfg: RunConfig, data: PlanData, rows: int) -> BatchShape:
    recipe = cfg.recipe
    if recipe.packing:
        return BatchShape(rows, recipe.max_length, rows * recipe.max_length, "packed blocks of recipe.max_length")
    labelled = data.once("sft: (length, labelled tokens), longest first", lambda: labelled_lengths(cfg, data))[:rows]
    positions = sum(n for _, n in labelled)
    if recipe.padding_free:  # the rows end to end in one sequence
        return BatchShape(1, sum(length for length, _ in labelled), positions, data.source)
    return BatchShape(len(labelled), labelled[0][0], positions, data.source)


def run(cfg: RunConfig, raw: DictConfig, run_dir: Path) -> dict[str, float]:
    recipe: SFTConfig = cfg.recipe
    device = start_process(cfg)

    # Data first: a bad dataset should fail before any model is loaded.
    train_raw = data_lib.load_split(cfg.data, "sft", cfg.data.train_split)
    eval_raw = data_lib.load_eval_split(cfg.data, "sft")
    task_rows = data_lib.task_eval_rows(cfg.data)

    path = model_path(cfg.model, cfg.inputs.get("policy"))
    tokenizer = load_tokenizer(path, cfg.model)
    train_set, dropped = encode_split(train_raw, tokenizer, recipe, cfg, f"{cfg.data.path} [{cfg.data.train_split}]")
    eval_set = encode_split(eval_raw, tokenizer, recipe, cfg, f"{cfg.data.path} [{cfg.data.eval_split}]")[0] if eval_raw else None

    model = apply_adapter(load_causal_lm(path, cfg.model, cfg.hardware, cfg.adapter, base_dir=base_dir_of(cfg, run_dir)), cfg.adapter)
    trainable, total = parameter_counts(model)
    step_rows = recipe.batch_size * recipe.grad_accum
    stream = BatchStream(column_lengths(train_set, "input_ids").tolist(), step_rows, cfg.seed, group_by_length=recipe.group_by_length and not recipe.packing, **distributed.current().shard)
    session = start_training(model, tokenizer, stream, cfg, raw, run_dir, "sft", train_raw._fingerprint)
    logger = session.logger
    logger.note(
        f"sft: {len(train_set)} train rows ({dropped} dropped as overlong), model {path}, "
        f"{trainable:,} of {total:,} parameters train ({100 * trainable / total:.2f}%), run dir {run_dir}"
    )

    def next_step() -> list[dict]:
        return [to_batch(train_set[rows], tokenizer.pad_token_id, device, recipe.padding_free) for rows in split_micro(next(stream), recipe.grad_accum)]

    head = output_head(model) if recipe.lm_head_chunk else None

    def loss_of(batch: dict, num_items: int):
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        # A packed (padding-free) row keeps attention within each sequence (alignctl/nn/varlen_attention.py).
        with packed_attention(model, batch["position_ids"]) if "attention_mask" not in batch else nullcontext():
            if head is not None:  # only labelled positions reach the output layer (alignctl/nn/lm_head.py)
                return sft_loss_from_hidden(final_hidden(model, **inputs), head.weight, batch["labels"], num_items, recipe.lm_head_chunk)
            # No cache: transformers looks for packed sequences (padding_free) only without one.
            return sft_loss(model(**inputs, use_cache=False).logits, batch["labels"], num_items)

    @torch.no_grad()
    def evaluate(step: int) -> dict[str, float]:
        if eval_set is None:
            return {}
        model.eval()
        loss_sum, items = 0.0, 0
        for start in range(0, len(eval_set), recipe.eval_batch_size):
            batch = to_batch(eval_set[start : start + recipe.eval_batch_size], tokenizer.pad_token_id, device)
            loss_sum += float(loss_of(batch, 1)[0])
            items += batch["num_items"]
        result = {"eval_loss": loss_sum / items}
        result |= task_accuracy(model, tokenizer, data_lib.eval_task_path(cfg.data), task_rows, recipe.eval_max_new_tokens, recipe.eval_batch_size)
        logger.note(f"step {step}: " + "  ".join(f"{k}={v:.4f}" for k, v in result.items()))
        return result

    return session.train(evaluate, next_step, loss_of, shown=("loss", "mean_token_accuracy", "epoch"))


STAGE = Stage("sft", run, held_models, data_format="sft", planned_batch=planned_batch)
