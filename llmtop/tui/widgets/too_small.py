"""What a screen shows instead of its layout when the terminal is below the usable size."""

from __future__ import annotations

from textual.widgets import Static

MIN_WIDTH, MIN_HEIGHT = 60, 15


class TooSmall(Static):
    """Hidden by app.tcss unless the screen carries the -narrow or -short breakpoint class."""

    def __init__(self) -> None:
        super().__init__(f"terminal too small (need at least {MIN_WIDTH}x{MIN_HEIGHT})", markup=False)


class BlindKeysOff:
    """Screen mixin: while TooSmall hides the screen, its keys do nothing, since a `t` or a `y`
    typed at a notice must not disable or drain a backend the operator cannot see."""

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        if self.has_class("-narrow") or self.has_class("-short"):
            return self.allowed_when_hidden(action, parameters)
        return super().check_action(action, parameters)

    def allowed_when_hidden(self, action: str, parameters: tuple) -> bool:
        return False
