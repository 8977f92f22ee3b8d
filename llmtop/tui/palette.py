"""Rich styles for the glance levels, taken from the running theme so theme files and NO_COLOR apply."""

from __future__ import annotations

from rich.style import Style
from rich.text import Text
from textual.color import Color

from llmtop.tui.format import BAD, MUTED, OK, PLAIN, WARN, Cell

Palette = dict[str, Style]

# Widgets that take Rich renderables (DataTable cells, RichLog lines) cannot resolve $variables
# themselves, so the colours are looked up once per theme here.
_LEVEL_VARIABLES = {OK: "text-success", WARN: "text-warning", BAD: "text-error", MUTED: "foreground-muted"}


def palette(variables: dict[str, str]) -> Palette:
    """Styles per level from an app's theme_variables."""
    background = Color.parse(variables.get("background", "#000000"))
    styles: Palette = {PLAIN: Style()}
    for level, name in _LEVEL_VARIABLES.items():
        value = variables.get(name)
        if value is None:
            styles[level] = Style()
            continue
        # Muted foregrounds carry alpha; blend them onto the background to get a colour a terminal can show.
        colour = background + Color.parse(value)
        styles[level] = Style(color=colour.rich_color, bold=level == BAD)
    return styles


def styled(cell: Cell, styles: Palette, justify: str = "left") -> Text:
    # A cut-off name ends in "…", so vllm-fast and vllm-flaky do not both read "vllm-fla".
    return Text(cell.text, style=styles.get(cell.level, Style()), justify=justify, no_wrap=True, overflow="ellipsis", end="")


class ThemedPalette:
    """Widget mixin: `self._styles` follows the running theme; `restyle()` redraws with the new one."""

    _styles: Palette = {}

    def on_mount(self) -> None:
        self._styles = palette(self.app.theme_variables)
        self.app.theme_changed_signal.subscribe(self, self._on_theme_changed)

    def _on_theme_changed(self, _theme) -> None:
        self._styles = palette(self.app.theme_variables)
        self.restyle()

    def restyle(self) -> None:
        raise NotImplementedError
