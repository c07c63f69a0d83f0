"""Atomic checkpoints: a plain Hugging Face directory plus the trainer state needed to resume.

Layout inside a run directory::

    checkpoints/step-000200/   model or adapter (safetensors) + tokenizer + trainer_state.pt + alignctl.json
    checkpoint -> checkpoints/step-000200   (symlink to the newest complete checkpoint)

A checkpoint is written to a hidden temporary directory, flushed to disk, then renamed into place;
the `checkpoint` link is swapped with an atomic rename. A crash at any moment leaves the previous
checkpoint intact and linked; a save that fails (a full disk: one line naming the directory) removes its
temporary directory. `transformers`/`peft` load `checkpoint/` without alignctl.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alignctl.core.console import size
from alignctl.core.errors import DiskFull, UserError
from alignctl.models.adapters import load_adapter
from alignctl.runs.model_card import write_card
from alignctl.runs.resume import resume_command

# Where a run's checkpoints are: read without torch by the CLI (runfiles), re-exported for the stages.
from alignctl.runs.runfiles import (  # noqa: F401
    TRAINER_STATE,
    DamagedFile,
    check_weights,
    complete_checkpoints,
    latest_checkpoint,
)


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")) + [root]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def rng_state() -> dict[str, Any]:
    numpy_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        # numpy's state holds an ndarray; store it as plain lists so torch.load(weights_only=True) reads it.
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    tokenizer: Any,
    trainer_state: dict[str, Any],
    meta: dict[str, Any],
    keep_last: int,
    weights: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoints/step-N atomically, point `checkpoint` at it, prune old ones; return its path.
    `weights`: the model's full state when the live model is sharded (FSDP)."""
    folder = run_dir / "checkpoints"
    final = folder / f"step-{step:06d}"
    tmp = folder / f".tmp-{final.name}-{os.getpid()}"
    for stale in folder.glob(".tmp-*"):  # a save cut short by a kill (one writer per run directory)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": weights} if weights is not None else {}))
        tokenizer.save_pretrained(tmp)
        write_card(tmp, run_dir)  # README.md: the model card from lineage.json (in place of peft's stub)
        torch.save(trainer_state, tmp / TRAINER_STATE)
        # A fresh id per save: caches keyed on a model's weights (precomputed reference log-probs) must not
        # mistake a run retrained in place, with the same config and step, for the old one.
        identity = {"step": step, "save_id": uuid.uuid4().hex, **meta}
        (tmp / "alignctl.json").write_text(json.dumps(identity, indent=2, default=str))
        _fsync_tree(tmp)
    except BaseException as err:
        # Never leave half a checkpoint: the previous one stays the run's newest, still linked.
        reason = disk_full(err, folder) if isinstance(err, Exception) else None
        written = _tree_bytes(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if reason:
            raise DiskFull(_disk_full_message(run_dir, step, written, reason)) from None
        raise
    if final.exists():  # the same step saved again (e.g. the end of a run that just saved)
        shutil.rmtree(final)
    tmp.rename(final)
    link_tmp = run_dir / f".checkpoint-{os.getpid()}"
    link_tmp.unlink(missing_ok=True)
    link_tmp.symlink_to(Path("checkpoints") / final.name)
    os.replace(link_tmp, run_dir / "checkpoint")
    _fsync_tree(folder)
    # Only this run's own checkpoints count (by step, not by name): a directory copied in is not one.
    for old in complete_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old)
    return final


# How a full disk or quota reads where the errno did not survive (safetensors' Rust error wraps it).
DISK_FULL_WORDS = {"No space left on device": "no space left on device", "StorageFull": "no space left on device",
                   "Disk quota exceeded": "disk quota exceeded", "QuotaExceeded": "disk quota exceeded"}


def disk_full(err: BaseException, folder: Path) -> str | None:
    """Why a failed write ran out of space (ENOSPC, EDQUOT, their text in a library's error, or a
    filesystem left with almost nothing free), or None when it did not."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return os.strerror(err.errno).lower()
    text = str(err)
    found = next((reason for words, reason in DISK_FULL_WORDS.items() if words in text), None)
    if found:
        return found
    try:  # torch's zip writer drops the errno ("iostream error", "file write failed"): judge by what is left
        return "no space left on device" if shutil.disk_usage(folder).free < 2**20 else None
    except OSError:
        return None


def _tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.exists() else 0


def _disk_full_message(run_dir: Path, step: int, written: int, reason: str) -> str:
    folder = run_dir / "checkpoints"
    previous = latest_checkpoint(run_dir)
    try:
        free = f", {size(shutil.disk_usage(folder).free)} is free there now"
    except OSError:
        free = ""
    if previous is not None:
        needed = f"a checkpoint needs about {size(_tree_bytes(previous))} (the size of {previous.name})"
        kept = f"the previous checkpoint {previous.name} is intact and `checkpoint` still points to it; free space and resume with: {resume_command(run_dir)}"
    else:
        needed = f"it needs more than the {size(written)} written before the disk filled"
        kept = "the run has no earlier checkpoint; free space (or choose another hydra.run.dir) and start it again"
    return f"{folder}: disk full while saving the checkpoint of step {step} ({reason}); {needed}{free}; the partial save was removed; {kept}"


def load_trainer_state(checkpoint: Path) -> dict[str, Any]:
    """The trainer state of a checkpoint; a UserError naming the file when it is damaged or unsafe."""
    import pickle
    import zipfile

    path = checkpoint / TRAINER_STATE
    try:
        # weights_only=True: a checkpoint is data, never code.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's own message advises weights_only=False, i.e. running whatever the file holds: not repeated here.
        raise DamagedFile(f"{path}: refused: it holds Python objects that are not plain data or tensors, which alignctl never "
                          "writes; the file was replaced or tampered with, so it is not loaded (resume from a checkpoint you trust)") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0].split(". ")[0]
        raise DamagedFile(f"{path}: damaged: cannot be read as a trainer state, truncated or corrupt ({reason})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise DamagedFile(f"{path}: damaged: not an alignctl trainer state (no step)")
    return state


def load_weights(model: torch.nn.Module, checkpoint: Path) -> None:
    """Put a checkpoint's trained weights back into `model`, built as the run built it (resume).

    A module that saves itself in parts (PPO's policy + value model) restores its parts with its own
    `load_weights`. A peft model takes its adapter (and any trained head) through peft's loader; a
    full model takes every tensor, and a tensor the checkpoint left out must be tied to one it holds
    (save_pretrained drops an LM head tied to the embeddings).
    """
    check_weights(checkpoint)  # a truncated or foreign file: one line naming it, not a SafetensorError
    if hasattr(model, "load_weights"):
        model.load_weights(checkpoint)
        return
    import peft

    if isinstance(model, peft.PeftModel):
        load_adapter(model, checkpoint, "default")
        return
    from safetensors.torch import load_file

    files = sorted(checkpoint.glob("model*.safetensors"))
    if not files:
        raise UserError(f"{checkpoint}: no model*.safetensors weights to resume from")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    own = model.state_dict()
    loaded = {own[k].data_ptr() for k in state if k in own}
    untied = [k for k in missing if own[k].data_ptr() not in loaded]
    if untied or unexpected:
        raise UserError(
            f"{checkpoint}: its weights do not fit the model this config builds "
            f"(missing {', '.join(untied[:3]) or 'none'}; unexpected {', '.join(unexpected[:3]) or 'none'}); resume with the run's own config"
        )
