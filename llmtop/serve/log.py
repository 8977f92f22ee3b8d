"""serve's event log: one line per engine event on stderr, as text or JSON, fit for journald and container logs."""

from __future__ import annotations

import json
import queue
import sys
import threading
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
    """Writes every event the engine emits, as it happens, without ever waiting on stderr.

    The engine's loop only queues a line; a thread of its own writes it. A stderr nobody reads
    (a full pipe, a stuck journal) would otherwise freeze the loop, and with it every readiness
    answer a balancer waits for. Past QUEUED lines, new ones are dropped and counted, and the
    count is written as soon as writing works again."""

    QUEUED = 10_000

    def __init__(self, engine: Engine, fmt: str = "text", stream: TextIO | None = None):
        self.fmt = fmt
        self.stream = stream or sys.stderr
        self._lines: queue.Queue[str | None] = queue.Queue(maxsize=self.QUEUED)
        self._dropped = 0
        self._lock = threading.Lock()
        self._writer = threading.Thread(target=self._write_lines, name="llmtop-log", daemon=True)
        self._writer.start()
        self._unsubscribe = engine.subscribe(self.write)

    def write(self, event: Event) -> None:
        try:
            self._lines.put_nowait(format_event(event, self.fmt))
        except queue.Full:
            with self._lock:
                self._dropped += 1

    def _write_lines(self) -> None:
        while (line := self._lines.get()) is not None:
            with self._lock:
                dropped, self._dropped = self._dropped, 0
            if dropped:
                line = f"{_when(time.time())} warning - log: {dropped} lines dropped (stderr was not being read)\n" + line
            try:
                self.stream.write(line + "\n")
                self.stream.flush()
            except (OSError, ValueError):
                pass  # a closed stderr must not stop the engine; the exit code still says how it ended

    def close(self, wait_s: float = 0.5) -> None:
        """Stop taking events and write what is queued, waiting at most wait_s for stderr."""
        self._unsubscribe()
        try:
            self._lines.put_nowait(None)
        except queue.Full:
            return  # stderr is stuck: what is queued is lost with it
        self._writer.join(wait_s)
