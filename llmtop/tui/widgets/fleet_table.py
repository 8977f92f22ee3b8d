"""The fleet table: one row per backend, drawn only where it is in view, so a fleet of thousands costs a screenful."""

from __future__ import annotations

from typing import Callable, NamedTuple

from rich.cells import cell_len, set_cell_size
from rich.segment import Segment
from rich.style import Style
from textual import events
from textual.binding import Binding
from textual.content import Content
from textual.geometry import Region, Size
from textual.message import Message
from textual.scroll_view import ScrollView
from textual.strip import Strip

from llmtop.config import Settings
from llmtop.snapshot import BackendSnapshot, FleetSnapshot
from llmtop.tui import format as fmt
from llmtop.tui.format import Cell
from llmtop.tui.palette import ThemedPalette
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
NAME_ROOMY = 20  # an extra column is added only while names keep this much room (or their full length)
HEADER = 1  # lines above the rows, which stay put while the rows scroll
# Each cell's segments carry their column, so a cell stays a span of its own when a line is
# exported (an SVG screenshot places spans by their cell offsets: a wide glyph moves only its own cell).
_CELL = [Style.from_meta({"column": i}) for i in range(len(ORDER))]
_EDGE = Style.from_meta({"out_of_bounds": True})


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


def fit(text: str, width: int, justify: str) -> str:
    """The text in exactly `width` cells: cut with an ellipsis (vllm-fast and vllm-flaky do not
    both read "vllm-fla"), then padded on the side the column justifies away from."""
    if justify == "right":
        text = text.rstrip()
    length = cell_len(text)
    if length > width:
        text = set_cell_size(text, width - 1) + "…"
        length = cell_len(text)
    pad = " " * (width - length)
    return pad + text if justify == "right" else text + pad


