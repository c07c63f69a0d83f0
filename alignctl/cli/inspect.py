"""`alignctl data inspect <train overrides> [rows=3] [--json]`: the training rows as the model sees them.

The config is composed and checked as `alignctl train` would compose it; the tokenizer and the data
load (no model weights), and rows are encoded by the recipe's own training functions (data/encode.py),
so the trained-token marks are the labels the run computes its loss on. Shown: a few rows with trained
tokens highlighted and masked ones dimmed (`[[...]]` around trained text when not on a terminal),
token-length statistics, what recipe.max_length would cut or drop, and chat-template warnings
(alignctl/data/inspection.py).
"""

from __future__ import annotations

import json
from typing import Any

from alignctl.core.errors import DataError, UserError

# Recipes whose rows are prompt + completion(s): what inspect can show.
FORMATS = ("sft", "preference", "feedback")


def data_command(args: list[str]) -> None:
    if not args or args[0] != "inspect":
        raise UserError("data: the one subcommand is inspect: alignctl data inspect recipe=<recipe> [data=...] [model=...] [rows=3] [--json]")
    from alignctl.cli import app as hydra_app

    as_json, args = hydra_app.json_and_overrides("data inspect", args[1:], takes=", rows=N")
    shown = [a for a in args if a.startswith("rows=")]
    args = [a for a in args if not a.startswith("rows=")]
    try:
        rows = int(shown[-1].split("=", 1)[1]) if shown else 3
    except ValueError:
        rows = -1
    if rows < 0:
        raise UserError(f"data inspect: {shown[-1]!r}: rows must be a whole number >= 0 (how many rows to show)")

    from alignctl.config.validation import validate

    (composed,) = hydra_app.check_jobs(args, multirun=False, label="data inspect")
    hydra_app.quiet_libraries()
    cfg = validate(composed)
    report = inspect(cfg, rows)
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        show(report)


def encoded_rows(cfg: Any, tokenizer: Any, raw: Any, fmt: str, where: str) -> list[dict]:
    """Each row as training encodes it: sequences of (input_ids, labels), and the unfitted lengths."""
    from alignctl.data import loading as data_lib
    from alignctl.data.encode import (
        IGNORE,
        encode_completion,
        encode_messages,
        encode_prompt,
        fit_completion,
        fit_prompt,
        preference_example,
        sampled_part,
        sft_example,
    )

    recipe, overlong = cfg.recipe, cfg.data.overlong.value
    columns = data_lib.format_columns(raw, fmt, where)
    out = []
    for index, row in enumerate(raw):
        at = f"{where}: row {index}"
        record: dict[str, Any] = {"index": index, "error": None}
        # The lengths before recipe.max_length: what the limit cuts is measured against them.
        if fmt == "sft" and tuple(columns) == ("messages",):
            ids, trainable = encode_messages(tokenizer, row["messages"])
            head = trainable.index(True) if True in trainable else len(ids)
            record["prompt_tokens"], record["completion_tokens"] = head, len(ids) - head
        elif fmt == "sft" and tuple(columns) == ("text",):
            record["prompt_tokens"], record["completion_tokens"] = 0, len(tokenizer(row["text"])["input_ids"]) + 1
        else:
            completion = row["completion"] if "completion" in row else row["chosen"]
            record["prompt_tokens"] = len(encode_prompt(tokenizer, row["prompt"]))
            record["completion_tokens"] = len(encode_completion(tokenizer, row["prompt"], completion))
        try:
            if fmt == "sft":
                example = sft_example(tokenizer, row, columns, recipe.max_length, recipe.completion_only_loss, overlong, at)
                sequences = None if example is None else [("", example["input_ids"], example["labels"])]
            elif fmt == "preference":
                # the reward model keeps the turn's closing text, where its score is read (stages/reward.py)
                example = preference_example(tokenizer, row, recipe.max_length, overlong, at, turn_tail=cfg.recipe.stage == "reward")
                sequences = None if example is None else [
                    (side, example["prompt_ids"] + example[f"{side}_ids"], [IGNORE] * len(example["prompt_ids"]) + example[f"{side}_ids"])
                    for side in ("chosen", "rejected")]
            else:  # feedback (kto): one completion, judged good or bad, encoded as stages/kto.py encodes it
                prompt_ids = fit_prompt(encode_prompt(tokenizer, row["prompt"]), recipe.max_length, overlong, at)
                completion_ids = None if prompt_ids is None else fit_completion(
                    tokenizer, sampled_part(tokenizer, encode_completion(tokenizer, row["prompt"], row["completion"])), recipe.max_length - len(prompt_ids))
                sequences = None if prompt_ids is None else [
                    ("good" if row["label"] else "bad", prompt_ids + completion_ids, [IGNORE] * len(prompt_ids) + completion_ids)]
        except DataError as err:  # data.overlong=error: this row would stop the run
            sequences, record["error"] = None, str(err)
        record["sequences"] = sequences
        out.append(record)
    return out


