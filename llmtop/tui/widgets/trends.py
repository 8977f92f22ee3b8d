"""Sparklines of the selected backend: TTFT, decode tokens/s, queue depth and health latency."""

from __future__ import annotations

from typing import Callable, NamedTuple

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.content import Content
from textual.widgets import Sparkline, Static

from llmtop.snapshot import BackendSnapshot
from llmtop.tui import format as fmt

History = tuple[tuple[float, float], ...]


class Series(NamedTuple):
    key: str
    title: str
    history: Callable[[BackendSnapshot], History]
    text: Callable[[float], str]


SERIES = (
    Series("ttft", "TTFT", lambda b: b.ttft_history, fmt.ms),
    Series("tps", "tok/s", lambda b: b.tps_history, lambda v: f"{v:.1f}"),
    Series("queue", "queue", lambda b: b.queue_history, lambda v: f"{v:g}"),
    Series("latency", "health latency", lambda b: b.latency_history, fmt.ms),
)


class Trends(Vertical):
    """One label and one Sparkline per series; a series with no points says so instead."""

    BORDER_TITLE = "trends"

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._shown: dict[str, tuple] = {}  # series key -> history_mark of what it shows
        self._name: str | None = None

    def compose(self) -> ComposeResult:
        for series in SERIES:
            yield Static(series.title, id=f"trend-{series.key}-label", classes="trend-label", markup=False)
            yield Sparkline([], id=f"trend-{series.key}", classes="trend")

    def show(self, b: BackendSnapshot | None) -> None:
        if b is None:  # nothing selected (a filter hides every row): show nobody's trends
            if self._name is not None:
                self._name = None
                self._shown.clear()
                self.border_title = "trends"
                for series in SERIES:
                    self.query_one(f"#trend-{series.key}-label", Static).update(f"{series.title}: no backend selected", layout=False)
                    self.query_one(f"#trend-{series.key}", Sparkline).data = []
            return
        if b.name != self._name:
            self._name = b.name
            self._shown.clear()
            self.border_title = Content(f"{b.name} · trends")  # a name is data, never markup
        for series in SERIES:
            history = series.history(b)
            if self._shown.get(series.key) == (mark := fmt.history_mark(history)):
                continue
            self._shown[series.key] = mark
            # One line of a fixed width (app.tcss): a new text never changes its size, so no layout of the whole screen.
            self.query_one(f"#trend-{series.key}-label", Static).update(self._label(series, history), layout=False)
            sparkline = self.query_one(f"#trend-{series.key}", Sparkline)
            # A new list is what makes Sparkline redraw. One point would fill the box as a solid block.
            sparkline.data = [v for _, v in history] if len(history) > 1 else []

    @staticmethod
    def _label(series: Series, history: History) -> str:
        if not history:
            return f"{series.title}: no data yet"
        values = [v for _, v in history]
        return f"{series.title}: {series.text(values[-1])}  (min {series.text(min(values))}, max {series.text(max(values))})"
