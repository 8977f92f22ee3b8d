"""serve's event log: one line per engine event on stderr, as text or JSON, fit for journald and container logs."""

from __future__ import annotations

import json
import sys
import time
from typing import TextIO

from llmtop.engine import Engine
from llmtop.sanitize import for_terminal
from llmtop.snapshot import Event


def _when(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at)) + f".{int(at % 1 * 1000):03d}Z"


def format_event(event: Event, fmt: str) -> str:
    """One line. Text: every piece printable (a backend's text cannot forge a line or reach the
    terminal); JSON: exact, with controls escaped by JSON."""
    if fmt == "json":
        return json.dumps(
            {"time": _when(event.at), "level": event.level, "kind": event.kind, "backend": event.backend, "message": event.message}
        )
    backend = for_terminal(event.backend, 64) if event.backend else "-"
    return f"{_when(event.at)} {event.level:<7} {backend} {event.kind}: {for_terminal(event.message, 1000)}"


class EventLog:
    """Writes every event the engine emits, as it happens."""

    def __init__(self, engine: Engine, fmt: str = "text", stream: TextIO | None = None):
        self.fmt = fmt
        self.stream = stream or sys.stderr
        self._unsubscribe = engine.subscribe(self.write)

    def write(self, event: Event) -> None:
        try:
            self.stream.write(format_event(event, self.fmt) + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass  # a closed or full stderr must not stop the engine

    def close(self) -> None:
        self._unsubscribe()
