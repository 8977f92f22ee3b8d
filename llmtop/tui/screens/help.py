"""The `?` screen: every key, what it does, and which ones --read-only turns off."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.content import Content
from textual.screen import ModalScreen
from textual.widgets import Static

from llmtop.tui.widgets.too_small import TooSmall

# (key, what it does, changes state); kept within 76 columns, " [off]" included where --read-only adds it,
# so that the help fits an 80x24 terminal (tests/test_tui.py).
KEYS = (
    ("↑ ↓ j k", "move between backends", False),
    ("Enter", "details: phases, p50/p95, models, errors, breaker, metrics", False),
    ("Esc", "back, close, or clear the filter", False),
    ("p", "probe the selected backend now: a full round incl. a completion", False),
    ("P", "probe every backend now; progress shows in the header", False),
    ("d", "drain / undrain the selected one (asks; survives restarts)", True),
    ("t", "disable / enable the selected backend (survives restarts)", True),
    ("r", "reload the config (SIGHUP and edits too, even read-only)", True),
    ("/", "filter by name, provider, status, agent or model name", False),
    ("s / S", "sort by the next column / reverse the sort (or click a header)", False),
    ("space", "pause the screen to read it (polls and probes go on)", False),
    ("g", "show or hide the GPU panel", False),
    ("T", "cycle the colour theme (remembered for next time)", False),
    ("?", "this help", False),
    ("q Ctrl-C", "quit", False),
)
LEGEND = (
    "status: the symbol is health, the word is health or the operator's state\n"
    "  ● healthy  ▲ degraded  ✖ down  ◌ loading  ? unknown  ⟳ probing\n"
    "  ● draining: drained, healthy   ○ disabled: nothing is sent to it\n"
    "figures: ! past the warning level   !! past the alarm level\n"
    "  (182ms) last measured, older than the backend's present state\n"
    "  ?/2 model list unknown   1/2! a model missing   ~ tokens counted\n"
    "  age: how old the TTFT and tok/s beside it are\n"
    "  ◷ stale: its agent is lost; figures as they were (never down)\n"
    "header: Σ tok/h what probes cost an hour as planned\n"
    "circuit: closed · OPEN · half-open"
)


class HelpScreen(ModalScreen):
    BINDINGS = [
        Binding("escape", "app.pop_screen", "Close"),
        Binding("question_mark", "app.pop_screen", "Close", show=False),
    ]

    def __init__(self, read_only: bool) -> None:
        super().__init__()
        self.read_only = read_only

    def compose(self) -> ComposeResult:
        yield TooSmall()
        with VerticalScroll(id="help") as scroll:
            scroll.border_title = "llmtop keys"
            scroll.border_subtitle = "read-only: [off] keys do nothing · Esc closes" if self.read_only else "Esc closes"
            yield Static(self._keys(), id="help-keys")
            yield Static(LEGEND, id="help-legend", markup=False)

    def _keys(self) -> Content:
        lines = []
        for key, what, changes in KEYS:
            off = self.read_only and changes
            line = Content.assemble((f"{key:>8}  ", "bold $text-accent"), (what, "$foreground-muted" if off else ""))
            if off:
                line = line.append(Content.styled(" [off]", "$text-warning"))
            lines.append(line)
        return Content("\n").join(lines)
