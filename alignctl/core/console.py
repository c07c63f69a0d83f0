"""The console alignctl prints to (rich), and the one way it writes a size in bytes."""

from __future__ import annotations

from rich.console import Console, ConsoleDimensions

# Piped or redirected output (a file, `| less`, a CI log) has no width to fit: rich's default of
# 80 columns would cut table cells to `1,001…`. Wide enough for any table alignctl prints.
PIPED_WIDTH = 240


class _Console(Console):
    """A Console that measures the terminal when there is one and is wide when there is none.

    Decided at each print, not at import: the same process may print to a terminal and to a pipe
    (tests capture stdout; a user redirects a run's output)."""

    @property
    def size(self) -> ConsoleDimensions:
        measured = Console.size.fget(self)
        if self._width is None and not self.is_terminal and "COLUMNS" not in self._environ:
            return ConsoleDimensions(PIPED_WIDTH, measured.height)
        return measured

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)


console = _Console(stderr=False, highlight=False)


def size(value: float) -> str:
    """Three significant figures: 1.28G, 266M, 9.3M."""
    for unit, scale in (("G", 2**30), ("M", 2**20), ("K", 2**10)):
        if value >= scale:
            scaled = value / scale
            return f"{scaled:.{2 if scaled < 10 else 1 if scaled < 100 else 0}f}{unit}"
    return f"{value:.0f}"
