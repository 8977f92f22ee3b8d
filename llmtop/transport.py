"""A lean HTTP/1.1 transport under httpx: asyncio streams for I/O, h11 for the protocol.

httpx's default transport (httpcore over anyio) costs about 0.3 ms of CPU per request on top of
the 0.1 ms the bytes and the parsing themselves take. A monitor polling 500 backends makes
1,500 requests and streams 500 probes a round, all on one event loop whose punctuality is what
makes a TTFT true: measured on 2 cores, that overhead alone kept `llmtop check` of 500 backends
CPU-bound for a second and a half. httpx stays the API (requests, responses, errors, httpx-sse);
only the wire underneath is this module.

On Linux, plain-HTTP connections are read straight off the socket with recvmsg and
SO_TIMESTAMPNS, so every read carries the time the kernel received its bytes: a TTFT and a
health latency end when the answer reached this machine, not when a busy event loop read it.
(When the loop is late by more than a token gap, several tokens come in one read, stamped with
the last one's arrival: still no later than the loop's own stamp.) TLS and other platforms go
through asyncio streams and are stamped when read.

It does what a fleet monitor needs and no more: one backend's origin per transport, a few
keep-alive connections, TLS with the caller's context, no proxies (the engine sets
trust_env=False), no HTTP/2, no redirects (the engine does not follow them). Whole-request
deadlines are the caller's (providers/base.py bounds every request end to end); the transport
bounds connecting, and each read when the client sets a read timeout.

Bodies are decoded here, never by httpx: a gzip or deflate body is inflated a bounded piece at a
time (a 64 KiB "gzip bomb" chunk expands to 64 MiB in one call to httpx's decoder, before any
cap could look at it), so every cap a caller puts on a body counts decoded bytes. llmtop asks for
`identity`; a coding it did not ask for and cannot bound (br, zstd) is refused.

Each response carries its request's phases (`llmtop.timings`): the time to connect, the TLS
handshake, when the request's last byte was written and when the first byte of the answer
arrived, like curl's -w timings. A TTFT starts at the write, so connecting is never counted as
time to first token.
"""

from __future__ import annotations

import asyncio
import functools
import http.cookiejar
import ipaddress
import os
import socket
import ssl
import sys
import time
import zlib
from asyncio import staggered  # the stdlib's happy-eyeballs race, as asyncio's own connections use
from collections import deque
from dataclasses import dataclass
from typing import AsyncIterator

import h11
import httpx

from llmtop import kernelclock

READ_SIZE = 64 * 1024
DECODED_PIECE = 64 * 1024  # the most one step of inflating a compressed body may produce


# The kernel's receive time of each read (kernelclock.py); None where there is none.
SO_TIMESTAMPNS = kernelclock.SO_TIMESTAMPNS


