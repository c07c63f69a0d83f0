"""The console alignctl prints to (rich), and the one way it writes a size in bytes."""

from __future__ import annotations

from rich.console import Console

console = Console(stderr=False, highlight=False)


def size(value: float) -> str:
    """Three significant figures: 1.28G, 266M, 9.3M."""
    for unit, scale in (("G", 2**30), ("M", 2**20), ("K", 2**10)):
        if value >= scale:
            scaled = value / scale
            return f"{scaled:.{2 if scaled < 10 else 1 if scaled < 100 else 0}f}{unit}"
    return f"{value:.0f}"
