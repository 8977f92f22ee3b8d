"""A lean HTTP/1.1 transport under httpx: asyncio streams for I/O, h11 for the protocol.

httpx's default transport (httpcore over anyio) costs about 0.3 ms of CPU per request on top of
the 0.1 ms the bytes and the parsing themselves take. A monitor polling 500 backends makes
1,500 requests and streams 500 probes a round, all on one event loop whose punctuality is what
makes a TTFT true: measured on 2 cores, that overhead alone kept `llmtop check` of 500 backends
CPU-bound for a second and a half. httpx stays the API (requests, responses, errors, httpx-sse);
only the wire underneath is this module.

It does what a fleet monitor needs and no more: one backend's origin per transport, a few
keep-alive connections, TLS with the caller's context, no proxies (the engine sets
trust_env=False), no HTTP/2, no redirects (the engine does not follow them). Whole-request
deadlines are the caller's (providers/base.py bounds every request end to end); the transport
bounds connecting, and each read when the client sets a read timeout. Bodies come through as
sent: httpx decodes gzip and deflate itself, and a body that does not decode is its DecodingError.
"""

from __future__ import annotations

import asyncio
import http.cookiejar
import ipaddress
import os
import socket
import ssl
import sys
from collections import deque
from typing import AsyncIterator

import h11
import httpx

READ_SIZE = 64 * 1024


class _Connection:
    __slots__ = ("reader", "writer", "h11", "reused", "answered")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=64 * 1024)
        self.reused = False
        self.answered = False  # a byte of the current response has arrived

    def usable(self) -> bool:
        """An idle keep-alive connection the server has not closed, nor written to meanwhile: a
        proxy's "408 Request Timeout" sent before it hangs up must not pass for the next answer.
        (StreamReader has no public peek; at_eof() stays False while such bytes wait unread.)"""
        return not self.writer.is_closing() and not self.reader.at_eof() and not getattr(self.reader, "_buffer", b"")

    def close(self) -> None:
        self.writer.close()


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


class _Body(httpx.AsyncByteStream):
    """A response body read from its connection as the caller iterates; the connection goes back
    to the pool only once the response has been read to its end."""

    def __init__(self, transport: "LeanTransport", conn: _Connection, request: httpx.Request):
        self._transport = transport
        self._conn = conn
        self._request = request
        self._done = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        conn, read_timeout = self._conn, _timeout(self._request, "read")
        while not self._done:
            event = await self._transport._next_event(conn, self._request, read_timeout)
            if type(event) is h11.Data:
                yield bytes(event.data)
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
        url = request.url
        tls = url.scheme == "https"
        port = url.port or (443 if tls else 80)
        if tls and self._ssl is None:
            self._ssl = httpx.create_ssl_context()  # once; the engine normally hands one in
        # A host name may have several addresses (IPv6 and IPv4, round-robin DNS): try the next
        # one after 250 ms rather than spend the whole timeout on one that drops packets. An IP
        # address has one, and the racing machinery would cost 60% more CPU per connect.
        racing = {} if _is_ip(url.host) else {"happy_eyeballs_delay": 0.25, "interleave": 1}
        opening = asyncio.open_connection(
            url.host,
            port,
            ssl=self._ssl if tls else None,
            server_hostname=url.host if tls else None,
            limit=READ_SIZE,
            **racing,
        )
        try:
            reader, writer = await _within(opening, _timeout(request, "connect"))
        except asyncio.TimeoutError:
            raise httpx.ConnectTimeout("timed out while connecting", request=request) from None
        except ssl.SSLError as exc:
            raise httpx.ConnectError(f"TLS handshake failed: {exc.reason or exc}", request=request) from None
        except OSError as exc:
            raise httpx.ConnectError(_reason(exc), request=request) from None
        conn = _Connection(reader, writer)
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
            and not conn.writer.is_closing()
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
                    data = await conn.reader.read(READ_SIZE)
                else:
                    data = await _within(conn.reader.read(READ_SIZE), read_timeout)
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
            conn.answered = conn.answered or bool(data)
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
        # httpx decodes what its Accept-Encoding asked for (Response.aiter_bytes), raising
        # httpx.DecodingError on a body that does not decode; the transport passes bytes through.
        headers = [(k, v) for k, v in request.headers.raw if k.lower() != b"connection"]
        try:
            data = state.send(h11.Request(method=request.method, target=request.url.raw_path, headers=headers))
            if body:
                data += state.send(h11.Data(data=body))
            data += state.send(h11.EndOfMessage())
        except h11.LocalProtocolError as exc:
            raise httpx.LocalProtocolError(str(exc), request=request) from None
        conn.writer.write(data)  # asyncio reports a failed write on the next read, not here
        read_timeout = _timeout(request, "read")
        while True:
            event = await self._next_event(conn, request, read_timeout)
            if type(event) is h11.Response:
                break
            # h11.InformationalResponse (100 Continue and the like): read on to the real one
        return httpx.Response(
            event.status_code,
            headers=event.headers,
            stream=_Body(self, conn, request),
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": event.reason},
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


def backend_client(timeout_s: float, ssl_context: ssl.SSLContext | None = None, max_connections: int = 4) -> httpx.AsyncClient:
    """The httpx client for one backend, on a LeanTransport."""
    return httpx.AsyncClient(
        transport=LeanTransport(ssl_context, max_connections=max_connections),
        # Connecting is bounded here; the whole exchange, by the caller's deadline (every adapter
        # request runs under one, providers/base.py). A timer per read on top would cost CPU for
        # no new bound.
        timeout=httpx.Timeout(None, connect=timeout_s),
        cookies=NoCookies(),
        follow_redirects=False,  # see Adapter.raise_for_status
        headers={"User-Agent": "llmtop"},
        trust_env=False,  # a fleet on private addresses must not go through an HTTP(S)_PROXY
    )