class _StreamIO:
    """Bytes over asyncio streams: TLS, and plain TCP where the kernel stamps nothing."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self.reads = 0
        self.last_read_at = 0.0

    async def read(self) -> bytes:
        data = await self.reader.read(READ_SIZE)
        if data:
            self.reads += 1
            self.last_read_at = time.perf_counter()
        return data

    def arrival(self) -> float:
        return time.perf_counter()

    def read_info(self) -> tuple[int, float, float]:
        """(sequence number of the latest read, when its bytes arrived, when it was read): here
        they arrived when read, as far as this process can tell."""
        return self.reads, self.last_read_at, self.last_read_at

    async def write(self, data: bytes) -> float:
        """Send data; the perf_counter() time it was handed to the kernel (or queued): taken just
        before, since the send itself may wake the server, which may then run before this does."""
        sent = time.perf_counter()
        self.writer.write(data)  # asyncio reports a failed write on the next read, not here
        return sent

    def usable(self) -> bool:
        # StreamReader has no public peek; at_eof() stays False while bytes wait unread.
        return not self.writer.is_closing() and not self.reader.at_eof() and not getattr(self.reader, "_buffer", b"")

    def close(self) -> None:
        if self.writer.transport.get_write_buffer_size():
            # A body still going out to a server that stopped reading: a graceful close would
            # wait for it forever, and the request with it.
            self.writer.transport.abort()
        else:
            self.writer.close()


class _RawIO:
    """Plain TCP read straight off the socket with recvmsg, so every read carries the time the
    kernel received its bytes. A TTFT then ends when the first token reached this machine, not
    when a busy event loop got round to reading it: the figure stays true under load.

    The socket stays registered with the loop while it is read, and the loop's callback does the
    recvmsg itself and hands the read to the waiting task: a probe's stream is read a token at a
    time, and registering and unregistering the socket around each read (two epoll_ctl calls and
    a failed recvmsg per token) was a fifth of the CPU a probe cost. At most one read is held for
    a task that is not waiting; while it is, the socket is not watched (no busy loop on a
    readable socket nobody reads, and no buffering of what a server sends unasked)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.fd = sock.fileno()
        self.last_arrival: float | None = None  # perf_counter() time of the last read's bytes
        self.last_read_at = 0.0  # perf_counter() time the last read returned
        self.reads = 0
        self.sent_at = 0.0  # perf_counter() time the last request went out
        self.closed = False
        self._watching = False  # registered with the loop as a reader
        self._held: tuple[bytes, float, float] | OSError | None = None  # a read nobody has taken yet
        self._read_waiter: asyncio.Future | None = None
        self._write_waiter: asyncio.Future | None = None

    def _on_readable(self) -> None:
        if self._held is not None or self.closed:
            self._unwatch()  # the held read is not taken yet: watch again once it is
            return
        try:
            data, ancillary, _flags, _addr = self.sock.recvmsg(READ_SIZE, kernelclock.ANCILLARY_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._held = exc
            self._unwatch()
        else:
            if data:
                # Never before the request went out: a wall clock stepped forward between the
                # kernel's stamp and this read would otherwise make an answer older than its question.
                self._held = (data, max(kernelclock.kernel_time(ancillary), self.sent_at), time.perf_counter())
            else:
                self._held = (b"", 0.0, 0.0)
                self._unwatch()  # the end of the stream: nothing more will come
        waiter = self._read_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _unwatch(self) -> None:
        if self._watching:
            self._watching = False
            self.loop.remove_reader(self.fd)

    async def read(self) -> bytes:
        while True:
            if self.closed:
                raise ConnectionAbortedError(103, "Software caused connection abort")
            held = self._held
            if held is not None:
                self._held = None
                if isinstance(held, OSError):
                    raise held
                data, arrived, read_at = held
                if data:
                    self.last_arrival, self.last_read_at = arrived, read_at
                    self.reads += 1
                return data
            if not self._watching:
                self._watching = True
                self.loop.add_reader(self.fd, self._on_readable)
            waiter = self._read_waiter = self.loop.create_future()
            try:
                await waiter
            finally:
                self._read_waiter = None

    def arrival(self) -> float:
        return self.last_arrival if self.last_arrival is not None else time.perf_counter()

    def read_info(self) -> tuple[int, float, float]:
        """(sequence number of the latest read, when the kernel received its last byte, when it was read)."""
        return self.reads, self.arrival(), self.last_read_at

    async def _writable(self) -> None:
        """Wait until the socket can be written. Our own waiter, not loop.sock_sendall and the
        like: close() must unregister it, or the selector keeps the fd number for whichever
        socket gets it next."""
        waiter = self._write_waiter = self.loop.create_future()
        self.loop.add_writer(self.fd, _wake, waiter)
        try:
            await waiter
        finally:
            self._write_waiter = None
            if not self.closed:
                self.loop.remove_writer(self.fd)

    async def write(self, data: bytes) -> float:
        """Send data; the perf_counter() time its last part went to the kernel, read just before
        that send(): the send wakes the server, and on a busy machine the server may run (and
        answer) before this process is back from the system call, so a stamp taken after it
        would be late and every TTFT short."""
        view = memoryview(data)
        while view:
            if self.closed:
                raise ConnectionAbortedError(103, "Software caused connection abort")
            self.sent_at = time.perf_counter()  # no answer can arrive before this
            try:
                view = view[self.sock.send(view) :]
            except (BlockingIOError, InterruptedError):
                await self._writable()
        return self.sent_at

    def usable(self) -> bool:
        """Idle and untouched: nothing to read (not even the end of the stream)."""
        if self.closed or self._held is not None:
            return False
        try:
            self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        return False  # bytes waiting, or b"": the server closed it

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.loop.remove_reader(self.fd)
        self.loop.remove_writer(self.fd)
        for waiter in (self._read_waiter, self._write_waiter):
            if waiter is not None and not waiter.done():
                waiter.set_result(None)  # the read or write wakes, sees `closed`, and fails
        self.sock.close()


def _wake(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)


async def _open_raw(host: str, port: int) -> socket.socket:
    """A connected non-blocking TCP socket with receive timestamps on.

    A host name with several addresses (IPv6 and IPv4, round-robin DNS) is raced the way
    asyncio's own connections are: the next address starts 250 ms after the one before, which
    goes on trying, and the first to connect wins."""
    loop = asyncio.get_running_loop()
    if _is_ip(host):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        infos = [(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, port))]
    else:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    if not infos:
        raise OSError(f"no address for {host}")
    if len(infos) == 1:
        return await _connect_one(infos[0])
    winner, _index, errors = await staggered.staggered_race([functools.partial(_connect_one, i) for i in infos], 0.25)
    if winner is None:
        raise next((e for e in reversed(errors) if isinstance(e, OSError)), OSError(f"cannot connect to {host}"))
    return winner


