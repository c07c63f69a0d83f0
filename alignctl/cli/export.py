"""`alignctl export run=<run dir> out=<dir> [merge=true|false] [tolerance=X] [push_to_hub=<repo id>]`: a
run's checkpoint as a clean Hugging Face directory that plain transformers / peft load, with a model
card (README.md, alignctl/runs/model_card.py), uploaded to the hub when push_to_hub names a repository.

merge=false copies the model (or the adapter) and its tokenizer, without the trainer state.
merge=true folds a LoRA/DoRA adapter into its base and saves a full model. A QLoRA adapter trained
on the 4-bit base, and its checkpoint names that base (models.anchor_4bit), so the merge goes into
the dequantised NF4 weights (transformers' `dequantize`), the values the 4-bit matmuls used, and the
merged model is saved in the compute dtype: the model that trained, not the full-precision original.
Before saving, the merged model and the adapter model it came from score the same probe inputs; their
largest logit difference, relative to the largest logit (rounding grows with the logits' size, so an
absolute bound refuses correct merges of real models), must stay within `tolerance` (default 1e-4
in float32, 5e-2 in 16-bit), and both figures are recorded in <out>/alignctl_export.json.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from alignctl.cli import key_values
from alignctl.core.errors import UserError
from alignctl.runs.model_card import write_card
from alignctl.runs.outputs import check_output

KEYS = {"run": "<run dir>", "out": "<dir>", "merge": "false", "tolerance": "", "push_to_hub": "", "private": "false"}
TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 5e-2}  # relative to the largest logit
PROBE_SHAPE = (4, 24)
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")  # rows x tokens of random ids both models score


def parse(args: list[str]) -> dict[str, str]:
    values = key_values.parse("export", args, KEYS)
    for switch in ("merge", "private"):
        key_values.flag("export", values, switch)
    repo = values["push_to_hub"]
    if repo and not REPO_ID.fullmatch(repo):
        raise UserError(f"export: push_to_hub={repo!r} is not a hub repository id (owner/name, letters, digits, '-', '_', '.')")
    return values


def export_command(args: list[str]) -> None:
    options = parse(args)
    run = Path(options["run"]).expanduser()
    checkpoint = run / "checkpoint"
    if not (run / "lineage.json").exists():
        raise UserError(f"run={run}: not an alignctl run directory (no lineage.json)")
    if not checkpoint.exists():
        raise UserError(f"run={run}: has no checkpoint/ to export (did it save?)")
    out = Path(options["out"]).expanduser()
    check_output(out, "out")  # an export inside a run's checkpoints/ was once counted as a checkpoint and pruned the real one
    if out.exists() and any(out.iterdir()):
        raise UserError(f"out={out}: exists and is not empty; give a new directory (nothing there was changed)")
    merge = options["merge"].lower() == "true"
    adapter_config = checkpoint / "adapter_config.json"
    if merge and not adapter_config.exists():
        raise UserError(f"run={run}: trained the full model (no adapter), so there is nothing to merge; export it with merge=false")

    from alignctl.cli.app import quiet_libraries
    from alignctl.core.console import console
    from alignctl.train.metrics import summary_table

    quiet_libraries()
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    record: dict[str, Any] = {"run": str(run.resolve()), "checkpoint": str(checkpoint.resolve()), "merge": merge}
    if merge:
        record |= merge_adapter(checkpoint, run, tmp, options["tolerance"] or None)
    else:
        shutil.copytree(checkpoint.resolve(), tmp, ignore=shutil.ignore_patterns("trainer_state.pt", "value_model"))
    (tmp / "alignctl_export.json").write_text(json.dumps(record, indent=2) + "\n")
    write_card(tmp, run, export=record)
    if out.exists():
        out.rmdir()  # empty (checked above)
    os.replace(tmp, out)
    shown = {**{k: v for k, v in record.items() if k not in ("run", "checkpoint")}, "out": str(out)}
    if options["push_to_hub"]:
        shown["pushed to"] = push_to_hub(out, options["push_to_hub"], options["private"].lower() == "true", run)
    console.print(summary_table(f"exported {run}", shown))


def push_to_hub(folder: Path, repo_id: str, private: bool, run: Path) -> str:
    """Upload an export (weights, tokenizer, model card) to the hub through huggingface_hub; return the commit's URL.
    The export stays on disk whatever happens, so a failed upload is one line and a rerun of the upload alone."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=f"alignctl export of {run.name}")
    except Exception as err:  # HTTP errors, no network (httpx's ConnectError is not an OSError), offline mode, a bad token
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"push_to_hub={repo_id}: the upload failed ({first}); the export is complete in {folder} "
                        "(log in with `hf auth login` or set HF_TOKEN, then `hf upload` it or export again)") from None
    return str(getattr(commit, "commit_url", commit))


