"""The fleet table: one row per backend, updated in place by diff so the cursor and the sort stay put."""

from __future__ import annotations

from typing import Callable, NamedTuple

from textual.binding import Binding
from textual.content import Content
from textual.widgets import DataTable

from llmtop.config import Settings
from llmtop.snapshot import BackendSnapshot, FleetSnapshot
from llmtop.tui import format as fmt
from llmtop.tui.format import Cell
from llmtop.tui.palette import ThemedPalette, styled
from llmtop.tui.view import FleetView


class Column(NamedTuple):
    label: str
    width: int  # 0: sized to the names (the name column)
    justify: str
    cell: Callable[[BackendSnapshot, "RowContext"], Cell]


class RowContext(NamedTuple):
    now: float
    settings: Settings
    compact: bool


COLUMNS: dict[str, Column] = {
    "status": Column("status", 10, "left", lambda b, c: fmt.status_badge(b, with_admin=c.compact)),
    "name": Column("name", 0, "left", lambda b, c: Cell(b.name)),
    "provider": Column("provider", 9, "left", lambda b, c: Cell(b.provider, fmt.MUTED)),
    "circuit": Column("circuit", 9, "left", lambda b, c: fmt.circuit_badge(b)),
    "admin": Column("admin", 10, "left", lambda b, c: fmt.admin_badge(b)),
    "ttft": Column("TTFT", 6, "right", lambda b, c: fmt.ttft_cell(b, c.settings.slow_ttft_ms)),
    "tps": Column("tok/s", 6, "right", lambda b, c: fmt.tps_cell(b)),
    "latency": Column("latency", 7, "right", lambda b, c: fmt.latency_cell(b)),
    "queue": Column("queue", 5, "right", lambda b, c: fmt.queue_cell(b)),
    "kv": Column("KV", 4, "right", lambda b, c: fmt.kv_cell(b)),
    "models": Column("models", 6, "right", lambda b, c: fmt.models_cell(b)),
    "age": Column("age", 4, "right", lambda b, c: fmt.age_cell(b, c.now, 3 * c.settings.health_interval_s)),
    "trend": Column("TTFT trend", 12, "left", lambda b, c: Cell(fmt.spark((v for _, v in b.ttft_history), 12), fmt.MUTED)),
}
FULL = ("status", "name", "provider", "circuit", "admin", "ttft", "tps", "latency", "queue", "kv", "models", "age", "trend")
COMPACT = ("status", "name", "ttft", "tps", "queue", "kv", "models", "circuit")
# The age changes every second for every row; everything else only when the backend's seq does.
_TICKING = ("age",)

CELL_PADDING = 1
SCROLLBAR = 1  # app.tcss sets scrollbar-size-vertical: 1 on the table
NAME_MIN, NAME_MAX = 8, 32
NAME_FULL_MIN = 12  # the full column set only when names still get this much room


def _fixed_width(keys: tuple[str, ...]) -> int:
    return sum(COLUMNS[k].width for k in keys) + 2 * CELL_PADDING * len(keys) + SCROLLBAR


