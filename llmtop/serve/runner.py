"""`llmtop serve`: the engine headless with its HTTP site, agent port, event log and file followers, until a signal."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

from llmtop.config import Config, split_address
from llmtop.engine import Engine
from llmtop.follow import Follower
from llmtop.gpu import GpuReader
from llmtop.serve.agent import AgentServer
from llmtop.serve.front import Front
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
    sock: socket.socket | None = None,
    front: Front | None = None,
    relay_path: str | None = None,
) -> None:
    """Run until SIGTERM or SIGINT. `ready` is set once every port listens (for tests); `sock`
    and `front`: the port already bound, and the readiness front over it (run())."""
    engine = Engine(config, state, gpu=GpuReader())
    log = EventLog(engine, log_format)
    site = ServeSite(engine, listen, sock=sock, front=front, relay_path=relay_path)
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
        how = f" (readiness answered by process {front.pid})" if front is not None else ""
        engine.emit(Event(time.time(), None, "serve", f"serving {len(config.backends)} backends on {where}{how}"))
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


def bind(listen: str) -> socket.socket | None:
    """serve's port, bound and listening before anything else starts (the front shares it); None
    for a name with several addresses ("localhost": ::1 and 127.0.0.1), which serve's own site
    binds all of, answering readiness in-process."""
    host, port = split_address(listen)
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        if len({info[4] for info in infos}) > 1:
            return None
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ServeError(f"cannot listen on {listen}: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # as asyncio binds
        sock.bind(address)
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        raise ServeError(f"cannot listen on {listen}: {exc.strerror or exc}") from None
    return sock


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def _large_blocks_back_to_the_system() -> None:
    """glibc serves a large block (a /metrics body: 2.2 MB over 500 backends, written each
    second while Prometheus scrapes) from mmap, but after the first is freed it raises that
    threshold and keeps such blocks in each thread's heap: the render thread's and the front's
    grew by megabytes. A fixed threshold gives every freed large block back (glibc only)."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)
    except (OSError, AttributeError):
        pass  # not glibc: its own allocator's ways


def start_front(sock: socket.socket, relay_path: str) -> Front | None:
    """The readiness front (front.py), forked while this process runs no other thread."""
    gc.disable()
    gc.freeze()  # what both processes share stays shared: no collection writes to it
    try:
        return Front.start(sock, relay_path)
    finally:
        gc.enable()


def _private_socket() -> tuple[str, str | None]:
    """A private (0700) folder, and the path in it for serve's relay socket (front.py), None
    where no such path fits. A Unix socket's path has a limit (108 bytes on Linux): under a long
    TMPDIR (a CI runner's, a test's) the folder is made in /tmp instead."""
    private = tempfile.mkdtemp(prefix="llmtop-serve-")  # 0700: only this user reaches the relay's socket
    if len(f"{private}/serve.sock".encode()) < 100:
        return private, f"{private}/serve.sock"
    try:
        shorter = tempfile.mkdtemp(prefix="llmtop-serve-", dir="/tmp")
    except OSError:
        return private, None
    os.rmdir(private)
    return shorter, f"{shorter}/serve.sock"


def run(config: Config, config_path: Path | None, state: StateStore, *, listen: str, agent_listen: str | None, log_format: str) -> int:
    """serve() on a loop of its own that, unlike asyncio.run, does not wait at the end for threads
    still stuck in a file read or an NVML call: the exit stays within its bound. The caller ends
    the process right after (cli.entry), so such a thread cannot hold it either."""
    try:
        sock = bind(listen)
    except ServeError as exc:
        print(f"llmtop: {exc}", file=sys.stderr)
        return 2
    _large_blocks_back_to_the_system()
    private, relay_path = _private_socket()
    front = start_front(sock, relay_path) if sock is not None and relay_path is not None else None
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(
            serve(config, config_path, state, listen=listen, agent_listen=agent_listen, log_format=log_format, sock=sock, front=front,
                  relay_path=relay_path)
        )
    except ServeError as exc:
        print(f"llmtop: {exc}", file=sys.stderr)
        return 2
    finally:
        try:
            loop.run_until_complete(_cancel_the_rest())
        finally:
            asyncio.set_event_loop(None)
            loop.close()  # shuts the thread pool down without waiting for it
            if front is not None:
                front.close()
            if sock is not None:
                sock.close()
            shutil.rmtree(private, ignore_errors=True)
    return 0


async def _cancel_the_rest() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
