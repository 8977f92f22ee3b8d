"""The alerts and events log: breaker transitions, missing models, tripped rules, admin and config changes, with times."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import RichLog

from llmtop.snapshot import Event
from llmtop.tui import format as fmt
from llmtop.tui.palette import ThemedPalette

MAX_LINES = 500  # as many as the engine keeps


class EventsLog(ThemedPalette, RichLog):
    """Appends only the events it has not shown yet; at one line high it is the compact layout's ticker."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, max_lines=MAX_LINES, wrap=False, markup=False, highlight=False, auto_scroll=True)
        self._last: Event | None = None
        self._events: tuple[Event, ...] = ()

    def restyle(self) -> None:
        self.clear()
        for event in self._events:
            self._write(event)

    def show(self, events: tuple[Event, ...]) -> None:
        self._events = events
        new = self._unseen(events)
        for event in new:
            self._write(event)
        if new:
            self._last = new[-1]
            self.border_title = f"events ({len(events)})"

    def _unseen(self, events: tuple[Event, ...]) -> tuple[Event, ...]:
        # The engine's deque drops its oldest events; find where we left off by identity, from the end.
        if self._last is None:
            return events
        for i in range(len(events) - 1, -1, -1):
            if events[i] is self._last:
                return events[i + 1 :]
        return events

    def _write(self, event: Event) -> None:
        mark = fmt.EVENT_MARKS.get(event.level, fmt.EVENT_MARKS["info"])
        style = self._styles.get(mark.level)
        line = Text.assemble(
            (fmt.clock_time(event.at), self._styles.get(fmt.MUTED)),
            " ",
            (mark.text, style),
            " ",
            (f"{event.backend}: " if event.backend else "", "bold"),
            (event.message, style if event.level != "info" else None),
        )
        self.write(line)
