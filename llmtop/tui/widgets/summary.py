"""The header line: fleet counts by state, open circuits, probe progress, and any config error."""

from __future__ import annotations

from textual.content import Content
from textual.widgets import Static

from llmtop.tui.view import FleetView

# (count key, symbol, word, theme variable): symbol and word carry the meaning, colour only helps.
_COUNTS = (
    ("healthy", "●", "healthy", "$text-success"),
    ("degraded", "▲", "degraded", "$text-warning"),
    ("down", "✖", "down", "$text-error"),
    ("loading", "◌", "loading", "$text-warning"),
    ("unknown", "?", "unknown", "$foreground-muted"),
    ("draining", "⏸", "draining", "$text-warning"),
    ("disabled", "○", "disabled", "$foreground-muted"),
)
_ALWAYS = ("healthy", "degraded", "down")  # shown even at zero: "0 down" is news too


class FleetSummary(Static):
    """One line of counts above the table, and a second for a config error or a hint."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._parts: list = []

    def show(self, view: FleetView) -> None:
        fleet, progress = view.fleet, view.progress
        counts = fleet.counts()
        parts: list[str | tuple[str, str]] = [("llmtop", "bold $accent"), f" {len(fleet.backends)} backends "]
        for key, symbol, word, colour in _COUNTS:
            if counts.get(key) or key in _ALWAYS:
                parts.append((f" {symbol} {counts.get(key, 0)} {word}", colour))
        circuits = [b.circuit for b in fleet.backends]
        if circuits.count("open") or circuits.count("half_open"):
            parts.append((f"  ⚡ circuits: {circuits.count('open')} open", "bold $text-error"))
            if circuits.count("half_open"):
                parts.append((f", {circuits.count('half_open')} half-open", "$text-warning"))
        if progress is not None:
            parts.append((f"  ⟳ probing {progress.done}/{progress.total}", "bold $text-accent"))
        if view.read_only:
            parts.append(("  [read-only]", "$foreground-muted"))
        if fleet.config_error:
            message = f"✖ config error, still running the previous config: {fleet.config_error}"
            parts += ["\n", (message, "bold $text-error")]
        elif view.hint:
            parts += ["\n", (view.hint, "$foreground-muted")]
        if parts != self._parts:  # an update re-lays out the screen (auto height), so skip a same-text tick
            self._parts = parts
            self.update(Content.assemble(*parts))
