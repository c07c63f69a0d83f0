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

import torch

from alignctl.config import Reference
from alignctl.errors import ConfigError
from alignctl.models import cache_dir


def resolve_mode(mode: Reference, adapter_kind: str, reference_free_loss: bool) -> Reference:
    if mode == Reference.auto:
        if reference_free_loss:
            return Reference.none
        return Reference.adapter_disabled if adapter_kind != "none" else Reference.separate
    if mode == Reference.adapter_disabled and adapter_kind == "none":
        raise ConfigError("recipe.reference", "adapter_disabled needs an adapter (adapter=lora); use separate or precomputed")
    return mode


@contextlib.contextmanager
def adapter_off(model: torch.nn.Module):
    """Run `model` as its frozen base: peft's disable_adapter, without gradients."""
    with model.disable_adapter(), torch.no_grad():
        yield


def model_identity(path: str) -> dict:
    """What identifies a model's weights for caching: a run's config hash and step, or file sizes and times."""
    root = Path(path)
    meta = root / "alignctl.json"
    if meta.exists():
        return {"alignctl": json.loads(meta.read_text())}
    if root.is_dir():
        return {f.name: (f.stat().st_size, int(f.stat().st_mtime)) for f in sorted(root.glob("*.safetensors"))} | {"path": str(root.resolve())}
    return {"hub_id": path}


def cache_key(**parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def cached_logps(key: str, compute: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, bool]:
    """Load reference log-probs cached under `key`, or compute and store them; also say if it was a hit."""
    path = cache_dir() / "reference" / f"{key}.pt"
    if path.exists():
        return torch.load(path, map_location="cpu", weights_only=True), True
    values = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(values, tmp)
    tmp.replace(path)  # atomic: a concurrent or interrupted run never reads half a file
    return values, False
