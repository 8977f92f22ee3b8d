"""serve's readiness front: a process of its own that owns serve's port, answers readiness from the table serve sends it, and hands every other connection to serve.

Why a process: in serve's own process a balancer's readiness question waits for the GIL behind the
engine's work (polls, probes, snapshots of 500 backends): p99 10-12 ms at 1,000 questions a second
on 2 cores, where the same answer from a process of its own takes 2 ms (benchmarks/bench_serve.py).

How it works (Linux and other POSIX systems with fork and fd passing):
- serve binds its port, then forks the front before it starts any thread (runner.run). The front
  accepts every connection and peeks at its request line without reading it (MSG_PEEK).
- A connection whose first question is `GET /readyz` or `GET /backends/NAME/ready` stays with the
  front, which answers from its copy of the board's table (board.py) in the words of answers.py,
  as serve itself would. Should a later question on that kept-alive connection be for serve, the
  front relays it to serve's Unix socket (the client's address in X-Forwarded-For).
- Every other connection (metrics, the fleet, events, admin, /livez, a name past its `until`, a
  request line that does not come at once) is passed to serve (SCM_RIGHTS) before a byte of it is
  read: serve's aiohttp reads it from its start, and sees the client's own address.
- serve sends each changed answer as the engine publishes it (Board.watch), and a heartbeat; the
  front applies what is waiting before each answer, so a drain acknowledged by the admin API is
  in the very next answer, as before.
- If serve dies, the front sees the socket close and exits. If the front dies, or stops reading,
  serve takes the port back and answers everything itself, and says so in its log.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import os
import pickle
import shutil
import signal
import socket
import sys
import threading
import time
from typing import NamedTuple

PEEK_BYTES = 4096
PEEK_S = 1.0  # a request line that has not come by then: serve's own server deals with the client
PASS_S = 30.0  # how long a connection waits for serve to take it (serve stopped, or very busy)
CHUNK = 200  # answers per message (a message must fit the socket's buffer)
CLOSE_S = 0.3  # serve's stop waits this long for the front to end by itself (the target is 2 s)
BACKLOG_BYTES = 32 << 20  # what the front may fall behind by before serve gives it up
METRICS_CHUNK = 128 << 10  # bytes of a /metrics body per message (a message must fit the socket's buffer)
METRICS_FRESH_S = 2.5  # a body older than this is not answered with (serve sends one a second while scrapes come)
_METRICS = b"M"  # a message that starts so is a piece of a /metrics body (pickles start with 0x80), then its flags:
_OPENMETRICS, _FIRST, _LAST = 1, 2, 4
SENT_S = 2.0  # how long an admin answer waits for its change to reach the front before serve gives the front up
SAFE_NAME = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~")
# Not passed on by the relay: they describe one hop (RFC 9110, 7.6.1), and aiohttp frames each side.
HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "content-length", "host"})
FORWARDED_FOR = "X-Forwarded-For"
MAX_REQUEST_BYTES = 64 * 1024  # serve's bound on a request's body (admin requests carry none worth more), and the front's


class Entry(NamedTuple):
    ready: bool
    reason: str
    until: float  # time.monotonic(): past it, only the engine can answer


class Front:
    """serve's side of the front: the child's pid and the socket to it. Sends come from the
    engine's loop; the connections the front hands over are read on serve's HTTP thread."""

    def __init__(self, pid: int | None, ctl: socket.socket):
        self.pid = pid  # None: not a child of this process (a test runs the answerer in its own loop)
        self.ctl = ctl
        self.lost = False
        self._backlog: collections.deque[list] = collections.deque()  # messages (their pieces), sent once the front reads again
        self._backlog_bytes = 0
        self._waiting: list[asyncio.Future[None]] = []  # sent()'s callers, woken when the backlog is empty
        self.scraped: tuple[float, bool] | None = None  # (time.monotonic(), OpenMetrics?) of the last scrape the front answered

    @classmethod
    def start(cls, listening: socket.socket, relay_path: str) -> Front | None:
        """Fork the front over a bound, listening socket; None where it cannot be (another
        thread already runs, so a fork could copy a lock held mid-call; no fork or fd passing)."""
        if not hasattr(os, "fork") or not hasattr(socket, "send_fds") or threading.active_count() > 1:
            return None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:  # the front
            code = 1
            try:
                ours.close()
                _child(listening, theirs, relay_path)
                code = 0
            except BaseException as exc:  # noqa: BLE001 - serve takes the port back, and logs that
                print(f"llmtop: the readiness front stopped: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            finally:
                os._exit(code)
        theirs.close()
        ours.setblocking(False)
        return cls(pid, ours)

    # -- what serve sends (engine's loop) ------------------------------------------------------

    def send(self, message: tuple) -> None:
        """One message to the front, in order; what its socket cannot take now waits for it (on
        this loop), and a front that falls BACKLOG_BYTES behind is given up on."""
        if not self.lost:
            self._put([pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)])

    def _put(self, pieces: list) -> None:
        """One message (its pieces, sent as one), or into the backlog behind those before it."""
        if not self._backlog:
            try:
                self.ctl.sendmsg(pieces)
                return
            except (BlockingIOError, InterruptedError):
                asyncio.get_running_loop().add_writer(self.ctl.fileno(), self._flush)
            except OSError:  # gone
                self.give_up()
                return
        self._backlog.append(pieces)
        self._backlog_bytes += sum(len(piece) for piece in pieces)
        if self._backlog_bytes > BACKLOG_BYTES:
            self.give_up()

    def _flush(self) -> None:
        while self._backlog and not self.lost:
            try:
                self.ctl.sendmsg(self._backlog[0])
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.give_up()
                break
            self._backlog_bytes -= sum(len(piece) for piece in self._backlog.popleft())
        asyncio.get_running_loop().remove_writer(self.ctl.fileno())
        self._wake()

    async def sent(self, within: float | None = None) -> None:
        """Return once everything sent so far is in the front's socket, so that the front reads it
        before it answers any question asked after this returns (it reads its socket first, see
        _Answerer). What an admin action changed is then what the next readiness answer says. A
        front that has not taken it within `within` (SENT_S) is given up on: serve answers itself."""
        if not self._backlog or self.lost:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), SENT_S if within is None else within)
        except asyncio.TimeoutError:
            self.give_up()

    def _wake(self) -> None:
        if self._backlog and not self.lost:
            return
        for waiter in self._waiting:
            if not waiter.done():
                waiter.set_result(None)
        self._waiting.clear()

    def table(self, entries: dict[str, Entry], pending: int) -> None:
        items = list(entries.items())
        for i in range(0, max(1, len(items)), CHUNK):
            self.send(("full", items[i : i + CHUNK], pending, i + CHUNK >= len(items)))

    def put(self, name: str, entry: Entry, pending: int) -> None:
        self.send(("put", [(name, entry)], pending))

    def beat(self) -> None:
        self.send(("beat",))

    def metrics(self, openmetrics: bool, body: bytes) -> None:
        """A /metrics body for the front to answer scrapes with (serve/http.py sends one a second
        while scrapes come), in raw messages of METRICS_CHUNK bytes, not pickled and not copied.
        Skipped while anything is still on its way: a front that reads slowly holds up one body
        at most, and is not given up on for bodies it would not have used."""
        if self.lost or self._backlog:
            return
        view, size = memoryview(body), len(body)
        for i in range(0, max(1, size), METRICS_CHUNK):
            flags = (_OPENMETRICS if openmetrics else 0) | (_FIRST if i == 0 else 0) | (_LAST if i + METRICS_CHUNK >= size else 0)
            self._put([_METRICS + bytes((flags,)), view[i : i + METRICS_CHUNK]])

    def give_up(self) -> None:
        """Stop the front: serve answers on its port itself from now on (see ServeSite)."""
        if self.lost:
            return
        self.lost = True
        self._backlog.clear()
        self._wake()
        try:
            self.ctl.shutdown(socket.SHUT_RDWR)  # the HTTP thread's reader sees the end
        except OSError:
            pass
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGKILL)  # it ignores SIGTERM (_child)
            except ProcessLookupError:
                pass

    # -- what the front hands over (serve's HTTP thread) ---------------------------------------

    def receive(self) -> list[socket.socket] | None:
        """The connections waiting to be taken, or None once the front is gone."""
        taken = []
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(self.ctl, 16, 16)
            except (BlockingIOError, InterruptedError):
                return taken
            except OSError:
                data, fds = b"", []
            if not data and not fds:
                self.lost = True
                return taken or None
            if data[:1] == b"s":  # the front answered a scrape: keep its body coming (serve/http.py)
                self.scraped = (time.monotonic(), data[1:2] == b"1")
            taken += [socket.socket(fileno=fd) for fd in fds]

    def close(self) -> None:
        """End the front and reap it: it exits once it reads the end of this socket (answers it
        is writing go out), and is killed if it has not within CLOSE_S."""
        self.lost = True
        self._backlog.clear()
        with contextlib.suppress(OSError):
            self.ctl.shutdown(socket.SHUT_RDWR)
        self.ctl.close()
        if self.pid is None:
            return
        deadline = time.monotonic() + CLOSE_S
        while time.monotonic() < deadline:
            try:
                if os.waitpid(self.pid, os.WNOHANG)[0]:
                    return
            except ChildProcessError:
                return
            time.sleep(0.005)
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)

    def reap(self) -> None:
        """Collect an ended front now rather than at serve's exit (no zombie meanwhile)."""
        if self.pid is not None:
            try:
                os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                pass