async def _connect_one(info) -> socket.socket:
    family, kind, proto, _name, address = info
    sock = socket.socket(family, kind, proto)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if SO_TIMESTAMPNS is not None:
            kernelclock.enable(sock)
        await asyncio.get_running_loop().sock_connect(sock, address)
    except BaseException:  # also a cancelled loser of the race
        sock.close()
        raise
    return sock


@dataclass
class RequestTimings:
    """The phases of one request, like curl's -w timings. Times are perf_counter() readings;
    arrivals are the kernel's receive time where the transport reads it (_RawIO)."""

    connect_s: float | None  # TCP connect; None on a reused keep-alive connection
    tls_s: float | None  # TLS handshake; None for plain HTTP or a reused connection
    sent_at: float  # the request's last byte went to the kernel: where a TTFT starts
    first_byte_at: float | None = None  # the first byte of the answer arrived

    @property
    def ttfb_s(self) -> float | None:
        return None if self.first_byte_at is None else self.first_byte_at - self.sent_at


class _Connection:
    __slots__ = ("io", "h11", "reused", "answered", "connect_s", "tls_s", "timings")

    def __init__(self, io: _StreamIO | _RawIO):
        self.io = io
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=64 * 1024)
        self.reused = False
        self.answered = False  # a byte of the current response has arrived
        self.connect_s: float | None = None  # how this connection was opened, for its first request
        self.tls_s: float | None = None
        self.timings: RequestTimings | None = None  # the current request's

    def usable(self) -> bool:
        """An idle keep-alive connection the server has not closed, nor written to meanwhile: a
        proxy's "408 Request Timeout" sent before it hangs up must not pass for the next answer."""
        return self.io.usable()

    def close(self) -> None:
        self.io.close()


def _timeout(request: httpx.Request, kind: str) -> float | None:
    return (request.extensions.get("timeout") or {}).get(kind)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _reason(exc: OSError) -> str:
    """What went wrong, in the operating system's words ("Connection refused", not asyncio's
    "Connect call failed ('10.0.0.5', 8000)")."""
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name ({exc.strerror})"
    if exc.errno and exc.errno > 0:
        return os.strerror(exc.errno)
    return str(exc) or type(exc).__name__


async def _within(awaitable, seconds: float | None):
    """awaitable, or asyncio.TimeoutError after `seconds` (None: no limit)."""
    if seconds is None:
        return await awaitable
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(seconds):
            return await awaitable
    return await asyncio.wait_for(awaitable, seconds)  # pragma: no cover - Python 3.10


def _content_coding(headers) -> str | None:
    """The body's Content-Encoding, lower-cased; None for none or identity."""
    codings = [v.decode("latin-1").strip().lower() for k, v in headers if k.lower() == b"content-encoding"]
    coding = ",".join(c for c in codings if c)
    return None if coding in ("", "identity") else coding


def _zlib_header(data: bytes) -> bool:
    """Whether data starts with a zlib header (RFC 1950: deflate method, a check value divisible by 31)."""
    return len(data) >= 2 and data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0


