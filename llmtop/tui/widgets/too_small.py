"""What a screen shows instead of its layout when the terminal is below the usable size."""

from __future__ import annotations

from textual.widgets import Static

MIN_WIDTH, MIN_HEIGHT = 60, 15


class TooSmall(Static):
    """Hidden by app.tcss unless the screen carries the -narrow or -short breakpoint class."""

    def __init__(self) -> None:
        super().__init__(f"terminal too small (need at least {MIN_WIDTH}x{MIN_HEIGHT})", markup=False)