def merge_adapter(checkpoint: Path, run: Path, out: Path, tolerance: str | None) -> dict[str, Any]:
    """Merge the adapter of `checkpoint` into its base, check it against the unmerged model, save it to `out`."""
    import torch
    from omegaconf import OmegaConf
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from alignctl.models.loading import DTYPES, four_bit_config, keep_4bit_trainable, quantized_on_disk
    from alignctl.models.pread_loading import reads_not_mapped

    adapter_config = json.loads((checkpoint / "adapter_config.json").read_text())
    base = adapter_config["base_model_name_or_path"]
    cfg = OmegaConf.load(run / "config.yaml")
    adapter, model_cfg, hardware = cfg.adapter, cfg.model, cfg.hardware
    quantized = adapter.kind == "qlora"
    # hardware.dtype=auto (a base stored in bf16 for training, alignctl/models/precision.py) exports in float32.
    dtype_name = adapter.compute_dtype if quantized else "float32" if hardware.dtype == "auto" else hardware.dtype
    dtype = DTYPES[dtype_name]
    auto = AutoModelForSequenceClassification if adapter_config.get("task_type") == "SEQ_CLS" else AutoModelForCausalLM
    extra = {"num_labels": 1} if auto is AutoModelForSequenceClassification else {}

    @reads_not_mapped
    def load_base():
        if not quantized:
            return auto.from_pretrained(base, dtype=dtype, **extra)
        config = four_bit_config(adapter, base, model_cfg, hardware)  # makes bitsandbytes importable (or says it is missing)
        # The 4-bit base the adapter trained on (models.anchor_4bit); an older checkpoint names the
        # full-precision one, quantised here as its run quantised it.
        quantization = {} if quantized_on_disk(base) else {"quantization_config": config}
        # Not repacked for bitsandbytes' CPU inference kernel: dequantize() reads the trained layout.
        return keep_4bit_trainable(auto.from_pretrained(base, dtype=dtype, device_map={"": "cpu"}, **quantization, **extra))

    # The model as trained: the base (4-bit for QLoRA) with the adapter on top.
    trained = PeftModel.from_pretrained(load_base(), str(checkpoint)).eval()
    vocab = trained.get_base_model().config.vocab_size
    probe = torch.randint(3, vocab, PROBE_SHAPE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = trained(input_ids=probe).logits.float()
    if quantized:
        # peft would merge into the 4-bit weights and quantise again; merge into their dequantised
        # values instead (NF4 blocks -> the compute dtype, the values the 4-bit matmuls used).
        del trained
        trained = PeftModel.from_pretrained(load_base().dequantize(), str(checkpoint))
    merged = merge(trained).eval()
    with torch.no_grad():
        after = merged(input_ids=probe).logits.float()
    check = merge_check(before, after, float(tolerance) if tolerance is not None else TOLERANCE[dtype_name])
    if check["relative_difference"] > check["tolerance"]:
        raise UserError(f"export: the merged model's logits differ from the adapter model's by {check['max_abs_logit_difference']:.3g} "
                        f"({check['relative_difference']:.3g} of the largest logit, {check['logit_scale']:.3g}) > tolerance={check['tolerance']:g}; "
                        "nothing was written (a larger tolerance=... accepts it)")
    merged.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(checkpoint).save_pretrained(out)
    return {"base": base, "adapter": adapter.kind, "dtype": dtype_name, **check}


def merge(trained: Any) -> Any:
    """The adapter folded into its base (peft's merge_and_unload)."""
    return trained.merge_and_unload()


def merge_check(before: Any, after: Any, tolerance: float) -> dict[str, float]:
    """How far the merged model's logits (`after`) are from the adapter model's (`before`): the
    largest absolute difference, the largest logit, and their ratio, which `tolerance` bounds.
    A float32 merge rounds each weight once more, an error that grows with the logits' magnitude:
    SmolLM2-135M's logits (up to 35) differ by 1.5e-4 to 2.6e-4 after a correct merge (4e-6 to 7e-6
    of the largest), the tiny model's by ~1e-7."""
    difference = float((before - after).abs().max())
    scale = float(before.abs().max())
    return {"max_abs_logit_difference": difference, "logit_scale": scale,
            "relative_difference": difference / max(scale, 1e-12), "tolerance": tolerance}