class FleetTable(ThemedPalette, DataTable):
    """Shows a FleetSnapshot; picks the full or the compact column set from its own width."""

    BINDINGS = [
        Binding("enter", "select_cursor", "Details"),
        Binding("j", "cursor_down", "Down", show=False),
        Binding("k", "cursor_up", "Up", show=False),
    ]

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, cursor_type="row", cell_padding=CELL_PADDING, zebra_stripes=False)
        self.sort_name = "status"
        self.filter_text = ""
        self.total = 0  # backends before the filter
        self._fleet: FleetSnapshot | None = None
        self._settings = Settings()
        self._probing: frozenset[str] = frozenset()
        self._columns: tuple[str, ...] = ()
        self._name_width = 0
        self._cells: dict[str, dict[str, Cell]] = {}
        self._cache_keys: dict[str, tuple[int, bool]] = {}
        self._order: dict[str, int] = {}
        self._title = ""

    def restyle(self) -> None:
        self._rebuild()

    # -- what the screen calls ---------------------------------------------------------------

    @property
    def selected_name(self) -> str | None:
        """The backend under the cursor."""
        if self.row_count == 0:
            return None
        return self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value

    def show(self, view: FleetView) -> None:
        self._fleet, self._settings, self._probing = view.fleet, view.settings, view.probing
        self._sync()

    def set_sort(self, name: str) -> None:
        self.sort_name = name
        self._sync()

    def set_filter(self, text: str) -> None:
        self.filter_text = text
        self._sync()

    # -- layout -------------------------------------------------------------------------------

    def on_resize(self) -> None:
        if self._fleet is not None and self._layout() != (self._columns, self._name_width):
            self._rebuild()

    def _layout(self) -> tuple[tuple[str, ...], int]:
        """Column set and name width for the current width and names."""
        width = self.size.width
        names = [b.name for b in self._fleet.backends] if self._fleet else []
        longest = max((len(n) for n in names), default=NAME_MIN)
        columns = FULL if width >= _fixed_width(FULL) + 2 * CELL_PADDING + NAME_FULL_MIN else COMPACT
        room = width - _fixed_width(columns) - 2 * CELL_PADDING
        return columns, max(NAME_MIN, min(longest, NAME_MAX, room))

    def _rebuild(self) -> None:
        """Start again from the columns (a layout or theme change); the cursor stays on its backend."""
        keep = self.selected_name
        self._columns, self._name_width = self._layout()
        with self.app.batch_update():
            self.clear(columns=True)
            self._cells.clear()
            self._cache_keys.clear()
            self._order.clear()
            for key in self._columns:
                column = COLUMNS[key]
                width = column.width or self._name_width
                label = styled(Cell(column.label), self._styles, column.justify)
                self.add_column(label, key=key, width=width)
            self._sync(keep)

    # -- the diff ---------------------------------------------------------------------------

    def _sync(self, keep: str | None = None) -> None:
        fleet = self._fleet
        if fleet is None:
            return
        if (self._columns, self._name_width) != self._layout():
            self._rebuild()  # calls back into _sync with the new columns
            return
        self.total = len(fleet.backends)
        visible = [b for b in fleet.backends if fmt.matches(b, self.filter_text)]
        wanted = {b.name for b in visible}
        context = RowContext(fleet.at, self._settings, self._columns == COMPACT)
        # Rows move when values change under the sort; the cursor follows its backend, not its row number.
        keep = keep or self.selected_name
        with self.app.batch_update():
            for name in [k.value for k in self.rows if k.value not in wanted]:
                self.remove_row(name)
                self._cells.pop(name, None)
                self._cache_keys.pop(name, None)
            for b in visible:
                cells = self._row_cells(b, context)
                old = self._cells.get(b.name)
                if old is None:
                    self.add_row(*(self._styled(k, c) for k, c in cells.items()), key=b.name)
                else:
                    for key, cell in cells.items():
                        if old[key] != cell:
                            self.update_cell(b.name, key, self._styled(key, cell))
                self._cells[b.name] = cells
            self._reorder(visible)
            self._restore_cursor(keep)
            self._update_title()

    def _row_cells(self, b: BackendSnapshot, context: RowContext) -> dict[str, Cell]:
        busy = b.name in self._probing
        cache_key = (b.seq, busy)
        old = self._cells.get(b.name)
        if old is not None and self._cache_keys.get(b.name) == cache_key:
            cells = dict(old)
            for key in _TICKING:
                if key in cells:
                    cells[key] = COLUMNS[key].cell(b, context)
            return cells
        cells = {key: COLUMNS[key].cell(b, context) for key in self._columns}
        if busy:
            cells["status"] = fmt.PROBING
        self._cache_keys[b.name] = cache_key
        return cells

    def _update_title(self) -> None:
        title = f"sort: {fmt.SORT_LABELS[self.sort_name]}"
        if self.filter_text:
            title += f" · filter '{self.filter_text}': {self.row_count} of {self.total}"
        if title != self._title:  # setting a border title always repaints
            self._title = title
            self.border_title = Content(title)  # the filter is typed text, never markup

    def _styled(self, key: str, cell: Cell):
        return styled(cell, self._styles, COLUMNS[key].justify)

    def _reorder(self, visible: list[BackendSnapshot]) -> None:
        ordered = sorted(visible, key=fmt.SORT_KEYS[self.sort_name])
        order = {b.name: i for i, b in enumerate(ordered)}
        if order == self._order and len(order) == self.row_count:
            return
        self._order = order
        # DataTable sorts on cell values; the name cell carries the full name, so it keys the order.
        self.sort("name", key=lambda name: order[name.plain])

    def _restore_cursor(self, name: str | None) -> None:
        if name is None or name not in self._cells:
            return
        index = self.get_row_index(name)
        if index != self.cursor_row:
            self.move_cursor(row=index, animate=False)