class FleetTable(ThemedPalette, ScrollView, can_focus=True):
    """Shows a FleetSnapshot; picks its columns from its own width.

    It keeps the rows as the sorted, filtered list of snapshots and draws a line only when it is in
    view (the Line API): a row's cells are worked out when it is drawn, and its line is kept until
    its cells change. An update costs what changed on screen, and a key costs a screenful, however
    large the fleet.
    """

    COMPONENT_CLASSES = {"fleet-table--header", "fleet-table--cursor", "fleet-table--hover", "fleet-table--header-hover"}
    # The look of Textual's DataTable, which this table was until a fleet of 3,000 made it slow.
    DEFAULT_CSS = """
    FleetTable {
        background: $surface;
        color: $foreground;
        &:focus {
            background-tint: $foreground 5%;
            & > .fleet-table--cursor {
                background: $block-cursor-background;
                color: $block-cursor-foreground;
                text-style: $block-cursor-text-style;
            }
            & > .fleet-table--header {
                background-tint: $foreground 5%;
            }
        }
        & > .fleet-table--header {
            text-style: bold;
            background: $panel;
            color: $foreground;
        }
        &:ansi > .fleet-table--header {
            background: ansi_bright_blue;
            color: ansi_default;
        }
        & > .fleet-table--cursor {
            background: $block-cursor-blurred-background;
            color: $block-cursor-blurred-foreground;
            text-style: $block-cursor-blurred-text-style;
        }
        & > .fleet-table--header-hover {
            background: $accent 30%;
        }
        & > .fleet-table--hover {
            background: $block-hover-background;
        }
    }
    """

    BINDINGS = [
        Binding("enter", "select_cursor", "Details"),
        Binding("up,k", "cursor_up", "Up", show=False),
        Binding("down,j", "cursor_down", "Down", show=False),
        Binding("pageup", "page_up", "Page up", show=False),
        Binding("pagedown", "page_down", "Page down", show=False),
        Binding("home,ctrl+home", "first", "First", show=False),
        Binding("end,ctrl+end", "last", "Last", show=False),
    ]

    class Highlighted(Message):
        """The cursor is on another backend (`name`; None: no rows)."""

        def __init__(self, name: str | None) -> None:
            super().__init__()
            self.name = name

    class Selected(Message):
        """Enter, or a click on the row under the cursor: the operator wants this backend's details."""

        def __init__(self, name: str) -> None:
            super().__init__()
            self.name = name

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.sort_name = "status"
        self.sort_reverse = False
        self.filter_text = ""
        self.total = 0  # backends before the filter
        self._fleet: FleetSnapshot | None = None
        self._settings = Settings()
        self._probing: frozenset[str] = frozenset()
        self._row_context = RowContext(0.0, self._settings)
        self._columns: tuple[str, ...] = ()
        self._name_width = 0
        self._rows: list[BackendSnapshot] = []  # what the filter lets through, top to bottom
        self._index: dict[str, int] = {}
        self._cursor = 0
        self._highlighted: str | None = None  # the name last announced with Highlighted
        # Until the operator moves the cursor, it stays on the first row (the worst backend,
        # sorted by status); after that, it follows the backend they chose.
        self._chosen = False
        self._hover: int | None = None  # the row under the mouse (-1: the header), shown only after a mouse move
        self._cells: dict[str, tuple[tuple, float, dict[str, Cell]]] = {}  # name -> (stamp, now, cells)
        self._strips: dict[str, tuple[tuple[Cell, ...], Strip]] = {}  # name -> a plain line of its cells
        self._shown: dict[int, tuple] = {}  # screen line -> what was last drawn there
        self._look: tuple = ()  # the styles the cached lines were drawn with
        self._title = ""

    def restyle(self) -> None:
        self._forget()

    def _forget(self) -> None:
        """Draw every line again (new columns, theme or focus)."""
        self._strips.clear()
        self._shown.clear()
        self.refresh()

    # -- what the screen calls ---------------------------------------------------------------

    @property
    def selected_name(self) -> str | None:
        """The backend under the cursor."""
        return self._rows[self._cursor].name if self._rows else None

    @property
    def row_count(self) -> int:
        return len(self._rows)

    @property
    def cursor_row(self) -> int:
        return self._cursor

    @property
    def names(self) -> list[str]:
        """The backends shown, top to bottom."""
        return [b.name for b in self._rows]

    def get_row_index(self, name: str) -> int:
        return self._index[name]

    def cells(self, name: str) -> dict[str, Cell]:
        """What the row of this backend shows, column by column."""
        return dict(zip(self._columns, self._cells_of(self._rows[self._index[name]])))

    def show(self, view: FleetView) -> None:
        self._fleet, self._settings, self._probing = view.fleet, view.settings, view.probing
        self._sync()

    def set_sort(self, name: str, reverse: bool = False) -> None:
        self.sort_name, self.sort_reverse = name, reverse
        self._sync()

    def set_filter(self, text: str) -> None:
        self.filter_text = text
        self._sync()

    def move_cursor(self, row: int) -> None:
        """Put the cursor on this row, as the operator's choice (keys, clicks, the screen)."""
        if not self._rows:
            return
        self._chosen = True
        self._show_hover(None)
        self._place_cursor(max(0, min(row, len(self._rows) - 1)))
        self._scroll_to_cursor()
        self._announce()

    # -- keys and the mouse -------------------------------------------------------------------

    def action_cursor_up(self) -> None:
        self.move_cursor(self._cursor - 1)

    def action_cursor_down(self) -> None:
        self.move_cursor(self._cursor + 1)

    def action_page_up(self) -> None:
        self.move_cursor(self._cursor - self._page())

    def action_page_down(self) -> None:
        self.move_cursor(self._cursor + self._page())

    def action_first(self) -> None:
        self.move_cursor(0)

    def action_last(self) -> None:
        self.move_cursor(len(self._rows) - 1)

    def action_select_cursor(self) -> None:
        if (name := self.selected_name) is not None:
            self.post_message(self.Selected(name))

    def _at(self, event: events.MouseEvent) -> tuple[int, str | None] | None:
        """The row (-1: the header) and column under the mouse, or None outside the table's lines."""
        offset = event.get_content_offset(self)
        if offset is None:
            return None
        if offset.y < HEADER:
            row = -1
        else:
            row = offset.y - HEADER + int(self.scroll_y)
            if row >= len(self._rows):
                return None
        x = offset.x + int(self.scroll_x)
        for key in self._columns:
            x -= self._width(key) + 2 * CELL_PADDING
            if x < 0:
                return row, key
        return row, None

    def on_click(self, event: events.Click) -> None:
        at = self._at(event)
        if at is None:
            return
        event.stop()
        row, column = at
        if row == -1:  # a click on a column's header sorts by it; a second click reverses
            if column in fmt.SORT_KEYS:
                self.set_sort(column, reverse=not self.sort_reverse if column == self.sort_name else False)
            return
        again = row == self._cursor
        self.move_cursor(row)
        self._show_hover(row)
        if again:
            self.action_select_cursor()

    def on_mouse_move(self, event: events.MouseMove) -> None:
        at = self._at(event)
        self._show_hover(None if at is None else at[0])

    def on_leave(self, _event: events.Leave) -> None:
        self._show_hover(None)

    def _show_hover(self, row: int | None) -> None:
        if row != self._hover:
            for old_or_new in (self._hover, row):
                self._refresh_row(old_or_new)
            self._hover = row

    # -- layout -------------------------------------------------------------------------------

    def on_resize(self) -> None:
        if self._fleet is not None:
            self._sync()

    def _layout(self) -> tuple[tuple[str, ...], int]:
        backends = self._fleet.backends if self._fleet else ()
        longest = max((len(b.name) for b in backends), default=NAME_MIN)
        agents = any(b.agent is not None for b in backends)
        return layout(self.size.width, longest, agents)

    def _width(self, key: str) -> int:
        return COLUMNS[key].width or self._name_width

    def _label(self, key: str) -> str:
        label = COLUMNS[key].label
        if key == self.sort_name:
            label += "▲" if self.sort_reverse else "▼"  # which column orders the rows, and which way
        return label

    def _page(self) -> int:
        return max(1, self.scrollable_content_region.height - HEADER)

    # -- the rows -----------------------------------------------------------------------------

    def _sync(self) -> None:
        fleet = self._fleet
        if fleet is None:
            return
        if (self._columns, self._name_width) != (wanted := self._layout()):
            self._columns, self._name_width = wanted
            self._cells.clear()
            self._forget()
        self.total = len(fleet.backends)
        self._row_context = RowContext(fleet.at, self._settings)
        # Rows move when values change under the sort; the cursor follows its backend, not its row number.
        keep = self.selected_name if self._chosen else None
        shown = [b for b in fleet.backends if fmt.matches(b, self.filter_text)] if self.filter_text else fleet.backends
        self._rows = self._ordered(shown)
        self._index = {b.name: i for i, b in enumerate(self._rows)}
        if len(self._cells) > len(fleet.backends):  # forget backends that are gone
            names = {b.name for b in fleet.backends}
            self._cells = {n: c for n, c in self._cells.items() if n in names}
            self._strips = {n: s for n, s in self._strips.items() if n in names}
        width = sum(self._width(k) + 2 * CELL_PADDING for k in self._columns)
        if self.virtual_size != (size := Size(width, len(self._rows) + HEADER)):
            self.virtual_size = size
        if keep is not None and keep in self._index:
            row = self._index[keep]
        else:
            row = min(self._cursor, len(self._rows) - 1) if self._chosen else 0
        if max(row, 0) != self._cursor:
            self._cursor = max(row, 0)
            self._scroll_to_cursor()
        self._refresh_changed()
        self._update_title()
        self._announce()

    def _ordered(self, backends) -> list[BackendSnapshot]:
        order_of = fmt.SORT_KEYS[self.sort_name]
        ordered = sorted(backends, key=order_of)
        if self.sort_reverse:  # the other way round, but a backend with no figure still sorts last
            known = [b for b in ordered if order_of(b)[0] != fmt.NO_FIGURE]
            ordered = known[::-1] + [b for b in ordered if order_of(b)[0] == fmt.NO_FIGURE]
        return ordered

    def _place_cursor(self, row: int) -> None:
        if row != self._cursor:
            old, self._cursor = self._cursor, row
            self._refresh_row(old)
            self._refresh_row(row)

    def _scroll_to_cursor(self) -> None:
        """Scroll as little as keeps the cursor's row in view, below the header."""
        top, rows = int(self.scroll_y), self._page()
        if self._cursor < top:
            self.scroll_to(y=self._cursor, animate=False)
        elif self._cursor >= top + rows:
            self.scroll_to(y=self._cursor - rows + 1, animate=False)

    def _announce(self) -> None:
        if (name := self.selected_name) != self._highlighted:
            self._highlighted = name
            self.post_message(self.Highlighted(name))

    def _refresh_row(self, row: int | None) -> None:
        if row is None:
            return
        y = HEADER + row - int(self.scroll_y) if row >= 0 else 0
        if 0 <= y < self.size.height:
            self.refresh(Region(0, y, self.size.width, 1))

    def _refresh_changed(self) -> None:
        """Draw again only the lines in view whose backend, cells or highlight changed."""
        width, height = self.size
        top = int(self.scroll_y)
        regions = [Region(0, y, width, 1) for y in range(height) if self._shown.get(y) != self._line_key(y, top)]
        if regions:
            self.refresh(*regions)

    def _line_key(self, y: int, top: int) -> tuple:
        if y < HEADER:
            return ("header", self._columns, self._name_width, self.sort_name, self.sort_reverse, self._hover == -1)
        row = y - HEADER + top
        if row >= len(self._rows):
            return ()
        b = self._rows[row]
        return b.name, self._cells_of(b), row == self._cursor, row == self._hover

    def _cells_of(self, b: BackendSnapshot) -> tuple[Cell, ...]:
        busy = b.name in self._probing
        stamp = (b.seq, busy, b.stale_since, b.agent)  # an agent lost changes no seq of its backends
        context = self._row_context
        cached = self._cells.get(b.name)
        if cached is not None and cached[0] == stamp:
            if cached[1] == context.now:
                return tuple(cached[2].values())
            cells = dict(cached[2])
            for key in _TICKING:  # figures turn old with time alone
                if key in cells:
                    cells[key] = _dim(COLUMNS[key].cell(b, context), b)
        else:
            cells = {key: _dim(COLUMNS[key].cell(b, context), b) for key in self._columns}
            if busy:
                cells["status"] = fmt.PROBING
        self._cells[b.name] = (stamp, context.now, cells)
        return tuple(cells.values())

    def _update_title(self) -> None:
        direction = " (reversed)" if self.sort_reverse else ""
        title = f"sort: {fmt.SORT_LABELS[self.sort_name]}{direction}"
        if self.filter_text:
            title += f" · filter '{self.filter_text}': {self.row_count} of {self.total}"
        if title != self._title:  # setting a border title always repaints
            self._title = title
            self.border_title = Content(title)  # the filter is typed text, never markup

    # -- drawing ------------------------------------------------------------------------------

    def render_lines(self, crop: Region) -> list[Strip]:
        look = (self.rich_style, self.get_pseudo_class_state(), self.size.width, self._styles)
        if look != self._look:
            self._look = look
            self._strips.clear()
        return super().render_lines(crop)

    def render_line(self, y: int) -> Strip:
        width = self.size.width
        top, left = int(self.scroll_y), int(self.scroll_x)
        key = self._line_key(y, top)
        self._shown[y] = key
        base = self.rich_style
        if not key:
            return Strip.blank(width, base)
        if y < HEADER:
            strip = self._header_strip(key[-1])
        else:
            name, cells, cursor, hover = key
            if cursor or hover:
                strip = self._row_strip(cells, cursor, hover)
            else:
                cached = self._strips.get(name)
                if cached is None or cached[0] != cells:
                    cached = (cells, self._row_strip(cells, False, False))
                    self._strips[name] = cached
                strip = cached[1]
        if left or strip.cell_length > width:
            strip = strip.crop(left, left + width)
        return strip.adjust_cell_length(width, base)

    def _header_strip(self, hover: bool) -> Strip:
        row = self.get_component_styles("fleet-table--header").rich_style
        if hover:
            row += self.get_component_rich_style("fleet-table--hover") + self.get_component_rich_style("fleet-table--header-hover")
        pad = " " * CELL_PADDING
        segments = []
        for i, key in enumerate(self._columns):
            segments.append(Segment(pad + fit(self._label(key), self._width(key), COLUMNS[key].justify) + pad, row + _CELL[i]))
        segments.append(Segment(" " * max(0, self.size.width - sum(s.cell_length for s in segments)), row + _EDGE))
        return Strip(segments).simplify()

    def _row_strip(self, cells: tuple[Cell, ...], cursor: bool, hover: bool) -> Strip:
        row = self.rich_style
        over = Style.null()
        if hover:
            row += self.get_component_rich_style("fleet-table--hover")
        if cursor:
            highlight = self.get_component_rich_style("fleet-table--cursor")
            row += highlight
            over = Style.from_color(highlight.color)  # the cursor's colour wins over the levels' colours
        styles = self._styles
        pad = " " * CELL_PADDING
        segments = []
        for i, (key, cell) in enumerate(zip(self._columns, cells)):
            edge = row + _CELL[i]
            level = styles.get(cell.level) or Style.null() if cell.text else Style.null()  # Rich styled no blank of an empty text
            text = Segment(fit(cell.text, self._width(key), COLUMNS[key].justify), edge + level + over)
            segments += (Segment(pad, edge), text, Segment(pad, edge))
        used = sum(self._width(k) + 2 * CELL_PADDING for k in self._columns)
        segments.append(Segment(" " * max(0, self.size.width - used), row + _EDGE))
        return Strip(segments).simplify()
