"""The main screen: summary, fleet table, trends of the selected backend, GPUs and the events log."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Footer, Input

from llmtop.tui.format import SORT_NAMES
from llmtop.tui.messages import READ_ONLY_ACTIONS
from llmtop.tui.messages import AdminRequested, DetailsRequested, ProbeRequested
from llmtop.tui.view import FleetView
from llmtop.tui.widgets.events_log import EventsLog
from llmtop.tui.widgets.filter_bar import FilterBar
from llmtop.tui.widgets.fleet_table import FleetTable
from llmtop.tui.widgets.gpu_panel import GpuPanel
from llmtop.tui.widgets.summary import FleetSummary
from llmtop.tui.widgets.too_small import BlindKeysOff, TooSmall
from llmtop.tui.widgets.trends import Trends


class FleetScreen(BlindKeysOff, Screen):
    AUTO_FOCUS = "#fleet"
    # The footer shows what an 80-column terminal has room for; `?` lists every key.
    BINDINGS = [
        Binding("p", "probe", "Probe"),
        Binding("d", "drain", "Drain"),
        Binding("t", "toggle", "On/off"),
        Binding("slash", "filter", "Filter"),
        Binding("s", "cycle_sort", "Sort"),
        Binding("S", "reverse_sort", "Reverse sort", show=False),
        Binding("g", "toggle_gpu", "GPU", show=False),
        Binding("escape", "clear_filter", "Clear filter", show=False),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.view: FleetView | None = None
        self._ready = False

    def compose(self) -> ComposeResult:
        yield TooSmall()
        yield FleetSummary(id="summary")
        yield FilterBar(id="filter")
        with Horizontal(id="body"):
            yield FleetTable(id="fleet")
            with Vertical(id="side"):
                yield Trends(id="trends")
                yield GpuPanel(id="gpu")
        yield EventsLog(id="events")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        # Nested widgets mount after the screen does; until then a view is only kept for later.
        self.call_after_refresh(self._on_ready)

    def _on_ready(self) -> None:
        self._ready = True
        if (view := self.view or self.app.view) is not None:
            self.show_fleet(view)

    def on_resize(self) -> None:
        # Started below the usable size, the table was hidden when AUTO_FOCUS looked for it.
        if self.focused is None:
            for table in self.query(FleetTable):  # none yet on the first resize, before the body mounts
                table.focus()

    @property
    def table(self) -> FleetTable:
        return self.query_one(FleetTable)

    def show_fleet(self, view: FleetView) -> None:
        self.view = view
        if not self._ready or not self.is_attached:  # not built yet, or already taken down
            return
        self.query_one(FleetSummary).show(view)
        self.table.show(view)
        self._show_trends()
        self.query_one(GpuPanel).show(view.fleet.gpu, view.gpu_history)
        self.query_one(EventsLog).show(view.fleet.events)

    def _show_trends(self) -> None:
        name = self.table.selected_name
        self.query_one(Trends).show(self.view.fleet.backend(name) if self.view and name else None)

    def on_fleet_table_highlighted(self, _event: FleetTable.Highlighted) -> None:
        self._show_trends()

    def on_fleet_table_selected(self, _event: FleetTable.Selected) -> None:
        self._open_details()

    # -- keys -------------------------------------------------------------------------------

    def action_probe(self) -> None:
        if name := self.table.selected_name:
            self.post_message(ProbeRequested((name,)))

    def action_drain(self) -> None:
        if name := self.table.selected_name:
            self.post_message(AdminRequested(name, "drain"))

    def action_toggle(self) -> None:
        if name := self.table.selected_name:
            self.post_message(AdminRequested(name, "toggle"))

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        # --read-only hides the keys it turns off, rather than showing keys that do nothing.
        if action in READ_ONLY_ACTIONS and getattr(self.app, "read_only", False):
            return False
        return super().check_action(action, parameters)

    def action_cycle_sort(self) -> None:
        table = self.table
        table.set_sort(SORT_NAMES[(SORT_NAMES.index(table.sort_name) + 1) % len(SORT_NAMES)])

    def action_reverse_sort(self) -> None:
        table = self.table
        table.set_sort(table.sort_name, reverse=not table.sort_reverse)

    def action_toggle_gpu(self) -> None:
        self.toggle_class("-no-gpu")

    def action_filter(self) -> None:
        self.add_class("-filtering")
        self.query_one(FilterBar).focus()

    def _open_details(self) -> None:
        if name := self.table.selected_name:
            self.post_message(DetailsRequested(name))

    def action_clear_filter(self) -> None:
        self.query_one(FilterBar).action_close(cleared=True)

    def on_input_changed(self, event: Input.Changed) -> None:
        self.table.set_filter(event.value.strip())

    def on_filter_bar_closed(self, event: FilterBar.Closed) -> None:
        if event.cleared or not self.table.filter_text:
            self.remove_class("-filtering")
        self.table.focus()
