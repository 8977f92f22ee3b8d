"""The screen's own engine on a thread and event loop of its own: the UI reads the snapshots it publishes and asks it to act, as it reads and asks a remote agent.

Why: on the UI's loop, a key waited behind whatever the engine was doing (a round of polls, a
large answer being parsed), and a probe's tokens were read late while the screen drew. Now each
has its own loop. They share the GIL, which Python hands to a waiting thread every 5 ms, its
default: at serve's 0.5 ms (loopthread.SWITCH_S) a key took longer (key-to-screen p95 71-89 ms
against 59-63 ms at 300 backends, benchmarks/bench_tui.py), as the UI's drawing was cut into
slices. A probe's figures stay true while its thread waits: its tokens are timed by the
kernel's receive stamps (kernelclock.py), not by when they are read, and a first token read
only together with the next is not timed at all and the probe retried (probe.StreamMeter).

The engine stays single-threaded: everything that reads or changes it runs on its loop (`run`,
`call`, `call_soon`). The UI reads only what that loop published: one immutable FleetSnapshot,
swapped in whole every PUBLISH_S, and at once after every action asked through `run` or `call`,
so that what the UI reads after an action returns already shows it (`call_soon`'s effect shows
with the next publication). A loop that publishes nothing for STALL_S is said to be stalled
(`stalled`): its figures are not current, and the screen says so.

Until `start()` (a screen that is not live: snapshot tests), it is a plain view of the engine on
the caller's own loop.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable, NamedTuple, TypeVar

from llmtop.config import Settings
from llmtop.engine import Engine
from llmtop.loopthread import LoopThread
from llmtop.snapshot import FleetSnapshot

T = TypeVar("T")

# A change reaches the UI within this (plus the UI's own tick). Publishing 300 backends costs
# about 0.1 ms when nothing changed: their snapshots are cached (tracker.py).
PUBLISH_S = 0.1
CLOSE_S = 2.0  # closing the engine (its clients, NVML) past this is abandoned: quitting must not wait on it
STALL_S = 5.0  # no publication for this long: the engine's loop is stuck (as serve's board.STALL_S)


class Published(NamedTuple):
    fleet: FleetSnapshot
    pending: int  # Engine.first_round_pending() at the same moment


class LocalEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._thread: LoopThread | None = None
        self._published: Published | None = None  # replaced whole on the engine's loop, read anywhere
        self._published_at = 0.0  # time.monotonic() of that
        self._publisher: asyncio.Task | None = None
        self._stopped = False
        self.error: str | None = None  # why the last publication failed (a bug: the loop goes on)

    # -- what the UI reads (any thread) -----------------------------------------------------

    def snapshot(self) -> FleetSnapshot:
        published = self._published
        return self.engine.snapshot() if published is None else published.fleet

    def first_round_pending(self) -> int:
        published = self._published
        return self.engine.first_round_pending() if published is None else published.pending

    def stalled(self) -> float | None:
        """Seconds since the engine last published, once that is over STALL_S; else None."""
        if self._thread is None:
            return None
        quiet = time.monotonic() - self._published_at
        return quiet if quiet > STALL_S else None

    @property
    def settings(self) -> Settings:
        return self.engine.config.settings  # one attribute read: a reload swaps the whole config

    # -- lifecycle (from the UI's loop) -----------------------------------------------------

    async def start(self) -> None:
        """Open the engine and start its live loop on a thread of its own."""
        thread = LoopThread("llmtop-engine", switch_s=None)
        thread.start()
        try:
            await thread.run(self._open())
        except BaseException:
            await thread.stop()
            raise
        self._thread = thread

    async def _open(self) -> None:
        await self.engine.open()
        self.engine.start()
        self._publish()  # a failure here is a failure to start
        self._publisher = asyncio.create_task(self._publish_every(), name="llmtop:publish")

    async def stop(self, *first: Callable[[], Awaitable[Any]]) -> None:
        """Run `first` (what else lives on the engine's loop: serve's servers) and close the
        engine, on its loop, then end the thread, each bounded (CLOSE_S, loopthread.STOP_S): a
        loop stuck in a long call must not keep the operator from quitting. The last snapshot
        stays readable; what is asked after this is dropped (`call_soon`) or refused (`run`)."""
        thread, self._thread = self._thread, None
        self._stopped = True
        if thread is None:
            return
        try:
            await asyncio.wait_for(thread.run(self._close(first)), CLOSE_S)
        except asyncio.TimeoutError:
            pass
        finally:
            await thread.stop()

    async def _close(self, first: tuple[Callable[[], Awaitable[Any]], ...]) -> None:
        if self._publisher is not None:
            self._publisher.cancel()
        try:  # at once, and within half the bound: a server slow or failing to stop must not leave
            # the engine's clients open, nor the engine's own close without its share of the time
            await asyncio.wait_for(asyncio.gather(*(stop() for stop in first), return_exceptions=True), CLOSE_S / 2)
        except asyncio.TimeoutError:
            pass
        await self.engine.close()

    # -- acting (from the UI's loop) --------------------------------------------------------

    async def run(self, action: Callable[..., Awaitable[T]], *args: Any) -> T:
        """await action(*args) on the engine's loop; what it returns or raises. Its effect is
        published before this returns."""
        thread = self._thread
        if thread is None:
            if self._stopped:
                raise RuntimeError("the engine has stopped")
            return await action(*args)
        return await thread.run(self._then_publish(action, args))

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args), a plain function, on the engine's loop; as `run`."""

        async def plain() -> T:
            return fn(*args)

        return await self.run(plain)

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """fn(*args) on the engine's loop soon, without waiting (its effect shows with the next
        publication); dropped once the engine stopped."""
        thread = self._thread
        if thread is not None:
            thread.call_soon(fn, *args)
        elif not self._stopped:
            fn(*args)

    # -- on the engine's loop ---------------------------------------------------------------

    async def _then_publish(self, action: Callable[..., Awaitable[T]], args: tuple) -> T:
        try:
            return await action(*args)
        finally:
            self._try_publish()  # a failure here must not mask what the action did

    def _publish(self) -> None:
        self._published = Published(self.engine.snapshot(), self.engine.first_round_pending())
        self._published_at = time.monotonic()

    def _try_publish(self) -> None:
        try:
            self._publish()
        except Exception as exc:  # noqa: BLE001 - a bug; said on screen (stalled), and tried again
            self.error = f"{type(exc).__name__}: {exc}"
        else:
            self.error = None

    async def _publish_every(self) -> None:
        while True:
            await asyncio.sleep(PUBLISH_S)
            self._try_publish()