def inspect(cfg: Any, rows: int) -> dict[str, Any]:
    from alignctl.data import loading as data_lib
    from alignctl.data.inspection import length_stats, spans, template_warnings, trained_count
    from alignctl.models.loading import load_tokenizer, model_path
    from alignctl.stages.registry import stage

    fmt = stage(cfg.recipe.stage).data_format
    if fmt not in FORMATS:
        raise UserError(f"data inspect: recipe={cfg.recipe.stage} trains on prompts it samples from (no completions to mark); "
                        "valid recipes: sft, reward, dpo, kto")
    tokenizer = load_tokenizer(model_path(cfg.model, cfg.inputs.get("policy") or cfg.inputs.get("init")), cfg.model)
    raw = data_lib.load_split(cfg.data, fmt, cfg.data.train_split)
    where = f"{cfg.data.path} [{cfg.data.train_split}]"
    encoded = encoded_rows(cfg, tokenizer, raw, fmt, where)
    first = raw[0] if len(raw) else {}
    conversational = any(isinstance(v, list) for v in first.values())
    completion_only = bool(getattr(cfg.recipe, "completion_only_loss", True))
    max_length = cfg.recipe.max_length
    kept = [r for r in encoded if r["sequences"] is not None]
    report = {
        "recipe": cfg.recipe.stage, "data": where, "rows": len(encoded), "max_length": max_length, "overlong": cfg.data.overlong.value,
        "prompt_tokens": length_stats([r["prompt_tokens"] for r in encoded]),
        "completion_tokens": length_stats([r["completion_tokens"] for r in encoded]),
        "prompts_over_max_length": sum(r["prompt_tokens"] > max_length - 1 for r in encoded),
        "rows_dropped": sum(r["sequences"] is None and r["error"] is None for r in encoded),
        "rows_stopping_the_run": sum(r["error"] is not None for r in encoded),
        "completions_cut": sum(min(r["prompt_tokens"], max_length - 1) + r["completion_tokens"] > max_length for r in kept),
        "trained_tokens": sum(trained_count(labels) for r in kept for _, _, labels in r["sequences"]),
        "warnings": template_warnings(tokenizer, conversational, completion_only),
        "shown": [{"index": r["index"], "sequences": [{"name": name, "trained_tokens": trained_count(labels), "tokens": len(ids),
                                                       "spans": [{"text": s.text, "trained": s.trained} for s in spans(tokenizer, ids, labels)]}
                                                      for name, ids, labels in r["sequences"]]}
                  for r in kept[:rows]],
    }
    return report


def show(report: dict[str, Any]) -> None:
    from rich.table import Table
    from rich.text import Text

    from alignctl.core.console import console

    plain = not console.is_terminal  # no styles reach a file: mark trained text with [[...]] instead
    console.print(f"recipe={report['recipe']}  data={report['data']}  {report['rows']:,} rows  recipe.max_length={report['max_length']}", markup=False)
    legend = Text("[[trained]] masked") if plain else Text.assemble(("trained", "bold green"), " ", ("masked", "dim"))
    console.print(Text("tokens: ") + legend)
    for row in report["shown"]:
        for seq in row["sequences"]:
            name = f" {seq['name']}" if seq["name"] else ""
            console.print(f"row {row['index']}{name}: {seq['trained_tokens']} of {seq['tokens']} tokens trained", markup=False)
            text = Text()
            for span in seq["spans"]:
                if plain:
                    text.append(f"[[{span['text']}]]" if span["trained"] else span["text"])
                else:
                    text.append(span["text"], style="bold green" if span["trained"] else "dim")
            console.print(text)
    table = Table(title="token lengths (before recipe.max_length)")
    for column in ("", "min", "median", "p95", "max"):
        table.add_column(column, justify="left" if not column else "right")
    for key in ("prompt_tokens", "completion_tokens"):
        s = report[key]
        table.add_row(key.replace("_tokens", ""), str(s["min"]), f"{s['median']:g}", f"{s['p95']:g}", str(s["max"]))
    console.print(table)
    console.print(f"recipe.max_length={report['max_length']} (data.overlong={report['overlong']}): {report['prompts_over_max_length']:,} prompts "
                  f"leave no room for a completion, {report['rows_dropped']:,} rows dropped, {report['rows_stopping_the_run']:,} would stop "
                  f"the run, {report['completions_cut']:,} completions cut; {report['trained_tokens']:,} trained tokens in all", markup=False)
    for warning in report["warnings"]:
        console.print(f"warning: {warning}", style="yellow", markup=False)