class _BoundedDecoder:
    """Inflates a gzip or deflate body at most DECODED_PIECE bytes at a time, so a reader's cap
    on the body is a cap on memory too. Other codings are refused: llmtop asked for identity."""

    def __init__(self, wbits: int, request: httpx.Request):
        self._wbits = wbits
        self._request = request
        self._inflate = zlib.decompressobj(wbits)
        self._started = False
        self._head = b""  # the first bytes of a deflate body, until there are two

    @classmethod
    def for_coding(cls, coding: str, request: httpx.Request) -> "_BoundedDecoder":
        if coding in ("gzip", "x-gzip"):
            return cls(16 + zlib.MAX_WBITS, request)
        if coding == "deflate":
            return cls(zlib.MAX_WBITS, request)  # zlib-wrapped, or raw deflate (see pieces)
        raise httpx.DecodingError(
            f"the server sent a body in Content-Encoding {coding[:40]!r}, which llmtop did not ask for", request=request
        )

    def pieces(self, data: bytes):
        """The decoded bytes of `data`, in pieces of at most DECODED_PIECE."""
        try:
            if not self._started and self._wbits == zlib.MAX_WBITS:
                # zlib-wrapped or raw deflate is told by the first two bytes; a first chunk may be one.
                data = self._head = self._head + data
                if len(data) < 2:
                    return
                if not _zlib_header(data):
                    self._inflate = zlib.decompressobj(-zlib.MAX_WBITS)  # raw deflate, as some servers send it
            self._started = True
            while data:
                out = self._inflate.decompress(data, DECODED_PIECE)
                if out:
                    yield out
                data = self._inflate.unconsumed_tail
                if self._inflate.eof and self._inflate.unused_data:  # a second gzip member follows
                    data = self._inflate.unused_data
                    self._inflate = zlib.decompressobj(self._wbits)
        except zlib.error as exc:
            raise httpx.DecodingError(f"the body does not decode as its Content-Encoding says: {exc}", request=self._request) from None


class _Body(httpx.AsyncByteStream):
    """A response body read from its connection as the caller iterates; the connection goes back
    to the pool only once the response has been read to its end."""

    def __init__(self, transport: "LeanTransport", conn: _Connection, request: httpx.Request, decoder=None):
        self._transport = transport
        self._conn = conn
        self._request = request
        self._decoder: _BoundedDecoder | None = decoder
        self._done = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        conn, read_timeout, decoder = self._conn, _timeout(self._request, "read"), self._decoder
        while not self._done:
            event = await self._transport._next_event(conn, self._request, read_timeout)
            if type(event) is h11.Data:
                if decoder is None:
                    yield bytes(event.data)
                else:
                    for piece in decoder.pieces(bytes(event.data)):
                        yield piece
            elif type(event) is h11.EndOfMessage:
                self._done = True
                self._transport._release(conn, reusable=True)

    async def aclose(self) -> None:
        if not self._done:  # left unread: the connection is mid-response and cannot be reused
            self._done = True
            self._transport._release(self._conn, reusable=False)


class LeanTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 to one backend's origin over at most `max_connections` keep-alive connections."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None, max_connections: int = 4):
        self._ssl = ssl_context
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: deque[_Connection] = deque()
        self._open: set[_Connection] = set()
        self._closed = False

    # -- connections --------------------------------------------------------------------------

    async def _connect(self, request: httpx.Request) -> _Connection:
        """A new connection, its TCP connect and TLS handshake timed apart (both within the
        request's connect timeout)."""
        url = request.url
        tls = url.scheme == "https"
        port = url.port or (443 if tls else 80)
        limit = _timeout(request, "connect")
        started = time.perf_counter()
        try:
            sock = await _within(_open_raw(url.host, port), limit)
        except asyncio.TimeoutError:
            raise httpx.ConnectTimeout("timed out while connecting", request=request) from None
        except OSError as exc:
            raise httpx.ConnectError(_reason(exc), request=request) from None
        connected = time.perf_counter()
        if not tls and SO_TIMESTAMPNS is not None:
            return self._adopt(_RawIO(sock), request, connected - started, None)
        if tls and self._ssl is None:
            self._ssl = httpx.create_ssl_context()  # once; the engine normally hands one in
        opening = asyncio.open_connection(
            sock=sock, ssl=self._ssl if tls else None, server_hostname=url.host if tls else None, limit=READ_SIZE
        )
        try:
            reader, writer = await _within(opening, None if limit is None else max(0.0, limit - (connected - started)))
        except BaseException as exc:
            sock.close()
            if isinstance(exc, asyncio.TimeoutError):
                raise httpx.ConnectTimeout("timed out during the TLS handshake", request=request) from None
            if isinstance(exc, ssl.SSLError):
                raise httpx.ConnectError(f"TLS handshake failed: {exc.reason or exc}", request=request) from None
            if isinstance(exc, OSError):
                raise httpx.ConnectError(_reason(exc), request=request) from None
            raise
        handshake = time.perf_counter() - connected if tls else None
        return self._adopt(_StreamIO(reader, writer), request, connected - started, handshake)

    def _adopt(self, io, request: httpx.Request, connect_s: float, tls_s: float | None) -> _Connection:
        conn = _Connection(io)
        conn.connect_s, conn.tls_s = connect_s, tls_s
        if self._closed:  # closed while this connection was being opened
            conn.close()
            raise httpx.ConnectError("the client was closed", request=request)
        self._open.add(conn)
        return conn

    def _release(self, conn: _Connection, reusable: bool) -> None:
        state = conn.h11
        if (
            reusable
            and not self._closed
            and state.our_state is h11.DONE
            and state.their_state is h11.DONE
            and not state.trailing_data[0]  # bytes past the end of the response: not ours to answer with
            and conn.usable()
        ):
            state.start_next_cycle()
            conn.reused = True
            conn.answered = False
            self._idle.append(conn)
        else:
            self._open.discard(conn)
            conn.close()
        self._slots.release()

    async def _next_event(self, conn: _Connection, request: httpx.Request, read_timeout: float | None):
        state = conn.h11
        while True:
            try:
                event = state.next_event()
            except h11.RemoteProtocolError as exc:
                raise httpx.RemoteProtocolError(f"malformed HTTP response: {exc}", request=request) from None
            if event is not h11.NEED_DATA:
                if type(event) is h11.ConnectionClosed:
                    raise httpx.RemoteProtocolError("server closed the connection", request=request)
                return event
            try:
                if read_timeout is None:
                    data = await conn.io.read()
                else:
                    data = await _within(conn.io.read(), read_timeout)
            except asyncio.TimeoutError:
                raise httpx.ReadTimeout("timed out while reading", request=request) from None
            except ssl.SSLError as exc:
                raise httpx.ReadError(f"TLS error: {exc.reason or exc}", request=request) from None
            except (ConnectionResetError, BrokenPipeError) as exc:
                if state.their_state is h11.SEND_RESPONSE and not conn.answered:
                    raise _ClosedBeforeResponse(_reason(exc), reset=True) from None
                raise httpx.ReadError(_reason(exc), request=request) from None
            except OSError as exc:
                raise httpx.ReadError(_reason(exc), request=request) from None
            if not data and state.their_state is h11.SEND_RESPONSE and not conn.answered:
                # Closed before a single byte of the response: the mark of a keep-alive connection
                # the server dropped while idle (a reset, when our request reached it first), or
                # of a server that died on this request.
                raise _ClosedBeforeResponse("server closed the connection without answering")
            if data and not conn.answered:
                conn.answered = True
                if conn.timings is not None:
                    conn.timings.first_byte_at = conn.io.arrival()
            state.receive_data(data)

    # -- one request ----------------------------------------------------------------------------

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._closed:
            raise httpx.ConnectError("the client was closed", request=request)
        await self._slots.acquire()
        try:
            try:
                return await self._exchange(request, await self._checkout(request))
            except _ClosedBeforeResponse as exc:
                if not exc.reused or self._closed:
                    raise exc.error(request) from None
            # A reused connection the server had closed or reset: once more on a new one, as browsers do.
            try:
                return await self._exchange(request, await self._connect(request))
            except _ClosedBeforeResponse as exc:
                raise exc.error(request) from None
        except BaseException:
            self._slots.release()
            raise

    async def _checkout(self, request: httpx.Request) -> _Connection:
        while self._idle:
            conn = self._idle.pop()  # most recently used first: least likely to have timed out
            if conn.usable():
                return conn
            self._open.discard(conn)
            conn.close()
        return await self._connect(request)

    async def _exchange(self, request: httpx.Request, conn: _Connection) -> httpx.Response:
        """Send the request and read up to the response head; the body streams from the connection."""
        try:
            return await self._send_and_read_head(request, conn)
        except _ClosedBeforeResponse as exc:
            exc.reused = conn.reused
            self._drop(conn)
            raise
        except BaseException:
            self._drop(conn)
            raise

    def _drop(self, conn: _Connection) -> None:
        self._open.discard(conn)
        conn.close()

    async def _send_and_read_head(self, request: httpx.Request, conn: _Connection) -> httpx.Response:
        state = conn.h11
        body = request.content if isinstance(request.stream, httpx.ByteStream) else await request.aread()
        headers = [(k, v) for k, v in request.headers.raw if k.lower() != b"connection"]
        try:
            data = state.send(h11.Request(method=request.method, target=request.url.raw_path, headers=headers))
            if body:
                data += state.send(h11.Data(data=body))
            data += state.send(h11.EndOfMessage())
        except h11.LocalProtocolError as exc:
            raise httpx.LocalProtocolError(str(exc), request=request) from None
        reused = conn.reused
        try:
            sent_at = await conn.io.write(data)
        except (ConnectionResetError, BrokenPipeError) as exc:  # the keep-alive race, caught writing
            raise _ClosedBeforeResponse(_reason(exc), reset=True) from None
        except OSError as exc:
            raise httpx.WriteError(_reason(exc), request=request) from None
        timings = conn.timings = RequestTimings(
            connect_s=None if reused else conn.connect_s, tls_s=None if reused else conn.tls_s, sent_at=sent_at
        )
        read_timeout = _timeout(request, "read")
        while True:
            event = await self._next_event(conn, request, read_timeout)
            if type(event) is h11.Response:
                break
            # h11.InformationalResponse (100 Continue and the like): read on to the real one
        headers = event.headers
        decoder = None
        coding = _content_coding(headers)
        if coding is not None:
            decoder = _BoundedDecoder.for_coding(coding, request)
            # httpx must not decode again, unbounded: the body it gets is already plain.
            headers = [(k, v) for k, v in headers if k.lower() != b"content-encoding"]
        return httpx.Response(
            event.status_code,
            headers=headers,
            stream=_Body(self, conn, request, decoder),
            extensions={
                "http_version": b"HTTP/1.1",
                "reason_phrase": event.reason,
                # when the bytes of the latest read reached this machine (_RawIO: the kernel's stamp)
                "llmtop.arrival": conn.io.arrival,
                "llmtop.reads": conn.io.read_info,
                "llmtop.timings": timings,
            },
        )

    async def aclose(self) -> None:
        self._closed = True
        for conn in list(self._open):
            conn.close()
        self._open.clear()
        self._idle.clear()


