"""Readiness answers published once per engine change, so a balancer's question is answered without waiting on the engine's loop.

The engine calls the board (Engine.watch) each time it makes a backend a new snapshot, before
anything else can see that snapshot; the board works out that backend's answers with the same
rules as before (readiness.readiness, readiness.agent_reply) and swaps in a new immutable table.
Another thread reads `board.table` (one attribute read: the whole table or the one before, never
half of each) and answers from it. So an answer is what asking the engine at that instant would
have given, with two exceptions handled where they arise:
- time alone moves an open breaker to half-open once its cooldown passed (the engine applies
  it when next asked); an entry says until when it holds (`until`), and a reader past that asks
  the engine's loop instead (Board.ask);
- an engine whose loop stopped ticking publishes nothing new; the table says when the engine
  last ticked (`beat`), and a reader treats an old beat as no answer.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable, NamedTuple

from llmtop.config import ServeSettings
from llmtop.engine import Engine
from llmtop.loopthread import LoopThread
from llmtop.serve.answers import stalled_for
from llmtop.serve.front import Entry, Front
from llmtop.serve.readiness import agent_reply, readiness
from llmtop.snapshot import BackendSnapshot

BEAT_S = 0.5  # how often the engine's loop says it is ticking


class Answer(NamedTuple):
    ready: bool
    reason: str  # the body of /backends/NAME/ready, without its newline
    agent: str | None  # the agent-check line, or None: nothing to say yet
    until: float  # engine clock: past it, time alone may have changed the answer


class Table(NamedTuple):
    backends: dict[str, Answer]  # never changed once published
    snapshots: dict[str, BackendSnapshot]  # the same backends' snapshots, in the config's order
    pending: int  # backends not polled once yet (/readyz)


def _pending(b: BackendSnapshot) -> bool:
    """Not polled once yet, as Engine.first_round_pending counts (a disabled backend never is)."""
    return b.last_health_at is None and b.admin != "disabled"


class Board:
    """The published readiness of every backend of one engine. Made, changed and closed on the
    engine's loop; `table`, `beat` and `stalled()` may be read from any thread."""

    def __init__(self, engine: Engine, settings: Callable[[], ServeSettings] | None = None, front: Front | None = None):
        self.engine = engine
        self._settings = settings or (lambda: engine.config.serve)
        self._front = front  # a readiness front (front.py) is sent every change as it is published
        self.table = Table({}, {}, 0)
        self._pending: set[str] = set()  # what Engine.first_round_pending counts, by name
        self.beat = time.monotonic()
        self._heart: asyncio.Task | None = None
        self._unwatch = engine.watch(self._changed)
        self._changed(None)

    def start(self) -> None:
        """Start saying that the engine's loop ticks (call on that loop)."""
        self._heart = asyncio.create_task(self._heartbeat(), name="llmtop:serve-heartbeat")

    async def close(self) -> None:
        self._unwatch()
        if self._heart is not None:
            self._heart.cancel()
            await asyncio.gather(self._heart, return_exceptions=True)
            self._heart = None

    async def _heartbeat(self) -> None:
        while True:
            self.beat = time.monotonic()
            if self._front is not None:
                self._front.beat()
            await asyncio.sleep(BEAT_S)

    def stalled(self) -> float | None:
        """Seconds since the engine's loop last ticked, when that is past STALL_S; else None."""
        return stalled_for(self.beat)

    def _changed(self, b: BackendSnapshot | None) -> None:
        ready_when = self._settings().ready_when
        if b is None:  # a reload: every backend, and only those the config has now
            fleet = self.engine.snapshot().backends
            backends = {s.name: self._answer(s, ready_when) for s in fleet}
            snapshots = {s.name: s for s in fleet}
            self._pending = {s.name for s in fleet if _pending(s)}
        else:
            backends = dict(self.table.backends)
            backends[b.name] = self._answer(b, ready_when)
            snapshots = dict(self.table.snapshots)
            snapshots[b.name] = b  # a name already there keeps its place: only a reload adds one
            if _pending(b):
                self._pending.add(b.name)
            else:
                self._pending.discard(b.name)
        self.table = Table(backends, snapshots, len(self._pending))
        if self._front is not None:
            # The front's clock is time.monotonic(); `until` is the engine's clock (the same in
            # serve; a test's own clock would not be, and serve runs no front there).
            if b is None:
                self._front.table({n: Entry(a.ready, a.reason, a.until) for n, a in backends.items()}, len(self._pending))
            else:
                a = backends[b.name]
                self._front.put(b.name, Entry(a.ready, a.reason, a.until), len(self._pending))

    def _answer(self, b: BackendSnapshot, ready_when: tuple[str, ...]) -> Answer:
        r = readiness(b, ready_when)
        return Answer(r.ready, r.reason, agent_reply(b, ready_when), self.engine.breaker_moves_at(b.name))

    def current(self, name: str) -> tuple[bool, Answer | None]:
        """From any thread: (True, the published answer, None for no such backend), or (False,
        None) when time may have moved its breaker since, and the engine's loop must be asked."""
        a = self.table.backends.get(name)
        if a is not None and self.engine.clock() >= a.until:
            return False, None
        return True, a

    def backends(self) -> tuple[BackendSnapshot, ...] | None:
        """From any thread: every backend's latest snapshot, in the config's order, as
        Engine.snapshot() would give them; or None when time may have moved a breaker since (or
        the engine's loop is stuck), and the engine's loop must be asked."""
        table = self.table
        now = self.engine.clock()
        if self.stalled() is not None or any(now >= a.until for a in table.backends.values()):
            return None
        return tuple(table.snapshots.values())

    def ask(self, name: str) -> Answer | None:
        """On the engine's loop: the answer now, as the engine gives it (and so published)."""
        b = self.engine.backend_snapshot(name)
        return None if b is None else self._answer(b, self._settings().ready_when)


class BoardServer:
    """What serve's HTTP site and its agent port share: a server on a LoopThread of its own
    (loopthread.py) answering from a Board the engine publishes. start() and stop() run on the
    engine's loop; a subclass gives `_start` (listen; returns the port) and `_stop`, which run on
    the thread, and `_after_stop` for what it must release once the thread is gone."""

    def __init__(self, engine: Engine, settings: Callable[[], ServeSettings] | None, thread_name: str, front: Front | None = None):
        self.engine = engine
        self._settings = settings or (lambda: engine.config.serve)
        self._front = front
        self._thread = LoopThread(thread_name)
        self._board: Board | None = None
        self.port: int | None = None

    async def start(self) -> None:
        self._board = Board(self.engine, self._settings, self._front)
        self._board.start()
        self._thread.start()
        try:
            self.port = await self._thread.run(self._start())
        except BaseException:
            await self._thread.stop()
            await self._board.close()
            self._board = None
            raise

    async def stop(self) -> None:
        if self._board is None:
            return
        try:
            await self._thread.run(self._stop())
        finally:
            await self._thread.stop()
            await self._board.close()
            self._board = None
            self._after_stop()

    async def _start(self) -> int:
        raise NotImplementedError

    async def _stop(self) -> None:
        raise NotImplementedError

    def _after_stop(self) -> None:
        pass
