"""The fleet table: one row per backend, updated in place by diff so the cursor and the sort stay put."""

from __future__ import annotations

from contextlib import contextmanager
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


COLUMNS: dict[str, Column] = {
    "status": Column("status", 10, "left", lambda b, c: fmt.status_badge(b)),
    "name": Column("name", 0, "left", lambda b, c: Cell(b.name)),
    "provider": Column("provider", 9, "left", lambda b, c: Cell(b.provider, fmt.MUTED)),
    "agent": Column("agent", 15, "left", lambda b, c: Cell(b.agent or "local", fmt.MUTED)),
    "ttft": Column("TTFT", 7, "right", lambda b, c: fmt.ttft_cell(b, c.settings.slow_ttft_ms, c.now)),
    "tps": Column("tok/s", 7, "right", lambda b, c: fmt.tps_cell(b, c.now)),
    "age": Column("age", 4, "right", lambda b, c: fmt.age_cell(b, c.now)),
    "latency": Column("latency", 7, "right", lambda b, c: fmt.latency_cell(b)),
    "queue": Column("queue", 5, "right", lambda b, c: fmt.queue_cell(b)),
    "kv": Column("KV", 5, "right", lambda b, c: fmt.kv_cell(b)),
    "models": Column("models", 6, "right", lambda b, c: fmt.models_cell(b)),
    "circuit": Column("circuit", 9, "left", lambda b, c: fmt.circuit_badge(b)),
    "trend": Column("TTFT trend", 12, "left", lambda b, c: Cell(fmt.spark((v for _, v in b.ttft_history), 12), fmt.MUTED)),
}
# Left to right as shown; the first set always, then each extra as the width allows, in this order.
ORDER = ("status", "name", "agent", "provider", "ttft", "tps", "age", "latency", "queue", "kv", "models", "circuit", "trend")
ESSENTIAL = ("status", "name", "ttft", "tps", "queue", "kv", "models", "circuit")
EXTRAS = ("agent", "latency", "age", "provider", "trend")  # agent: only in a fleet with remote rows
# The age changes every second for every row; everything else only when the backend's seq does.
_TICKING = ("age", "ttft", "tps")

CELL_PADDING = 1
SCROLLBAR = 1  # app.tcss sets scrollbar-size-vertical: 1 on the table
NAME_MIN, NAME_MAX = 8, 32
NAME_ROOMY = 20
BULK_REMOVE = 64  # more rows than this going at once: the rows are rebuilt rather than removed one by one  # an extra column is added only while names keep this much room (or their full length)


def _fixed_width(keys: tuple[str, ...]) -> int:
    return sum(COLUMNS[k].width for k in keys if k != "name") + 2 * CELL_PADDING * len(keys) + SCROLLBAR


def layout(width: int, longest_name: int, agents: bool = False) -> tuple[tuple[str, ...], int]:
    """The columns for this width (the essential ones, then extras while they fit) and the name width."""
    chosen = set(ESSENTIAL)
    for extra in EXTRAS:
        if extra == "agent" and not agents:
            continue
        if width - _fixed_width(tuple(chosen | {extra})) >= min(NAME_ROOMY, max(NAME_MIN, longest_name)):
            chosen.add(extra)
    columns = tuple(k for k in ORDER if k in chosen)
    room = width - _fixed_width(columns)
    return columns, max(NAME_MIN, min(longest_name, NAME_MAX, room))


def _dim(cell: Cell, b: BackendSnapshot) -> Cell:
    """Every figure of a row whose agent is lost is greyed: what it was, not what it is."""
    return cell if b.stale_since is None or cell.level == fmt.MUTED else Cell(cell.text, fmt.MUTED)