# -- the front's own process ---------------------------------------------------------------------


def _child(listening: socket.socket, ctl: socket.socket, relay_path: str) -> None:
    # Ctrl-C in serve's terminal, and systemd's stop, reach the whole process group: serve decides
    # when this ends (by closing its socket), so the answers go on while serve stops.
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(_Answerer(listening, ctl, relay_path).run())
    finally:
        loop.close()
        # serve's end is this one's; a serve killed outright (SIGKILL, the OOM killer) cannot
        # remove the private folder of its relay socket, so whichever of the two ends last does.
        shutil.rmtree(os.path.dirname(relay_path), ignore_errors=True)


class _Answerer:
    def __init__(self, listening: socket.socket, ctl: socket.socket, relay_path: str):
        # Imported here: only the front's own process needs them (and they were loaded before the fork).
        import aiohttp
        from aiohttp import web

        from llmtop.serve import answers, exporter

        self.aiohttp, self.web, self.answers, self.exporter = aiohttp, web, answers, exporter
        self.relay_path = relay_path
        self.listening = listening
        self.ctl = ctl
        self.entries: dict[str, Entry] = {}
        self.staged: dict[str, Entry] = {}
        self.pending = 0
        self.synced = False  # a whole table has come
        self.waiting: list[asyncio.Future] = []  # connections waiting for room on the socket to serve
        self.beat = time.monotonic()
        self.gone = asyncio.Event()
        self.bodies: dict[bool, tuple[float, list[memoryview]]] = {}  # OpenMetrics? -> (when it came, the /metrics body's pieces)
        self.body_parts: dict[bool, list[memoryview]] = {}  # the pieces of a body still coming

    async def run(self) -> None:
        self.server = self.web.Server(self.handle, access_log=None, request_factory=self._request)
        self.session = self.aiohttp.ClientSession(
            connector=self.aiohttp.UnixConnector(path=self.relay_path), auto_decompress=False, timeout=self.aiohttp.ClientTimeout(total=None)
        )
        loop = asyncio.get_running_loop()
        self.listening.setblocking(False)
        self.ctl.setblocking(False)
        loop.add_reader(self.ctl.fileno(), self.read_ctl)
        accepting = asyncio.ensure_future(self.accept())
        try:
            await self.gone.wait()
        finally:
            accepting.cancel()
            await self.session.close()

    # -- serve's messages --------------------------------------------------------------------

    def read_ctl(self) -> None:
        while True:
            try:
                data = self.ctl.recv(1 << 20)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:  # serve is gone (or gave this up): so is the front
                asyncio.get_running_loop().remove_reader(self.ctl.fileno())
                self.gone.set()
                return
            if data[:1] == _METRICS:
                self.metrics_part(data)
            else:
                self.apply(pickle.loads(data))

    def metrics_part(self, data: bytes) -> None:
        """A piece of a /metrics body, kept as it came (no join: the answer writes the pieces);
        serve sends a body's pieces in order and whole (Front.metrics). Written on serve's render
        thread: no sign that the engine's loop ticks."""
        flags = data[1]
        openmetrics = bool(flags & _OPENMETRICS)
        if flags & _FIRST:
            self.body_parts[openmetrics] = []
        self.body_parts[openmetrics].append(memoryview(data)[2:])
        if flags & _LAST:
            self.bodies[openmetrics] = (time.monotonic(), self.body_parts.pop(openmetrics))

    def apply(self, message: tuple) -> None:
        self.beat = time.monotonic()  # every message says that the engine's loop ticks
        kind = message[0]
        if kind == "put":
            self.entries.update(message[1])
            self.pending = message[2]
        elif kind == "full":
            self.staged.update(message[1])
            if message[3]:
                self.entries, self.staged, self.pending, self.synced = self.staged, {}, message[2], True

    # -- connections -------------------------------------------------------------------------

    async def accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(self.listening)
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    await asyncio.sleep(0.1)  # out of descriptors: serve's own limits apply soon
                    continue
                raise
            loop.create_task(self.route(conn))

    async def route(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        line = await _peek_line(conn)
        if line == b"":
            conn.close()
            return
        self.read_ctl()  # what serve sent before this question was asked
        if line is not None and self.mine(line):
            await asyncio.get_running_loop().connect_accepted_socket(self.server, conn)
            return
        try:
            await self.pass_on(conn)
        finally:
            conn.close()

    async def pass_on(self, conn: socket.socket) -> None:
        """Hand a connection to serve; while serve is slow to take them (its socket full), wait
        for room, as the listen backlog would have kept it waiting, up to PASS_S."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + PASS_S
        while True:
            try:
                socket.send_fds(self.ctl, [b"c"], [conn.fileno()])
                return
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                return  # serve is gone: so is this front, in a moment
            room = loop.create_future()
            self.waiting.append(room)
            if len(self.waiting) == 1:  # one watch for all: add_writer keeps only the last callback
                loop.add_writer(self.ctl.fileno(), self.room)
            try:
                await asyncio.wait_for(room, max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                return  # serve has not taken a connection for PASS_S: it is stuck, and this one goes

    def room(self) -> None:
        """serve took some: every waiting connection tries again."""
        asyncio.get_running_loop().remove_writer(self.ctl.fileno())
        waiting, self.waiting = self.waiting, []
        for room in waiting:
            if not room.done():
                room.set_result(None)

    def mine(self, line: bytes) -> bool:
        """Whether this request line is a readiness question the front answers as serve would."""
        parts = line.split(b" ")
        return len(parts) == 3 and self.answers_for(parts[0].decode("latin-1"), parts[1].split(b"?", 1)[0].decode("latin-1"))

    def answers_for(self, method: str, path: str) -> bool:
        """`path` as sent (not decoded): a name with escapes is left to serve's router."""
        if method not in ("GET", "HEAD"):
            return False
        if path == "/metrics":
            # Always the front's: a scraper keeps its connection, and one handed to serve would
            # stay serve's for every later scrape. Without a fresh body, it is relayed (handle).
            return True
        if not self.synced:
            return False
        if path == "/readyz":
            return True
        if not (path.startswith("/backends/") and path.endswith("/ready")):
            return False
        name = path[len("/backends/") : -len("/ready")]
        if not name or not SAFE_NAME.issuperset(name):
            return False  # escapes and the like: serve's router decodes them
        entry = self.entries.get(name)
        return entry is None or time.monotonic() < entry.until

    def fresh(self, openmetrics: bool) -> list[memoryview] | None:
        held = self.bodies.get(openmetrics)
        return held[1] if held is not None and time.monotonic() - held[0] <= METRICS_FRESH_S else None

    async def handle(self, request):
        self.read_ctl()
        if not self.answers_for(request.method, request.raw_path.split("?", 1)[0]):
            return await self.relay(request)
        if request.path == "/metrics":
            openmetrics = self.exporter.wants_openmetrics(request.headers.get("Accept", ""))
            body = self.fresh(openmetrics)
            if body is None:  # none yet (the first scrape), or too old, or of the other format
                return await self.relay(request)
            try:
                self.ctl.send(b"s1" if openmetrics else b"s0")  # serve keeps the bodies coming while scrapes do
            except OSError:
                pass  # a full socket: the next scrape says it
            response = self.web.StreamResponse(headers={"Content-Type": self.exporter.content_type(openmetrics)})
            response.content_length = sum(len(piece) for piece in body)
            await response.prepare(request)
            for piece in body if request.method != "HEAD" else ():  # HEAD: the head alone
                await response.write(piece)
            await response.write_eof()
            return response
        stalled = self.answers.stalled_for(self.beat)
        if request.path == "/readyz":
            status, text = self.answers.readyz(stalled, self.pending)
        else:
            name = request.path[len("/backends/") : -len("/ready")]
            entry = self.entries.get(name)
            status, text = self.answers.backend_ready(stalled, None if entry is None else (entry.ready, entry.reason))
        return self.web.Response(status=status, text=text, content_type="text/plain")

    def _request(self, message, payload, protocol, writer, task):
        """aiohttp's request, bounded as serve's own (its default would read 1 MiB of a body to
        relay, per connection, before serve refused it)."""
        return self.web.BaseRequest(message, payload, protocol, writer, task, asyncio.get_running_loop(), client_max_size=MAX_REQUEST_BYTES)

    async def relay(self, request):
        """A question for serve on a connection the front keeps (its first was a readiness
        question): asked of serve's Unix socket, its answer streamed back as it comes (an event
        stream too). Rare: balancers ask readiness alone, and scrapers never ask it."""
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP and k.lower() != FORWARDED_FOR.lower()]
        headers.append((FORWARDED_FOR, request.remote or ""))
        body = await request.read() if request.body_exists else None
        response = None
        try:
            async with self.session.request(
                request.method, f"http://serve{request.rel_url}", headers=headers, data=body, allow_redirects=False
            ) as upstream:
                response = self.web.StreamResponse(status=upstream.status, reason=upstream.reason)
                for k, v in upstream.headers.items():
                    if k.lower() not in HOP:
                        response.headers.add(k, v)
                if upstream.content_length is not None:
                    response.content_length = upstream.content_length
                await response.prepare(request)
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
                return response
        except (self.aiohttp.ClientError, OSError):
            if response is not None and response.prepared:  # part of serve's answer went out: end it there
                if request.transport is not None:
                    request.transport.close()
                return response
            response = self.web.Response(status=502, text="llmtop serve did not answer\n", content_type="text/plain")
            response.force_close()
            return response


async def _peek_line(conn: socket.socket) -> bytes | None:
    """The request line, peeked (left unread for whoever takes the connection); None when it
    does not come whole within PEEK_S."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + PEEK_S
    while True:
        try:
            data = conn.recv(PEEK_BYTES, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            data = None
        except OSError:
            return None
        if data == b"":
            return b""  # closed before asking anything
        if data is not None:
            # Empty lines before the request line are allowed (RFC 9112, 2.2); serve reads past them.
            line, found, _ = data.lstrip(b"\r\n").partition(b"\r\n")
            # Peeking again would find the same bytes at once: a line not whole in what came
            # is left to serve, which reads as a server should.
            return line if found else None
        ready = loop.create_future()
        loop.add_reader(conn.fileno(), lambda: ready.done() or ready.set_result(None))
        try:
            await asyncio.wait_for(ready, max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:
            return None
        finally:
            loop.remove_reader(conn.fileno())

