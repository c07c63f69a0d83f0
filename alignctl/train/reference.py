"""The reference policy of the preference and RL stages: one setting, five ways to get log pi_ref.

- ``separate``: a frozen copy of the starting policy (one more model in memory).
- ``adapter_disabled``: the policy itself with its adapter switched off; the frozen base *is* the
  starting policy, so no second model is loaded.
- ``precomputed``: one pass before training scores every pair with the starting policy, caches
  the log-probs on disk (keyed by a fingerprint of model, data and tokenisation) and frees the model.
- ``none``: reference-free (zeros), as SimPO needs.
- ``auto``: adapter_disabled when an adapter trains, separate otherwise, none for simpo.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset

from alignctl.config.schema import Reference, RunConfig
from alignctl.core.errors import ConfigError
from alignctl.models.cache import cache_dir
from alignctl.models.loading import base_dir_of, load_causal_lm, load_tokenizer, model_path
from alignctl.train.stage_spec import HeldModel


def resolve_mode(mode: Reference, adapter_kind: str, reference_free_loss: bool, own_reference: bool = False) -> Reference:
    """The concrete mode for `auto`, and a check of the explicit ones.

    `own_reference` is true when inputs.reference names a model other than the starting policy.
    """
    if mode == Reference.auto:
        if reference_free_loss:
            return Reference.none
        return Reference.adapter_disabled if adapter_kind != "none" and not own_reference else Reference.separate
    if mode == Reference.adapter_disabled and adapter_kind == "none":
        raise ConfigError("recipe.reference", "adapter_disabled needs an adapter (adapter=lora); use separate or precomputed")
    if mode == Reference.adapter_disabled and own_reference:
        raise ConfigError("recipe.reference", "adapter_disabled uses the starting policy as reference; with inputs.reference use separate or precomputed")
    return mode


def reference_for(cfg: Any) -> Reference:
    """The reference a run holds, from its config: none when the KL weight is 0 (GRPO, PPO with
    recipe.beta=0: nothing to compare with) or the loss is reference-free (SimPO), else
    recipe.reference resolved. (DPO and KTO validate beta > 0, so the first case is RL's alone.)"""
    recipe = cfg.recipe
    if getattr(recipe, "beta", None) == 0:
        return Reference.none
    reference_free = getattr(getattr(recipe, "loss_type", None), "value", None) == "simpo"
    return resolve_mode(recipe.reference, cfg.adapter.kind, reference_free, own_reference=bool(cfg.inputs.get("reference")))


def held_reference(cfg: Any) -> list[HeldModel]:
    """The reference as a held model: only a separate copy costs memory of its own."""
    if reference_for(cfg) != Reference.separate:
        return []
    return [HeldModel("reference (separate copy)", model_path(cfg.model, cfg.inputs.get("reference") or cfg.inputs.get("policy")), trained=False)]


def check_same_tokenizer(policy_tokenizer, reference_tokenizer, reference_path: str) -> None:
    """A reference scores the policy's token ids: both must tokenise identically."""
    if policy_tokenizer.get_vocab() != reference_tokenizer.get_vocab():
        raise ConfigError("inputs.reference", f"{reference_path} has a different tokenizer from the policy; use a reference of the same model family")


@contextlib.contextmanager
def adapter_off(model: torch.nn.Module):
    """Run `model` as its frozen base, without gradients.

    peft's own tuner switches, not PeftModel.disable_adapter(): that context first walks every module
    to check that no adapter is half-enabled, which costs a training step several milliseconds here."""
    tuner = model.base_model
    tuner.disable_adapter_layers()
    try:
        with torch.no_grad():
            yield
    finally:
        tuner.enable_adapter_layers()


def model_identity(path: str) -> dict:
    """What identifies a model's weights for caching: a run's config hash and step, or file sizes and times."""
    root = Path(path)
    meta = root / "alignctl.json"
    if meta.exists():
        return {"alignctl": json.loads(meta.read_text())}
    if root.is_dir():
        weights = sorted(root.glob("*.safetensors")) + sorted(root.glob("*.bin"))
        return {f.name: (f.stat().st_size, f.stat().st_mtime_ns) for f in weights} | {"path": str(root.resolve())}
    return {"hub_id": path}


def cache_key(**parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def cached_logps(key: str, compute: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, bool]:
    """Load reference log-probs cached under `key`, or compute and store them; also say if it was a hit."""
    path = cache_dir() / "reference" / f"{key}.pt"
    if path.exists():
        import pickle

        try:
            return torch.load(path, map_location="cpu", weights_only=True), True
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError):
            pass  # a damaged (or foreign) cache entry is only a cache miss: computed again and replaced below
    values = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(values, tmp)
    tmp.replace(path)  # atomic: a concurrent or interrupted run never reads half a file
    return values, False


def reference_logps(
    mode: Reference,
    policy: torch.nn.Module,
    reference: torch.nn.Module | None,
    batch: dict,
    logps: Callable[[torch.nn.Module, dict], torch.Tensor],
) -> torch.Tensor:
    """log pi_ref of the batch's responses (no gradient), whichever way the reference is held.

    `logps(model, batch)` computes the stage's log-probs; a precomputed batch carries ``ref_logps``.
    """
    if mode == Reference.none:
        return torch.zeros(batch["input_ids"].size(0), device=batch["input_ids"].device)
    if mode == Reference.precomputed:
        return batch["ref_logps"]
    if mode == Reference.adapter_disabled:
        with adapter_off(policy):
            return logps(policy, batch)
    with torch.no_grad():
        return logps(reference, batch)


def precompute(
    dataset: Dataset,
    reference: torch.nn.Module,
    make_batch: Callable[[dict], dict],
    logps: Callable[[torch.nn.Module, dict], torch.Tensor],
    batch_size: int,
    key: str,
    label: str,
) -> Dataset:
    """Add a ``ref_logps`` column: for each row, the reference log-probs of the two responses its
    batch carries (chosen/rejected for DPO, completion/mismatched completion for KTO), cached on disk."""

    @torch.no_grad()
    def score() -> torch.Tensor:
        out = []
        for start in range(0, len(dataset), batch_size):
            batch = make_batch(dataset[start : start + batch_size])
            out.append(logps(reference, batch).view(2, -1).T.cpu())  # (rows, 2)
        return torch.cat(out)

    values, hit = cached_logps(key, score)
    print(f"reference log-probs for {label}: {'reused from cache' if hit else 'computed and cached'} ({key})")
    return dataset.add_column("ref_logps", values.tolist())


def load_policy_and_reference(cfg: RunConfig, mode: Reference, tokenizer, policy_path: str, run_dir: Path) -> tuple[torch.nn.Module, torch.nn.Module | None, str]:
    """The starting policy, the reference model when the mode holds one, and the reference's path
    (inputs.reference, else the starting policy's) for cache keys."""
    policy = load_causal_lm(policy_path, cfg.model, cfg.hardware, cfg.adapter, base_dir=base_dir_of(cfg, run_dir))
    reference_path = model_path(cfg.model, cfg.inputs.get("reference") or cfg.inputs.get("policy"))
    reference = None
    if mode in (Reference.separate, Reference.precomputed):
        check_same_tokenizer(tokenizer, load_tokenizer(reference_path, cfg.model), reference_path)
        reference = load_causal_lm(reference_path, cfg.model, cfg.hardware).eval().requires_grad_(False)
    return policy, reference, reference_path
