"""A thread with an asyncio loop of its own, and the bridges between it and the loop that started it (its home).

Two uses. serve answers on such a thread, its home being the engine's loop (serve/board.py). The
screen runs its local engine on one, its home being the UI's loop (local.py).

Why serve answers on a thread: on the engine's loop, a balancer's readiness question waited behind whatever the
loop was doing (reading 500 backends' metrics, building snapshots), and a stuck loop answered
nothing. On a loop of its own, it waits only for the GIL (and the CPU), which Python hands over
every `sys.getswitchinterval()` seconds to a thread that asks for it; serve asks for SWITCH_S
(the screen keeps Python's 5 ms: see local.py). Everything that reads or changes the engine runs on the engine's loop (serve's
`on_home`, the screen's `run`), so the engine stays single-threaded.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import sys
import threading
from typing import Awaitable, Callable, TypeVar

T = TypeVar("T")

# The GIL is handed over at the latest after this long (Python's default is 5 ms, the whole
# latency budget of a readiness answer). Only a thread waiting for it makes the holder let go,
# so a quiet process pays nothing for it.
SWITCH_S = 0.0005
STOP_S = 1.0


class LoopThread:
    """`start()` on the home loop; then `await thread.run(coro)` runs a coroutine on the
    thread's loop, and, from there, `await thread.on_home(fn, ...)` calls fn on the home loop."""

    def __init__(self, name: str, switch_s: float | None = SWITCH_S):
        """`switch_s`: the GIL hand-over interval the process needs at most while this thread
        runs (None: leave Python's)."""
        self.name = name
        self.switch_s = switch_s
        self.loop = asyncio.new_event_loop()
        self.home: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self.home = asyncio.get_running_loop()
        if self.switch_s is not None and sys.getswitchinterval() > self.switch_s:
            sys.setswitchinterval(self.switch_s)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
            # What is still running (an event stream between two writes) ends as under asyncio.run.
            tasks = asyncio.all_tasks(self.loop)
            for task in tasks:
                task.cancel()
            self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        finally:
            self.loop.close()

    async def run(self, coro: Awaitable[T]) -> T:
        """From the home loop: run coro on the thread's loop and wait for its result."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    async def on_home(self, fn: Callable[..., T], *args) -> T:
        """From the thread: call fn(*args) on the home loop and wait for what it returns."""
        done: concurrent.futures.Future = concurrent.futures.Future()

        def call() -> None:
            if done.set_running_or_notify_cancel():
                try:
                    done.set_result(fn(*args))
                except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread as it is
                    done.set_exception(exc)

        self.home.call_soon_threadsafe(call)
        return await asyncio.wrap_future(done)

    async def on_home_await(self, coro: Awaitable[T]) -> T:
        """From the thread: run coro on the home loop and wait for its result."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.home))

    def to_home(self, fn: Callable[..., object], *args) -> None:
        """From the thread: have the home loop call fn(*args) soon, without waiting for it."""
        try:
            self.home.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            pass  # the home loop is closed: nothing is listening any more

    def call_soon(self, fn: Callable[..., object], *args) -> None:
        """From the home loop: have the thread's loop call fn(*args) soon (dropped once it stopped)."""
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            pass  # the thread's loop is closed: whoever was waiting is gone

    async def stop(self) -> None:
        """From the home loop: stop the thread's loop (after `run` of whatever closes its
        servers) and wait, in a thread and bounded, for it to end."""
        if self._thread.is_alive():
            self.call_soon(self.loop.stop)
            await asyncio.to_thread(self._thread.join, STOP_S)
