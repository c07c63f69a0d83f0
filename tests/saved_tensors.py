"""What autograd keeps for backward: the fused layers' tests compare it between the plain and fused paths."""

from __future__ import annotations

import torch


def saved_bytes(fn) -> int:
    """Bytes of distinct storages autograd keeps for backward while `fn` runs its forward (a storage
    saved twice, or saved through two views, counts once)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())
