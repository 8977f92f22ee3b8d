"""`llmtop serve`: the engine headless with its HTTP site, agent port, event log and file followers, until a signal."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path

from llmtop.config import Config
from llmtop.engine import Engine
from llmtop.follow import Follower
from llmtop.gpu import GpuReader
from llmtop.serve.agent import AgentServer
from llmtop.serve.http import ServeSite
from llmtop.serve.log import EventLog
from llmtop.snapshot import Event
from llmtop.state import StateStore

STOP_S = 1.5  # SIGTERM to exit: what is still closing after this is abandoned (the target is 2 s)


def host_of(address: str | None) -> str:
    return (address or "").rpartition(":")[0]


class ServeError(Exception):
    """serve cannot start (a port taken, a bad address); one line for the operator."""


async def serve(
    config: Config,
    config_path: Path | None,
    state: StateStore,
    *,
    listen: str,
    agent_listen: str | None,
    log_format: str,
    ready: asyncio.Event | None = None,
) -> None:
    """Run until SIGTERM or SIGINT. `ready` is set once every port listens (for tests)."""
    engine = Engine(config, state, gpu=GpuReader())
    log = EventLog(engine, log_format)
    site = ServeSite(engine, listen)
    agent = AgentServer(engine, agent_listen) if agent_listen else None
    follower = Follower(engine, config_path)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if hasattr(signal, "SIGHUP"):  # a daemon's SIGHUP: reload the config
        loop.add_signal_handler(signal.SIGHUP, follower.reload, "SIGHUP")
    following = None
    try:
        await engine.open()
        try:
            await site.start()
            if agent is not None:
                await agent.start()
        except OSError as exc:
            raise ServeError(exc.strerror or str(exc)) from None
        engine.start()
        following = asyncio.create_task(follower.run(), name="llmtop:follow")
        host = listen.rpartition(":")[0]
        where = f"http://{host}:{site.port}" + (f", HAProxy agent-check on {host_of(agent_listen)}:{agent.port}" if agent else "")
        engine.emit(Event(time.time(), None, "serve", f"serving {len(config.backends)} backends on {where}"))
        if ready is not None:
            ready.set()
        await stop.wait()
        engine.emit(Event(time.time(), None, "serve", "stopping (signal)"))
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT) + ((signal.SIGHUP,) if hasattr(signal, "SIGHUP") else ()):
            loop.remove_signal_handler(sig)
        if following is not None:
            following.cancel()
        # Everything closes at once, bounded: a stuck client or a stalled NVML call must not
        # hold the exit past STOP_S.
        closing = [site.stop(), engine.close()] + ([agent.stop()] if agent else [])
        try:
            await asyncio.wait_for(asyncio.gather(*closing, return_exceptions=True), STOP_S)
        except asyncio.TimeoutError:
            pass
        log.close()


def run(config: Config, config_path: Path | None, state: StateStore, *, listen: str, agent_listen: str | None, log_format: str) -> int:
    """serve() on a loop of its own that, unlike asyncio.run, does not wait at the end for threads
    still stuck in a file read or an NVML call: the exit stays within its bound. The caller ends
    the process right after (cli.entry), so such a thread cannot hold it either."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(serve(config, config_path, state, listen=listen, agent_listen=agent_listen, log_format=log_format))
    except ServeError as exc:
        print(f"llmtop: {exc}", file=sys.stderr)
        return 2
    finally:
        try:
            loop.run_until_complete(_cancel_the_rest())
        finally:
            asyncio.set_event_loop(None)
            loop.close()  # shuts the thread pool down without waiting for it
    return 0


async def _cancel_the_rest() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
