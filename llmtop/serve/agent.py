"""HAProxy's agent-check: one line in (the backend's name, from `agent-send`), one line out, from the latest snapshot."""

from __future__ import annotations

import asyncio
import time
from typing import Callable

from llmtop.config import ServeSettings, split_address
from llmtop.engine import Engine
from llmtop.sanitize import for_terminal
from llmtop.serve.board import BoardServer
from llmtop.snapshot import Event

NAME_MAX = 256  # longer than any backend name; a longer line is not an agent-send
READ_S = 2.0  # HAProxy sends its line at once; a connection that does not is let go
UNKNOWN_EVERY_S = 60.0  # an unknown name is logged at most this often
UNKNOWN_ANY_S = 5.0  # and any unknown name at all at most this often


class AgentServer(BoardServer):
    """Answers HAProxy's `agent-check` on a TCP port of its own (`--agent-listen`).

    HAProxy connects every `agent-inter`, sends what `agent-send` says (configure it as the
    backend's name and a newline, "gpu1\\n"), and reads one line back: `ready up`, `drain up`,
    `maint` or `ready down`, with `# why` (readiness.agent_reply). For a name llmtop does not
    know, or a backend not polled yet, it answers nothing: HAProxy keeps the state it had (a
    restart of llmtop must not take a fleet out of service); the unknown name is logged. Nor
    while the engine's loop is stuck (answers.STALL_S): what it last said is not current.

    Answered on a thread of its own from the published table (board.py), so HAProxy never waits
    on the engine's loop (loopthread.py)."""

    def __init__(self, engine: Engine, listen: str, settings: Callable[[], ServeSettings] | None = None):
        super().__init__(engine, settings, "llmtop-agent")
        self.listen = listen
        self._server: asyncio.Server | None = None
        self._unknown_logged: dict[str, float] = {}
        self._unknown_any = -UNKNOWN_ANY_S

    async def _start(self) -> int:
        host, port = split_address(self.listen)
        try:
            self._server = await asyncio.start_server(self._answer, host, port, limit=NAME_MAX + 2)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot listen on {self.listen} for HAProxy's agent-check: {exc.strerror}") from None
        return self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), READ_S)
            name = line.decode("utf-8", "replace").strip()
            if self._board.stalled() is not None:
                return
            current, a = self._board.current(name)
            if not current:
                a = await self._thread.on_home(self._board.ask, name)
            if a is None:
                self._unknown(name)
                return
            if a.agent is not None:
                writer.write(a.agent.encode())
                await writer.drain()
        except (asyncio.TimeoutError, ValueError, ConnectionError):
            pass  # too slow, too long (LimitOverrunError is a ValueError), or gone: nothing to answer
        finally:
            writer.close()

    def _unknown(self, name: str) -> None:
        """Said once a minute per name, and once every UNKNOWN_ANY_S at all: anyone who reaches
        this port could otherwise fill the event log with names of their choosing."""
        now = time.monotonic()
        if now - self._unknown_any < UNKNOWN_ANY_S:
            return
        if now - self._unknown_logged.get(name, -UNKNOWN_EVERY_S) >= UNKNOWN_EVERY_S:
            self._unknown_any = now
            self._unknown_logged = {n: at for n, at in self._unknown_logged.items() if now - at < UNKNOWN_EVERY_S}
            self._unknown_logged[name] = now
            self._thread.to_home(
                self.engine.emit,
                Event(time.time(), None, "agent", f"HAProxy asked about {for_terminal(name, 64)!r}, which is not in the config; set agent-send to a backend's name", "warning"),
            )
