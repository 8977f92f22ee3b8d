"""The `/` filter input: narrows the table live as you type; Esc clears it, Enter keeps it."""

from __future__ import annotations

from textual.binding import Binding
from textual.message import Message
from textual.widgets import Input


class FilterBar(Input):
    """Hidden until `/`; reports every change upward and leaves the filtering to the table's owner."""

    BINDINGS = [Binding("escape", "close(True)", "Clear filter", show=True)]

    class Closed(Message):
        """The user left the filter; `cleared` when with Esc."""

        def __init__(self, cleared: bool) -> None:
            super().__init__()
            self.cleared = cleared

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(placeholder="filter by name, provider or status (Enter keeps, Esc clears)", id=id)

    def action_close(self, cleared: bool) -> None:
        if cleared:
            self.value = ""
        self.post_message(self.Closed(cleared))

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.post_message(self.Closed(False))