class FleetTable(ThemedPalette, DataTable):
    """Shows a FleetSnapshot; picks its columns from its own width."""

    BINDINGS = [
        Binding("enter", "select_cursor", "Details"),
        Binding("j", "cursor_down", "Down", show=False),
        Binding("k", "cursor_up", "Up", show=False),
    ]

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, cursor_type="row", cell_padding=CELL_PADDING, zebra_stripes=False)
        self.sort_name = "status"
        self.sort_reverse = False
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
        self._order_list: list[str] = []  # row names top to bottom
        self._dirty: dict[str, BackendSnapshot] = {}  # rows whose cells wait until they are in view
        self._row_context: RowContext | None = None
        self._title = ""
        # Until the operator moves the cursor, it stays on the first row (the worst backend,
        # sorted by status); after that, it follows the backend they chose.
        self._chosen = False
        self._moving = False  # the table itself is moving rows or the cursor (_sync, _rebuild)

    def restyle(self) -> None:
        self._rebuild()

    @contextmanager
    def _itself(self):
        """Cursor moves inside this block are the table's own, not the operator's choice."""
        outer, self._moving = self._moving, True
        try:
            yield
        finally:
            self._moving = outer

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

    def set_sort(self, name: str, reverse: bool = False) -> None:
        self.sort_name, self.sort_reverse = name, reverse
        self._sync()

    def set_filter(self, text: str) -> None:
        self.filter_text = text
        self._sync()

    # -- the operator's cursor ----------------------------------------------------------------

    def watch_cursor_coordinate(self, old, new) -> None:
        super().watch_cursor_coordinate(old, new)
        if not self._moving:  # moved by a key, a click or the screen, not by the table re-sorting itself
            self._chosen = True

    def on_data_table_header_selected(self, event: DataTable.HeaderSelected) -> None:
        """A click on a column's header sorts by it; a second click reverses."""
        event.stop()
        key = event.column_key.value
        if key in fmt.SORT_KEYS:
            self.set_sort(key, reverse=not self.sort_reverse if key == self.sort_name else False)

    # -- layout -------------------------------------------------------------------------------

    def on_resize(self) -> None:
        if self._fleet is not None and self._layout() != (self._columns, self._name_width):
            self._rebuild()

    def _layout(self) -> tuple[tuple[str, ...], int]:
        names = [b.name for b in self._fleet.backends] if self._fleet else []
        agents = self._fleet is not None and any(b.agent is not None for b in self._fleet.backends)
        return layout(self.size.width, max((len(n) for n in names), default=NAME_MIN), agents)

    def _rebuild(self) -> None:
        """Start again from the columns (a layout or theme change); the cursor stays on its backend."""
        keep = self.selected_name if self._chosen else None
        self._columns, self._name_width = self._layout()
        with self.app.batch_update(), self._itself():
            self.clear(columns=True)
            self._cells.clear()
            self._cache_keys.clear()
            self._order.clear()
            self._order_list = []
            self._dirty.clear()
            for key in self._columns:
                column = COLUMNS[key]
                width = column.width or self._name_width
                label = styled(Cell(self._label(key)), self._styles, column.justify)
                self.add_column(label, key=key, width=width)
            self._sync(keep)

    def _label(self, key: str) -> str:
        label = COLUMNS[key].label
        if key == self.sort_name:
            label += "▲" if self.sort_reverse else "▼"  # which column orders the rows, and which way
        return label

    # -- the diff ---------------------------------------------------------------------------

    def _sync(self, keep: str | None = None) -> None:
        fleet = self._fleet
        if fleet is None:
            return
        if (self._columns, self._name_width) != self._layout():
            self._rebuild()  # calls back into _sync with the new columns
            return
        self._relabel()
        self.total = len(fleet.backends)
        visible = [b for b in fleet.backends if fmt.matches(b, self.filter_text)]
        wanted = {b.name for b in visible}
        context = RowContext(fleet.at, self._settings)
        self._row_context = context
        # Rows move when values change under the sort; the cursor follows its backend, not its row number.
        keep = keep or (self.selected_name if self._chosen else None)
        with self.app.batch_update(), self._itself():
            gone = [k.value for k in self.rows if k.value not in wanted]
            if len(gone) > BULK_REMOVE:
                # DataTable.remove_row renumbers every row: a filter that hides thousands of rows
                # took seconds that way. Start the rows again instead (the columns stay).
                self.clear()
                self._cells.clear()
                self._cache_keys.clear()
                self._order.clear()
                self._order_list = []
                self._dirty.clear()
            else:
                for name in gone:
                    self.remove_row(name)
                    self._cells.pop(name, None)
                    self._cache_keys.pop(name, None)
                    self._dirty.pop(name, None)
            for b in visible:
                if b.name not in self._cells:
                    cells = self._row_cells(b, context)
                    self.add_row(*(self._styled(k, c) for k, c in cells.items()), key=b.name)
                    self._cells[b.name] = cells
                else:
                    self._dirty[b.name] = b
            self._reorder(visible)
            self._restore_cursor(keep)
            # Only the rows in view (and a screenful either side) are brought up to date now; the
            # rest when they scroll into view. A fleet of thousands costs what a screenful costs.
            self._update_in_view()
            self._update_title()

    def _in_view(self) -> range:
        top = int(self.scroll_y)
        height = max(1, self.size.height)
        return range(max(0, top - height), top + 2 * height)

    def _update_in_view(self) -> None:
        if not self._dirty or self._row_context is None:
            return
        ordered = self._order_list
        window = self._in_view()
        names = [ordered[i] for i in window if i < len(ordered)] if len(self._dirty) > len(window) else [
            n for n in self._dirty if window.start <= self._order.get(n, -1) < window.stop
        ]
        for name in names:
            b = self._dirty.pop(name, None)
            old = self._cells.get(name)
            if b is None or old is None:
                continue
            cells = self._row_cells(b, self._row_context)
            for key, cell in cells.items():
                if old[key] != cell:
                    self.update_cell(name, key, self._styled(key, cell))
            self._cells[name] = cells

    def watch_scroll_y(self, old_value: float, new_value: float) -> None:
        super().watch_scroll_y(old_value, new_value)
        if round(old_value) != round(new_value) and getattr(self, "_dirty", None):  # also called while DataTable initialises
            with self._itself():
                self._update_in_view()

    def _relabel(self) -> None:
        """The sort mark moves between header labels in place: rebuilding the table for it cost a
        second at 3,000 rows."""
        changed = False
        for key, column in self.columns.items():
            label = self._label(key.value)
            if str(column.label.plain) != label:
                column.label = styled(Cell(label), self._styles, COLUMNS[key.value].justify)
                changed = True
        if changed:
            self._clear_caches()
            self.refresh()

    def _row_cells(self, b: BackendSnapshot, context: RowContext) -> dict[str, Cell]:
        busy = b.name in self._probing
        cache_key = (b.seq, busy, b.stale_since, b.agent)  # an agent lost changes no seq of its backends
        old = self._cells.get(b.name)
        if old is not None and self._cache_keys.get(b.name) == cache_key:
            cells = dict(old)
            for key in _TICKING:  # figures turn old with time alone
                if key in cells:
                    cells[key] = _dim(COLUMNS[key].cell(b, context), b)
            return cells
        cells = {key: _dim(COLUMNS[key].cell(b, context), b) for key in self._columns}
        if busy:
            cells["status"] = fmt.PROBING
        self._cache_keys[b.name] = cache_key
        return cells

    def _update_title(self) -> None:
        direction = " (reversed)" if self.sort_reverse else ""
        title = f"sort: {fmt.SORT_LABELS[self.sort_name]}{direction}"
        if self.filter_text:
            title += f" · filter '{self.filter_text}': {self.row_count} of {self.total}"
        if title != self._title:  # setting a border title always repaints
            self._title = title
            self.border_title = Content(title)  # the filter is typed text, never markup

    def _styled(self, key: str, cell: Cell):
        return styled(cell, self._styles, COLUMNS[key].justify)

    def _reorder(self, visible: list[BackendSnapshot]) -> None:
        order_of = fmt.SORT_KEYS[self.sort_name]
        ordered = sorted(visible, key=order_of)
        if self.sort_reverse:  # the other way round, but a backend with no figure still sorts last
            known = [b for b in ordered if order_of(b)[0] != fmt.NO_FIGURE]
            ordered = known[::-1] + [b for b in ordered if order_of(b)[0] == fmt.NO_FIGURE]
        order = {b.name: i for i, b in enumerate(ordered)}
        if order == self._order and len(order) == self.row_count:
            return
        self._order = order
        self._order_list = [b.name for b in ordered]
        # DataTable sorts on cell values; the name cell carries the full name, so it keys the order.
        self.sort("name", key=lambda name: order[name.plain])

    def _restore_cursor(self, name: str | None) -> None:
        if name is None or name not in self._cells:
            if not self._chosen and self.row_count and self.cursor_row != 0:
                self.move_cursor(row=0, animate=False)
            return
        index = self.get_row_index(name)
        if index != self.cursor_row:
            self.move_cursor(row=index, animate=False)
