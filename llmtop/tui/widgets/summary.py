"""The header line: fleet counts by state, open circuits, probe progress, and any config error."""

from __future__ import annotations

import time

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
    ("stale", "◷", "stale", "$foreground-muted"),
)
# How a remote source stands, as a mark that reads without colour.
_STANDING = {
    "connected": ("●", "$text-success"),
    "connecting": ("◌", "$foreground-muted"),
    "stale": ("◷", "$text-warning"),
    "unauthorized": ("✖", "$text-error"),
    "error": ("✖", "$text-error"),
}
_ALWAYS = ("healthy", "degraded", "down")  # shown even at zero: "0 down" is news too


def _k(n: float) -> str:
    return f"{n / 1000:.1f}k" if n >= 1000 else f"{n:.0f}"


class FleetSummary(Static):
    """One line of counts above the table (short forms when the words do not fit its width), and
    a second for a config error or a hint."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._parts: list = []
        self._lines: list[int] = []  # the cell length of each line shown
        self._view: FleetView | None = None

    def on_resize(self) -> None:
        if self._view is not None:
            self.show(self._view)

    def show(self, view: FleetView) -> None:
        self._view = view
        width = max(1, self.size.width - 2)  # its padding
        def fits(candidate: list) -> bool:
            return sum(len(p if isinstance(p, str) else p[0]) for p in candidate) <= width

        # Shorter forms as room runs out; the probe spend stays while anything can hold it. Each
        # sum over the fleet is taken once: 3,000 rows made every pass count.
        fleet = view.fleet
        counts, spend = fleet.counts(), fleet.spend()
        circuits = [b.circuit for b in fleet.backends if b.stale_since is None]  # a lost agent's: not known now
        long_counts, short_counts = self._counts(view, counts, circuits, short=False), self._counts(view, counts, circuits, short=True)
        short_spend = self._spend(spend, short=True)
        candidates = [long_counts + self._spend(spend, short=False), long_counts + short_spend, short_counts + short_spend]
        parts = next((c for c in candidates if fits(c)), short_counts)
        if view.sources:
            parts += ["\n", *self._sources(view, width)]
        if fleet.config_error:
            message = f"✖ config error, still running the previous config: {fleet.config_error}"
            parts += ["\n", (message, "bold $text-error")]
        elif view.hint:
            parts += ["\n", (view.hint, "$foreground-muted")]
        if parts != self._parts:  # an update re-lays out the screen (auto height), so skip a same-text tick
            content = Content.assemble(*parts)
            lines = [line.cell_length for line in content.split("\n")]
            # As many lines as before, none of them wrapping, before or after: the height stays, and
            # the screen need not be laid out again (a whole-screen layout each tick at 3,000 rows).
            same_height = len(lines) == len(self._lines) and max(lines + self._lines) <= width
            self._parts, self._lines = parts, lines
            self.update(content, layout=not same_height)

    @staticmethod
    def _spend(spend: dict, short: bool) -> list:
        """What the fleet's probes cost per hour, as planned (tokens in and out; money where a
        price is set), and the budget that holds them, if any (`spend`: FleetSnapshot.spend())."""
        tokens = spend["tokens_per_hour"]
        if not tokens and not spend["budget_tokens_per_hour"]:
            return []
        text = f"  Σ{_k(tokens)} tok/h" if short else f"  probes {_k(tokens)} tok/h"
        if spend["cost_per_hour"] is not None:
            text += f" {spend['cost_per_hour']:.2f}/h" if short else f", {spend['cost_per_hour']:.2f}/h"
        if spend["budget_tokens_per_hour"] and not short:
            text += f" (budget {_k(spend['budget_tokens_per_hour'])})"
        return [(text, "$foreground-muted")]

    @staticmethod
    def _sources(view: FleetView, width: int) -> list:
        """One line for the agents: each one's name and standing, with the reason for the first
        that is not connected (the events log has every change)."""
        parts: list = [("agents", "bold")]
        said = False
        for s in view.sources:
            mark, colour = _STANDING.get(s.standing, ("?", "$foreground-muted"))
            text = f" {mark} {s.name}"
            if s.standing == "connected":
                text += f" {s.backends}" + ("" if s.can_act else " read-only")
            elif s.standing == "stale" and s.since is not None:
                text += f" stale since {time.strftime('%H:%M:%S', time.localtime(s.since))}"
            else:
                text += f" {s.standing}"
            if s.detail and not said:  # why it is not connected, or that its clock is off
                text += f" ({s.detail})"
                said = True
            parts.append((text, colour if s.standing != "connected" else "$foreground"))
        return parts

    @staticmethod
    def _counts(view: FleetView, counts: dict[str, int], circuits: list[str], short: bool) -> list:
        fleet, progress = view.fleet, view.progress
        parts: list[str | tuple[str, str]] = [("llmtop", "bold $accent"), f" {len(fleet.backends)}" + ("" if short else " backends ")]
        for key, symbol, word, colour in _COUNTS:
            if counts.get(key) or key in _ALWAYS:
                parts.append((f" {symbol}{counts.get(key, 0)}" if short else f" {symbol} {counts.get(key, 0)} {word}", colour))
        opened, half = circuits.count("open"), circuits.count("half_open")
        if opened or half:
            parts.append((f"  ⚡{opened} open" if short else f"  ⚡ circuits: {opened} open", "bold $text-error"))
            if half:
                parts.append((f" {half} half" if short else f", {half} half-open", "$text-warning"))
        if progress is not None:
            parts.append((f"  ⟳{progress.done}/{progress.total}" if short else f"  ⟳ probing {progress.done}/{progress.total}", "bold $text-accent"))
        if view.paused:
            parts.append(("  ‖ paused" if short else "  ‖ paused (space resumes)", "bold $text-warning"))
        if view.read_only:
            parts.append(("  read-only" if short else "  [read-only]", "$foreground-muted"))
        return parts