class _ClosedBeforeResponse(Exception):
    """The connection ended (closed or reset) before any byte of the response."""

    def __init__(self, reason: str, reset: bool = False):
        super().__init__(reason)
        self.reset = reset
        self.reused = False

    def error(self, request: httpx.Request) -> httpx.TransportError:
        if self.reset:
            return httpx.ReadError(str(self), request=request)
        return httpx.RemoteProtocolError(str(self), request=request)


class NoCookies(http.cookiejar.CookieJar):
    """A monitor keeps no cookies: each probe stands alone (a load balancer's sticky cookie would
    pin every probe to one replica), and storing them costs CPU on every response."""

    def extract_cookies(self, response, request) -> None:
        pass

    def set_cookie(self, cookie) -> None:
        pass


class _NoCookieStore(httpx.Cookies):
    """What the client offers httpx as its cookies: none, and none taken from a response. (httpx
    wraps every response and its request in urllib objects before its jar may decline them: a
    tenth of the CPU a health poll cost.)"""

    def __init__(self) -> None:
        super().__init__(NoCookies())

    def extract_cookies(self, response: httpx.Response) -> None:
        pass


class _BackendClient(httpx.AsyncClient):
    _no_cookies = _NoCookieStore()

    @property
    def cookies(self) -> httpx.Cookies:
        return self._no_cookies

    @cookies.setter
    def cookies(self, cookies) -> None:
        pass  # httpx's constructor sets them; a monitor keeps none


@functools.cache
def shared_ssl_context() -> ssl.SSLContext:
    """The CA bundle, loaded once per process and shared by every client that may speak TLS.
    httpx loads it again for each client it makes without one: 20-40 ms of CPU each, on the
    event loop (a TUI connecting to ten agents froze for a third of a second)."""
    return httpx.create_ssl_context()


def backend_client(timeout_s: float, ssl_context: ssl.SSLContext | None = None, max_connections: int = 4) -> httpx.AsyncClient:
    """The httpx client for one backend, on a LeanTransport."""
    return _BackendClient(
        transport=LeanTransport(ssl_context, max_connections=max_connections),
        # Connecting is bounded here; the whole exchange, by the caller's deadline (every adapter
        # request runs under one, providers/base.py). A timer per read on top would cost CPU for
        # no new bound.
        timeout=httpx.Timeout(None, connect=timeout_s),
        follow_redirects=False,  # see Adapter.raise_for_status
        # Bodies are small and the CPU is what a big fleet runs out of; a server that compresses
        # anyway is inflated a bounded piece at a time (_BoundedDecoder).
        headers={"User-Agent": "llmtop", "Accept-Encoding": "identity"},
        trust_env=False,  # a fleet on private addresses must not go through an HTTP(S)_PROXY
    )
