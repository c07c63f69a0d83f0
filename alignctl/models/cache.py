"""Where alignctl keeps what it builds once and reuses: the tiny model, GGUF files turned into
Hugging Face directories (``ALIGNCTL_CACHE``, default ~/.cache/alignctl)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("ALIGNCTL_CACHE", Path.home() / ".cache" / "alignctl"))
