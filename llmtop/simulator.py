"""A loopback HTTP/1.1 server that plays a fleet of LLM backends, with exact token timing and real socket faults.

One listener serves many simulated backends, each under its own path prefix (``/{name}``), each speaking
the wire format of the engine it imitates: vLLM, SGLang, TGI, llama.cpp, LM Studio, LiteLLM, OpenAI,
Ollama or Anthropic. It powers ``llmtop --demo``, the integration tests and the benchmarks, so streamed
tokens leave at absolute deadlines measured from the moment the request arrived, and faults (hangs,
resets, truncated bodies, slow headers) happen on the real socket, where a client would meet them.

The HTTP layer is a small hand-written HTTP/1.1 (request line, headers, Content-Length bodies,
keep-alive, chunked responses) rather than a framework, so that no buffering or latency sits between a
deadline and the bytes on the wire.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import struct
import sys
import threading
import time
import uuid
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from http import HTTPStatus
from pathlib import Path
from typing import Any

import tomli_w

from llmtop import kernelclock
from llmtop.config import PROVIDERS

FAULTS = (
    "5xx", "hang", "reset", "bad_json", "truncated", "flapping", "429", "slow_headers", "huge_body", "loading",
    # Hostile servers: non-finite numbers, a Retry-After for ever, a gzip bomb, a model list of any length.
    "nan", "retry_forever", "gzip_bomb", "many_models",
    # A stream whose end marker trails its last token by fault_arg ms (default 40) while the whole
    # process stalls (a blocking sleep): a reader in the same process, late by as much, reads the
    # last token together with the end marker, as a loaded llmtop does.
    "stalled_end",
)  # fmt: skip

# What a hostile server writes where text goes: an OSC that sets the terminal title, a screen
# clear and cursor home, a bidi override, a newline that forges a row, and a C1 CSI.
HOSTILE_TEXT = "pwned\x1b]0;owned\x07\x1b[2J\x1b[H\u202eevil\u202c\nFORGED ROW\r\x9b31mred\x1b[0m"

_DEFAULT_OUTPUT_TOKENS = 8
_WORDS = (" The", " fleet", " is", " up", " and", " every", " token", " is", " on", " time", ".")
_CREATED = 1_735_689_600  # 2025-01-01: a fixed "created" stamp keeps model listings byte-stable
_JSON = "application/json"
_SSE = "text/event-stream; charset=utf-8"
_NDJSON = "application/x-ndjson"
_PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"
_BAD_JSON = b'{"data": [not json'
_HEALTH_PATHS = frozenset({"/", "/health", "/health/liveliness", "/health/readiness"})
_COMPLETION_PATHS = frozenset({"/v1/chat/completions", "/api/chat", "/v1/messages"})

# Bucket bounds as the real servers publish them (vLLM and SGLang share theirs).
_ENGINE_TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
_LITELLM_TTFT_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 420.0, 600.0,
)  # fmt: skip
_ENGINE_TTFT_HELP = "Histogram of time to first token in seconds."
_TPOT_BUT_LAST = "llmtop_simulator_time_per_output_token_but_last_seconds"
_TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0)


class _Histogram:
    """A Prometheus histogram of observed seconds, rendered in the text exposition format."""

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last slot is the +Inf overflow
        self.sum = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds
        self.count += 1

    def render(self, name: str, help_text: str, labels: dict[str, str]) -> str:
        lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        cumulative = 0
        for bound, count in zip((*map(repr, self.bounds), "+Inf"), self.counts):
            cumulative += count
            lines.append(f"{name}_bucket{_labels({**labels, 'le': bound})} {float(cumulative)!r}")
        lines.append(f"{name}_count{_labels(labels)} {float(self.count)!r}")
        lines.append(f"{name}_sum{_labels(labels)} {self.sum!r}")
        return "\n".join(lines) + "\n"


@dataclass(eq=False)
class SimBackend:
    """One simulated backend. Every field may be changed while the simulator runs; the next request sees it."""

    name: str
    provider: str = "vllm"
    models: list[str] = field(default_factory=lambda: ["meta-llama/Llama-3.1-8B-Instruct"])
    ttft_ms: float = 40.0  # request fully read -> first text-carrying chunk
    gap_ms: float = 10.0  # between consecutive text chunks
    output_tokens: int | None = None  # None: the request's limit (max_tokens, num_predict), else 8
    usage: bool = True  # report server-side token counts
    fault: str | None = None  # one of FAULTS
    fault_arg: float | None = None
    api_key: str | None = None
    running: float = 1
    waiting: float = 0
    kv_cache: float = 0.3
    wander: random.Random | None = None  # when set, the three gauges take a random step on every scrape
    hostile: bool = False  # every text it makes up (an extra model id, versions, errors) carries HOSTILE_TEXT
    loaded: list[str] | None = None  # Ollama: the models /api/ps lists (None: every model)
    keep_alive_s: float = 300.0  # Ollama: how long /api/ps says a loaded model stays (-1: for ever)
    bodies: list[dict] = field(default_factory=list)  # the last completion requests' JSON bodies
    last_ttft_s: float | None = None  # what the last generation served (tests/served.py)
    last_tpot_s: float | None = None
    last_token_times: list[float] = field(default_factory=list)  # when each token of the last generation left (perf_counter)
    echo_headers: bool = False  # its error bodies quote the request's headers back, key and all
    headers_seen: list[dict] = field(default_factory=list)  # the last requests' headers (names lower-cased)
    # A reasoning model: "all" streams every token as reasoning text (reasoning_content, thinking);
    # "hidden" streams none of it and stops at the limit, as OpenAI's o-series does with a small max.
    reasoning: str | None = None
    health_route: tuple[str, int] | None = None  # (path, status): a proxy's own health route, answered first
    # When set, completion requests are held until it is set (for tests that must look at a probe in
    # flight); token deadlines stay anchored at the request, so a held stream comes out in a burst.
    hold: asyncio.Event | None = None
    requests: Counter[str] = field(default_factory=Counter)  # per path, relative to the backend base
    tpot_histogram: _Histogram = field(init=False, repr=False)  # mean seconds per output token after the first, per request
    # The same up to the token before the last: the window llmtop times when it reads the last
    # token with the end marker (probe.StreamMeter). Not a vLLM series; the benchmarks read it.
    tpot_but_last_histogram: _Histogram = field(init=False, repr=False)
    ttft_histogram: _Histogram = field(init=False, repr=False)  # TTFTs served; buckets follow the first provider

    def __post_init__(self) -> None:
        bounds = _LITELLM_TTFT_BUCKETS if self.provider == "litellm" else _ENGINE_TTFT_BUCKETS
        self.ttft_histogram = _Histogram(bounds)
        self.tpot_histogram = _Histogram(_TPOT_BUCKETS)
        self.tpot_but_last_histogram = _Histogram(_TPOT_BUCKETS)

    def __setattr__(self, name: str, value: Any) -> None:
        # Validated on every assignment, not just in __init__, because tests switch faults at runtime
        # and a misspelt fault would otherwise silently mean "healthy".
        if name == "provider" and value not in PROVIDERS:
            raise ValueError(f"unknown provider {value!r}; choose one of {', '.join(PROVIDERS)}")
        if name == "fault" and value is not None and value not in FAULTS:
            raise ValueError(f"unknown fault {value!r}; choose one of {', '.join(FAULTS)}")
        if name == "reasoning" and value not in (None, "all", "hidden"):
            raise ValueError(f"unknown reasoning {value!r}; choose all or hidden")
        super().__setattr__(name, value)


def _arg(backend: SimBackend, default: float) -> float:
    return default if backend.fault_arg is None else backend.fault_arg


def _listed(backend: SimBackend) -> list[str]:
    """The model ids a listing shows: a hostile server adds one made of escape sequences."""
    return [*backend.models, f"model-{HOSTILE_TEXT}"] if backend.hostile else list(backend.models)


def _text(backend: SimBackend, text: str) -> str:
    return f"{text} {HOSTILE_TEXT}" if backend.hostile else text


def _many_models(backend: SimBackend, key: str, field_name: str) -> _Response:
    """fault_arg model ids (default 100,000) as valid JSON under llmtop's body cap, the real
    models last, so a missing-model check must read past whatever it keeps."""
    count = int(_arg(backend, 100_000))
    ids = [f"m-{i:07d}" for i in range(count)] + [_ollama_name(m) if key == "models" else m for m in backend.models]
    body = '{"' + key + '":[' + ",".join(f'{{"{field_name}":{json.dumps(m)}}}' for m in ids) + "]}"
    return _Response(200, body.encode(), _JSON)


_BOMB: bytes | None = None


def _gzip_bomb() -> bytes:
    """A gzip body of about 100 KiB that inflates to 100 MiB of one endless line (made once)."""
    global _BOMB
    if _BOMB is None:
        packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        piece = b"x" * (1024 * 1024)
        _BOMB = packer.compress(b": ") + b"".join(packer.compress(piece) for _ in range(100)) + packer.flush()
    return _BOMB


# --- HTTP/1.1 plumbing -------------------------------------------------------------------------------


class _Malformed(Exception):
    """The bytes on the connection are not an HTTP/1.1 request we can answer."""


class _HttpError(Exception):
    """Raised by a handler to answer with an error in the backend's own error format."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


@dataclass(frozen=True)
class _Request:
    method: str
    path: str  # without the query string; relative to the backend base once routed
    headers: dict[str, str]  # names lower-cased
    body: bytes
    received: float  # perf_counter() time its last bytes reached this machine: the anchor of every deadline
    keep_alive: bool

    def json(self) -> dict[str, Any]:
        try:
            payload = json.loads(self.body or b"{}")
        except ValueError:
            raise _HttpError(400, "request body is not valid JSON") from None
        if not isinstance(payload, dict):
            raise _HttpError(400, "request body must be a JSON object")
        return payload


@dataclass
class _Response:
    status: int
    body: bytes | AsyncIterator[bytes] = b""  # bytes: sent with Content-Length; an iterator: chunked
    content_type: str | None = _JSON
    headers: tuple[tuple[str, str], ...] = ()
    truncated: bool = False  # close the connection after the body, without the terminating chunk


# Kernel receive stamps on each connection's reads (_SocketReader), where this Python can take
# the reading over from asyncio: Linux (SO_TIMESTAMPNS), and transports that honour a
# pause_reading() from connection_made (CPython gh-103607: fixed in 3.12 and in 3.11's later
# releases; 3.11.7 is the first checked here). Elsewhere a request's clock starts when it is read
# (_StreamRequestReader), as it always did.
_STAMPED_READS = (
    kernelclock.SO_TIMESTAMPNS is not None and hasattr(socket.socket, "recvmsg") and sys.version_info >= (3, 11, 7)
)


class _StreamRequestReader:
    """A connection's request side over asyncio's StreamReader: reads carry no kernel stamp, so a
    request arrived when it was read."""

    def __init__(self, stream: asyncio.StreamReader):
        self._stream = stream
        self.arrived = 0.0  # perf_counter() time the request's last bytes were read

    async def read_head(self) -> bytes | None:
        try:
            head = await self._stream.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                raise _Malformed("connection closed inside the request head") from None
            return None
        except asyncio.LimitOverrunError:
            raise _Malformed("request head too large") from None
        self.arrived = time.perf_counter()
        return head

    async def read_exactly(self, n: int) -> bytes:
        try:
            body = await self._stream.readexactly(n)
        except asyncio.IncompleteReadError:
            raise _Malformed("connection closed inside the request body") from None
        self.arrived = time.perf_counter()
        return body

    def close(self) -> None:
        pass  # the transport is the writer's to close


class _SocketReader:
    """A connection's request side, read off its socket with recvmsg, so each read carries the
    kernel's receive time (kernelclock.py): a request's deadlines run from when it reached this
    machine, not from when this event loop, busy with hundreds of other streams, read it. Otherwise
    that lateness would be served as time to first token, and a client that times TTFT truly
    (from its send) would be blamed for it (benchmarks/bench_check_fleet.py).

    Made in the connection's connection_made (asyncio.start_server calls its callback there), so
    the transport is paused before its first read and never reads: this is the socket's only
    reader, and the transport only writes."""

    LIMIT = 64 * 1024  # of a request head, as asyncio's StreamReader
    READ = 64 * 1024

    def __init__(self, writer: asyncio.StreamWriter):
        writer.transport.pause_reading()
        # A descriptor of its own on the same socket: asyncio lets no one else watch the
        # transport's. The connection ends (FIN, or the reset of a "reset" fault) once both are
        # closed: the transport's by writer.close(), this one by close() as the connection's task ends.
        self._sock = socket.socket(fileno=os.dup(writer.get_extra_info("socket").fileno()))
        self._fd = self._sock.fileno()
        self._stamped = hasattr(self._sock, "recvmsg") and kernelclock.enable(self._sock)
        self._buffer = bytearray()
        self._eof = False
        self.arrived = 0.0  # perf_counter() time the kernel received the last bytes read

    async def _fill(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                if self._stamped:
                    data, ancillary, _flags, _addr = self._sock.recvmsg(self.READ, kernelclock.ANCILLARY_SIZE)
                    arrived = kernelclock.kernel_time(ancillary)
                else:
                    data, arrived = self._sock.recv(self.READ), time.perf_counter()
            except (BlockingIOError, InterruptedError):
                waiter = loop.create_future()
                loop.add_reader(self._fd, _set_done, waiter)
                try:
                    await waiter
                finally:
                    loop.remove_reader(self._fd)
                continue
            if data:
                self._buffer += data
                self.arrived = arrived
            else:
                self._eof = True
            return

    async def read_head(self) -> bytes | None:
        """The request head, up to its blank line; None when the client closed cleanly before one."""
        searched = 0
        while True:
            end = self._buffer.find(b"\r\n\r\n", searched)
            if end >= 0:
                head = bytes(self._buffer[: end + 4])
                del self._buffer[: end + 4]
                return head
            if len(self._buffer) > self.LIMIT:
                raise _Malformed("request head too large")
            if self._eof:
                if self._buffer:
                    raise _Malformed("connection closed inside the request head")
                return None
            searched = max(0, len(self._buffer) - 3)
            await self._fill()

    async def read_exactly(self, n: int) -> bytes:
        while len(self._buffer) < n:
            if self._eof:
                raise _Malformed("connection closed inside the request body")
            await self._fill()
        body = bytes(self._buffer[:n])
        del self._buffer[:n]
        return body

    def close(self) -> None:
        self._sock.close()


def _set_done(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)


async def _read_request(reader: _SocketReader | _StreamRequestReader) -> _Request | None:
    """Read one request; None when the client closed the connection cleanly between requests."""
    head = await reader.read_head()
    if head is None:
        return None
    request_line, *header_lines = head[:-4].decode("latin-1").split("\r\n")
    try:
        method, target, version = request_line.split(" ")
    except ValueError:
        raise _Malformed(f"bad request line {request_line!r}") from None
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "transfer-encoding" in headers:
        raise _Malformed("chunked request bodies are not supported")
    try:
        length = int(headers.get("content-length", "0"))
    except ValueError:
        raise _Malformed("bad Content-Length") from None
    if length < 0:
        raise _Malformed("bad Content-Length")
    body = await reader.read_exactly(length)
    keep_alive = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
    # Deadlines run from when the request's last bytes reached this machine (the kernel's stamp).
    return _Request(method, target.partition("?")[0], headers, body, reader.arrived, keep_alive)


async def _send(writer: asyncio.StreamWriter, response: _Response, keep_alive: bool) -> bool:
    """Write one response, draining after every chunk; True when the connection can carry another request."""
    streamed = not isinstance(response.body, bytes)
    lines = [f"HTTP/1.1 {response.status} {HTTPStatus(response.status).phrase}"]
    if response.content_type:
        lines.append(f"content-type: {response.content_type}")
    lines.extend(f"{name}: {value}" for name, value in response.headers)
    lines.append("transfer-encoding: chunked" if streamed else f"content-length: {len(response.body)}")
    if not keep_alive:
        lines.append("connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    if not streamed:
        writer.write(head + response.body)
        await writer.drain()
        return keep_alive
    writer.write(head)
    await writer.drain()
    async for chunk in response.body:
        # One write per chunk: with TCP_NODELAY each chunk leaves as soon as its deadline comes.
        writer.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        await writer.drain()
    if response.truncated:
        return False  # the caller closes now: the body ends without its zero-length chunk
    writer.write(b"0\r\n\r\n")
    await writer.drain()
    return keep_alive


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _json(status: int, obj: Any, headers: tuple[tuple[str, str], ...] = ()) -> _Response:
    return _Response(status, _dumps(obj), _JSON, headers)


def _sse(obj: Any) -> bytes:
    return b"data: " + _dumps(obj) + b"\n\n"


def _event(name: str, obj: Any) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + _dumps(obj) + b"\n\n"


def _ndjson(obj: Any) -> bytes:
    return _dumps(obj) + b"\n"


def _error(
    backend: SimBackend, status: int, message: str, kind: str, headers: tuple[tuple[str, str], ...] = ()
) -> _Response:
    """An error body shaped the way this backend's real server shapes it."""
    if backend.provider == "ollama":
        body: dict[str, Any] = {"error": message}
    elif backend.provider == "anthropic":
        body = {"type": "error", "error": {"type": kind, "message": message}}
    else:
        body = {"error": {"message": message, "type": kind, "code": status}}
    return _json(status, body, headers)


# --- Token generation --------------------------------------------------------------------------------


@dataclass
class _Timing:
    """When a generation's tokens actually left, for the server-side timings some protocols report."""

    received: float
    first: float = 0.0
    last: float = 0.0


async def _sleep_until(deadline: float) -> None:
    delay = deadline - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)


async def _tokens(backend: SimBackend, timing: _Timing, n: int) -> AsyncIterator[str]:
    """Yield n words on schedule: the first at received+ttft, then one every gap.

    Each deadline is absolute, so a late wake-up delays one token without shifting the ones after it.
    """
    ttft, gap = backend.ttft_ms / 1000, backend.gap_ms / 1000
    times: list[float] = []  # this generation's; the backend's last_token_times is the latest one's
    for i in range(n):
        await _sleep_until(timing.received + ttft + i * gap)
        now = time.perf_counter()
        if i == 0:
            timing.first = now
            backend.ttft_histogram.observe(now - timing.received)
            backend.last_ttft_s = now - timing.received
            backend.last_token_times = times
        times.append(now)
        timing.last = now
        if i == n - 1 and n > 1:
            backend.tpot_histogram.observe((timing.last - timing.first) / (n - 1))
            backend.last_tpot_s = (timing.last - timing.first) / (n - 1)
            if n > 2:
                backend.tpot_but_last_histogram.observe((times[-2] - times[0]) / (n - 2))
        yield _WORDS[i % len(_WORDS)]


async def _generate(backend: SimBackend, timing: _Timing, n: int) -> str:
    """A whole non-streamed answer, returned when its last token would have been produced."""
    return "".join([word async for word in _tokens(backend, timing, n)])


def _output_tokens(backend: SimBackend, limit: Any) -> tuple[int, bool]:
    """How many tokens to produce, and whether that stops at the request's limit (vs a natural stop)."""
    limit = limit if isinstance(limit, int) and limit > 0 else None
    if backend.output_tokens is None:
        n = limit or _DEFAULT_OUTPUT_TOKENS
    else:
        n = max(1, min(backend.output_tokens, limit or backend.output_tokens))
    return n, limit is not None and n >= limit


def _prompt_tokens(messages: Any) -> int:
    """A plausible prompt size: about four characters a token, as tokenizers average on English."""
    if not isinstance(messages, list):
        return 1
    text = "".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))
    return max(1, len(text) // 4)


def _streamed(
    backend: SimBackend,
    req: _Request,
    n: int,
    *,
    content_type: str,
    preamble: list[bytes],
    token: Callable[[str], bytes],
    epilogue: Callable[[_Timing], list[bytes]],
    bad_chunk: bytes,
) -> _Response:
    """A streamed generation: preamble at once, one chunk per token on schedule, then the epilogue.

    The faults that live inside a stream are applied here: "bad_json" replaces each token chunk with
    bad_chunk, "truncated" stops after fault_arg tokens and closes mid-body.
    """
    fault = backend.fault
    truncated = fault == "truncated"
    sent = min(n, int(_arg(backend, 2))) if truncated else n

    async def body() -> AsyncIterator[bytes]:
        for piece in preamble:
            yield piece
        timing = _Timing(req.received)
        async for word in _tokens(backend, timing, sent):
            yield bad_chunk if fault == "bad_json" else token(word)
        if fault == "stalled_end":
            time.sleep(_arg(backend, 40) / 1000)  # blocking on purpose: see FAULTS
        if not truncated:
            for piece in epilogue(timing):
                yield piece

    return _Response(200, body(), content_type, truncated=truncated)


def _huge_listing(backend: SimBackend, key: str, entry: str) -> _Response:
    """A valid JSON model listing of fault_arg MiB (default 64), generated as it is sent so memory stays flat."""
    size = int(_arg(backend, 64) * 1024 * 1024)
    batch = 1024

    async def body() -> AsyncIterator[bytes]:
        prefix = b'{"' + key.encode() + b'":['
        yield prefix
        sent, i = len(prefix), 0
        while sent < size:
            piece = ("," if i else "") + ",".join(entry % k for k in range(i, i + batch))
            yield piece.encode()
            sent += len(piece)
            i += batch
        yield b"]}"

    return _Response(200, body(), _JSON)


# --- OpenAI-compatible servers -----------------------------------------------------------------------

_Handler = Callable[[SimBackend, _Request], Awaitable[_Response]]
_OWNED_BY = {"litellm": "openai", "lmstudio": "organization_owner"}


def _fixed(body: bytes, content_type: str | None = _JSON) -> _Handler:
    async def handler(backend: SimBackend, req: _Request) -> _Response:
        return _Response(200, body, content_type)

    return handler


async def _openai_models(backend: SimBackend, req: _Request) -> _Response:
    if backend.fault == "huge_body":
        return _huge_listing(backend, "data", '{"id":"filler-%07d","object":"model","owned_by":"simulator"}')
    if backend.fault == "many_models":
        return _many_models(backend, "data", "id")
    owner = _OWNED_BY.get(backend.provider, backend.provider)
    listing: dict[str, Any] = {
        "object": "list",
        "data": [{"id": m, "object": "model", "created": _CREATED, "owned_by": owner} for m in _listed(backend)],
    }
    if backend.provider == "llamacpp":
        # llama-server answers Ollama-style clients from the same endpoint, so it carries both shapes.
        listing = {"models": [{"name": m, "model": m, "type": "model"} for m in _listed(backend)], **listing}
    return _json(200, listing)


async def _openai_chat(backend: SimBackend, req: _Request) -> _Response:
    payload = req.json()
    model = payload.get("model", "")
    if model not in backend.models:
        raise _HttpError(404, f"model '{model}' not found")
    n, hit_limit = _output_tokens(backend, payload.get("max_completion_tokens", payload.get("max_tokens")))
    finish = "length" if hit_limit else "stop"
    prompt = _prompt_tokens(payload.get("messages"))
    usage = {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n}
    if backend.fault == "nan":  # json.dumps writes the NaN token, as some servers do
        usage["completion_tokens"] = float("nan")
    cid, created = f"chatcmpl-{uuid.uuid4().hex[:16]}", int(time.time())
    envelope = {"id": cid, "created": created, "model": model}

    if not payload.get("stream"):
        text = await _generate(backend, _Timing(req.received), n)
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
        answer = {**envelope, "object": "chat.completion", "choices": [choice]}
        if backend.usage:
            answer["usage"] = usage
        return _json(200, answer)

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return _sse({**envelope, "object": "chat.completion.chunk", "choices": choices, **extra})

    def epilogue(timing: _Timing) -> list[bytes]:
        pieces = [chunk([{"index": 0, "delta": {}, "finish_reason": finish}])]
        if backend.usage and (payload.get("stream_options") or {}).get("include_usage"):
            # LiteLLM's usage chunk keeps an empty choice where the others send no choices at all.
            choices = [{"index": 0, "delta": {}}] if backend.provider == "litellm" else []
            extra: dict[str, Any] = {"usage": usage}
            if backend.provider == "llamacpp":
                extra["timings"] = _llamacpp_timings(timing, prompt, n)
                if backend.fault == "nan":
                    extra["timings"].update(predicted_per_second=float("inf"), prompt_ms=float("nan"))
            pieces.append(chunk(choices, **extra))
        return [*pieces, b"data: [DONE]\n\n"]

    return _streamed(
        backend,
        req,
        n,
        content_type=_SSE,
        preamble=[chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])],
        token=lambda word: (
            b": thinking\n\n"  # an SSE comment: the tokens are spent, nothing is shown
            if backend.reasoning == "hidden"
            else chunk([{"index": 0, "delta": {_delta_key(backend): word}, "finish_reason": None}])
        ),
        epilogue=epilogue,
        bad_chunk=b"data: {not json}\n\n",
    )


def _delta_key(backend: SimBackend) -> str:
    return "reasoning_content" if backend.reasoning == "all" else "content"


def _llamacpp_timings(timing: _Timing, prompt: int, n: int) -> dict[str, float]:
    # llama-server divides decode time by n - 1: the first token comes out of prompt processing.
    prompt_ms = (timing.first - timing.received) * 1000
    predicted_ms = (timing.last - timing.first) * 1000
    per_token_ms = predicted_ms / (n - 1) if n > 1 else 0.0
    return {
        "prompt_n": prompt,
        "prompt_ms": prompt_ms,
        "prompt_per_second": prompt * 1000 / prompt_ms if prompt_ms else 0.0,
        "predicted_n": n,
        "predicted_ms": predicted_ms,
        "predicted_per_token_ms": per_token_ms,
        "predicted_per_second": 1000 / per_token_ms if per_token_ms else 0.0,
    }


async def _tgi_info(backend: SimBackend, req: _Request) -> _Response:
    if backend.fault == "huge_body":
        return _huge_listing(backend, "filler", '{"id":"filler-%07d"}')
    return _json(200, {"model_id": backend.models[0] if backend.models else "", "version": _text(backend, "3.0.0")})


async def _litellm_readiness(backend: SimBackend, req: _Request) -> _Response:
    if backend.hostile:  # the proxy's version, where a hostile one writes its escape sequences
        return _json(200, {"status": "healthy", "db": "Not connected", "litellm_version": _text(backend, "1.106.2")})
    return _Response(200, b'{"status":"healthy","db":"Not connected"}', _JSON)  # as captured from LiteLLM 1.106.2


async def _litellm_metrics_redirect(backend: SimBackend, req: _Request) -> _Response:
    return _Response(307, b"", None, (("location", f"/{backend.name}/metrics/"),))


# --- Prometheus metrics ------------------------------------------------------------------------------


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    escaped = (v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for v in labels.values())
    return "{" + ",".join(f'{k}="{v}"' for k, v in zip(labels, escaped)) + "}"


def _gauge(name: str, help_text: str, value: float, labels: dict[str, str] | None = None) -> str:
    return f"# HELP {name} {help_text}\n# TYPE {name} gauge\n{name}{_labels(labels or {})} {float(value)!r}\n"


def _model_label(backend: SimBackend) -> str:
    return backend.models[0] if backend.models else ""


def _vllm_metrics(b: SimBackend) -> str:
    labels = {"engine": "0", "model_name": _model_label(b)}
    return "".join((
        _gauge("vllm:num_requests_running", "Number of requests in model execution batches.", b.running, labels),
        _gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", b.waiting, labels),
        _gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", b.kv_cache, labels),
        b.ttft_histogram.render("vllm:time_to_first_token_seconds", _ENGINE_TTFT_HELP, labels),
        b.tpot_histogram.render("vllm:request_time_per_output_token_seconds", "Histogram of time_per_output_token_seconds per request.", labels),
        b.tpot_but_last_histogram.render(_TPOT_BUT_LAST, "The simulator's: time per output token up to the one before the last.", labels),
    ))  # fmt: skip


def _sglang_metrics(b: SimBackend) -> str:
    labels = {"model_name": _model_label(b)}
    return "".join((
        _gauge("sglang:num_running_reqs", "The number of running requests.", b.running, labels),
        _gauge("sglang:num_queue_reqs", "The number of requests in the waiting queue.", b.waiting, labels),
        _gauge("sglang:token_usage", "The token usage.", b.kv_cache, labels),
        b.ttft_histogram.render("sglang:time_to_first_token_seconds", _ENGINE_TTFT_HELP, labels),
    ))  # fmt: skip


def _tgi_metrics(b: SimBackend) -> str:
    return "".join((
        _gauge("tgi_queue_size", "Number of requests waiting in the queue.", b.waiting),
        _gauge("tgi_batch_current_size", "Current batch size.", b.running),
        b.tpot_histogram.render("tgi_request_mean_time_per_token_duration", "Mean time per token per request", {}),
    ))  # fmt: skip


def _llamacpp_metrics(b: SimBackend) -> str:
    return "".join((
        _gauge("llamacpp:requests_processing", "Number of requests processing", b.running),
        _gauge("llamacpp:requests_deferred", "Number of requests deferred", b.waiting),
        _gauge("llamacpp:kv_cache_usage_ratio", "KV-cache usage. 1 means 100 percent usage.", b.kv_cache),
    ))  # fmt: skip


def _litellm_metrics(b: SimBackend) -> str:
    model = _model_label(b)
    labels = {"api_provider": "openai", "model": model, "model_group": model, "requested_model": model}
    in_flight_help = "Number of HTTP requests currently in-flight on this uvicorn worker"
    ttft_help = "Time to first token for a models LLM API call"
    return "".join((
        _gauge("litellm_in_flight_requests", in_flight_help, b.running),
        b.ttft_histogram.render("litellm_llm_api_time_to_first_token_metric", ttft_help, labels),
    ))  # fmt: skip


_METRICS: dict[str, Callable[[SimBackend], str]] = {
    "vllm": _vllm_metrics,
    "sglang": _sglang_metrics,
    "tgi": _tgi_metrics,
    "llamacpp": _llamacpp_metrics,
    "litellm": _litellm_metrics,
}


def _wander(b: SimBackend, rng: random.Random) -> None:
    """One step of a bounded random walk, so the demo's gauges and sparklines move like a live server's."""
    b.running = min(16, max(0, b.running + rng.choice((-1, 0, 1))))
    b.waiting = min(12, max(0, b.waiting + rng.choice((-1, 0, 1))))
    b.kv_cache = round(min(0.98, max(0.02, b.kv_cache + rng.gauss(0, 0.03))), 3)


async def _metrics(backend: SimBackend, req: _Request) -> _Response:
    if backend.wander is not None:
        _wander(backend, backend.wander)
    if backend.fault == "nan":  # Prometheus text allows NaN and +Inf; a broken exporter sends them
        shown = replace(backend, running=float("nan"), waiting=float("inf"), kv_cache=float("-inf"))
        return _Response(200, _METRICS[backend.provider](shown).encode(), _PROMETHEUS)
    return _Response(200, _METRICS[backend.provider](backend).encode(), _PROMETHEUS)


# --- Ollama ------------------------------------------------------------------------------------------


def _ollama_name(model: str) -> str:
    """Ollama's canonical name: a model pulled without a tag is served as name:latest."""
    return model if ":" in model else f"{model}:latest"


def _iso(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


def _ollama_model(model: str) -> dict[str, Any]:
    name = _ollama_name(model)
    digest = hashlib.sha256(name.encode()).hexdigest()
    return {
        "name": name,
        "model": name,
        "modified_at": "2025-01-01T00:00:00Z",
        "size": 1_000_000_000 + int(digest[:8], 16) % 4_000_000_000,  # stable per name, a few GB
        "digest": digest,
        "details": {
            "parent_model": "",
            "format": "gguf",
            "family": "llama",
            "families": ["llama"],
            "parameter_size": "3.2B",
            "quantization_level": "Q4_K_M",
        },
    }


async def _ollama_banner(backend: SimBackend, req: _Request) -> _Response:
    return _Response(200, _text(backend, "Ollama is running").encode(), "text/plain; charset=utf-8")


async def _ollama_tags(backend: SimBackend, req: _Request) -> _Response:
    if backend.fault == "huge_body":
        return _huge_listing(backend, "models", '{"name":"filler-%07d:latest"}')
    if backend.fault == "many_models":
        return _many_models(backend, "models", "name")
    return _json(200, {"models": [_ollama_model(m) for m in _listed(backend)]})


async def _ollama_ps(backend: SimBackend, req: _Request) -> _Response:
    # keep_alive -1 ("never unload") shows as an expiry centuries away, as Ollama shows it.
    keep = timedelta(days=300 * 365) if backend.keep_alive_s < 0 else timedelta(seconds=backend.keep_alive_s)
    expires = _iso(datetime.now(timezone.utc) + keep)
    loaded = []
    names = backend.models if backend.loaded is None else backend.loaded
    for model in map(_ollama_model, names):
        loaded.append({**model, "expires_at": expires, "size_vram": model["size"]})  # fully on the GPU
    return _json(200, {"models": loaded})


async def _ollama_chat(backend: SimBackend, req: _Request) -> _Response:
    payload = req.json()
    model = payload.get("model", "")
    if _ollama_name(model) not in {_ollama_name(m) for m in backend.models}:
        raise _HttpError(404, f'model "{model}" not found, try pulling it first')
    n, hit_limit = _output_tokens(backend, (payload.get("options") or {}).get("num_predict"))
    prompt = _prompt_tokens(payload.get("messages"))

    def frame(content: str, done: bool, **extra: Any) -> dict[str, Any]:
        created_at = _iso(datetime.now(timezone.utc))
        message = {"role": "assistant", "content": content}
        if backend.reasoning == "all" and content:
            message = {"role": "assistant", "content": "", "thinking": content}
        return {"model": model, "created_at": created_at, "message": message, "done": done, **extra}

    def stats(timing: _Timing) -> dict[str, Any]:
        # Durations are what this request really took, in nanoseconds as Ollama reports them.
        out: dict[str, Any] = {
            "done_reason": "length" if hit_limit else "stop",
            "total_duration": round((time.perf_counter() - timing.received) * 1e9),
            "load_duration": 0,
            "prompt_eval_duration": round((timing.first - timing.received) * 1e9),
            "eval_duration": round((timing.last - timing.first) * 1e9),
        }
        if backend.usage:
            out.update(prompt_eval_count=prompt, eval_count=n)
        if backend.fault == "nan":
            out.update(eval_duration=float("nan"), load_duration=float("inf"), prompt_eval_duration=1e300)
        return out

    if payload.get("stream", True) is False:
        timing = _Timing(req.received)
        text = await _generate(backend, timing, n)
        return _json(200, frame(text, True, **stats(timing)))
    return _streamed(
        backend,
        req,
        n,
        content_type=_NDJSON,
        preamble=[],
        token=lambda word: _ndjson(frame(word, False)),
        epilogue=lambda timing: [_ndjson(frame("", True, **stats(timing)))],
        bad_chunk=b"{not json}\n",
    )


# --- Anthropic ---------------------------------------------------------------------------------------


async def _anthropic_models(backend: SimBackend, req: _Request) -> _Response:
    if backend.fault == "huge_body":
        return _huge_listing(backend, "data", '{"type":"model","id":"filler-%07d"}')
    if backend.fault == "many_models":
        return _many_models(backend, "data", "id")
    data = [
        {"type": "model", "id": m, "display_name": m.replace("-", " ").title(), "created_at": "2025-01-01T00:00:00Z"}
        for m in _listed(backend)
    ]
    first, last = (data[0]["id"], data[-1]["id"]) if data else (None, None)
    return _json(200, {"data": data, "has_more": False, "first_id": first, "last_id": last})


async def _anthropic_messages(backend: SimBackend, req: _Request) -> _Response:
    payload = req.json()
    model = payload.get("model", "")
    if model not in backend.models:
        raise _HttpError(404, f"model: {model}", "not_found_error")
    n, hit_limit = _output_tokens(backend, payload.get("max_tokens"))
    stop_reason = "max_tokens" if hit_limit else "end_turn"
    prompt = _prompt_tokens(payload.get("messages"))
    message = {
        "id": f"msg_{uuid.uuid4().hex[:24]}",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
    }

    if not payload.get("stream"):
        text = await _generate(backend, _Timing(req.received), n)
        answer = {**message, "content": [{"type": "text", "text": text}], "stop_reason": stop_reason}
        if backend.usage:
            answer["usage"] = {"input_tokens": prompt, "output_tokens": n}
        return _json(200, answer)

    def epilogue(timing: _Timing) -> list[bytes]:
        delta: dict[str, Any] = {"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": None}}
        if backend.usage:
            delta["usage"] = {"output_tokens": n}
        return [
            _event("content_block_stop", {"type": "content_block_stop", "index": 0}),
            _event("message_delta", delta),
            _event("message_stop", {"type": "message_stop"}),
        ]

    start_usage = {"input_tokens": prompt, "output_tokens": 1}
    empty_block = {"type": "text", "text": ""}
    return _streamed(
        backend,
        req,
        n,
        content_type=_SSE,
        preamble=[
            _event("message_start", {"type": "message_start", "message": {**message, "usage": start_usage}}),
            _event("content_block_start", {"type": "content_block_start", "index": 0, "content_block": empty_block}),
            _event("ping", {"type": "ping"}),
        ],
        token=lambda word: _event(
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": (
                {"type": "thinking_delta", "thinking": word} if backend.reasoning == "all" else {"type": "text_delta", "text": word}
            )},
        ),
        epilogue=epilogue,
        bad_chunk=b"event: content_block_delta\ndata: {not json}\n\n",
    )


# --- Routes and the server ---------------------------------------------------------------------------

_OPENAI_API: dict[tuple[str, str], _Handler] = {
    ("GET", "/v1/models"): _openai_models,
    ("POST", "/v1/chat/completions"): _openai_chat,
}
_ROUTES: dict[str, dict[tuple[str, str], _Handler]] = {
    "vllm": {
        **_OPENAI_API,
        ("GET", "/health"): _fixed(b"", None),
        ("GET", "/version"): _fixed(b'{"version":"0.32.0"}'),
        ("GET", "/metrics"): _metrics,
    },
    "sglang": {**_OPENAI_API, ("GET", "/health"): _fixed(b"", None), ("GET", "/metrics"): _metrics},
    "tgi": {
        **_OPENAI_API,
        ("GET", "/health"): _fixed(b"", None),
        ("GET", "/info"): _tgi_info,
        ("GET", "/metrics"): _metrics,
    },
    "llamacpp": {**_OPENAI_API, ("GET", "/health"): _fixed(b'{"status":"ok"}'), ("GET", "/metrics"): _metrics},
    "litellm": {
        **_OPENAI_API,
        ("GET", "/health/liveliness"): _fixed(b'"I\'m alive!"'),
        ("GET", "/health/readiness"): _litellm_readiness,
        ("GET", "/metrics"): _litellm_metrics_redirect,
        ("GET", "/metrics/"): _metrics,
    },
    "lmstudio": _OPENAI_API,
    "openai": _OPENAI_API,
    "ollama": {
        ("GET", "/"): _ollama_banner,
        ("GET", "/api/version"): _fixed(b'{"version":"0.12.0"}'),
        ("GET", "/api/tags"): _ollama_tags,
        ("GET", "/api/ps"): _ollama_ps,
        ("POST", "/api/chat"): _ollama_chat,
    },
    "anthropic": {("GET", "/v1/models"): _anthropic_models, ("POST", "/v1/messages"): _anthropic_messages},
}


def _auth_error(backend: SimBackend, req: _Request) -> _Response | None:
    """The refusal a real server sends when the key is missing or wrong; None when the request may pass.

    Only the /v1 API is guarded: like the real servers, health and metrics stay open.
    """
    if not req.path.startswith("/v1/") or backend.provider == "ollama":
        return None
    if backend.provider == "anthropic":
        if backend.api_key is not None and req.headers.get("x-api-key") != backend.api_key:
            return _error(backend, 401, "invalid x-api-key", "authentication_error")
        if "anthropic-version" not in req.headers:
            return _error(backend, 400, "anthropic-version: header is required", "invalid_request_error")
        return None
    if backend.api_key is None or req.headers.get("authorization") == f"Bearer {backend.api_key}":
        return None
    # The LiteLLM proxy reports a missing or wrong key as a 500, not a 401.
    status = 500 if backend.provider == "litellm" else 401
    return _error(backend, status, "Authentication Error, invalid or missing API key.", "authentication_error")


class Simulator:
    """One loopback listener serving every SimBackend under http://HOST:PORT/{name}."""

    def __init__(
        self,
        backends: Iterable[SimBackend],
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.backends: dict[str, SimBackend] = {}
        for backend in backends:
            if not backend.name or "/" in backend.name or backend.name in self.backends:
                raise ValueError(f"backend name {backend.name!r} must be unique, non-empty and without '/'")
            self.backends[backend.name] = backend
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        # What "flapping" keeps its phase by: a test can step it instead of sleeping through it.
        # (Token timing keeps the real clock: it is what a probe measures.)
        self._clock = clock
        self._started = 0.0
        self._thread: tuple[asyncio.AbstractEventLoop, threading.Thread] | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def url(self, name: str) -> str:
        """The base URL a client configures for backend `name`."""
        return f"{self.base_url}/{name}"

    async def start(self) -> None:
        """Bind and start serving; sets `port` when it was 0."""
        self._server = await asyncio.start_server(self._accept, self.host, self.port, start_serving=False)
        for listener in self._server.sockets:
            # Connections inherit it from the listener, so a request that arrives before its
            # connection is accepted, as a first request does, is stamped too (_SocketReader).
            kernelclock.enable(listener)
        await self._server.start_serving()
        self.port = self._server.sockets[0].getsockname()[1]
        self._started = self._clock()

    async def stop(self) -> None:
        """Stop listening and close every connection, hung and mid-stream ones included."""
        if self._server is None:
            return
        self._server.close()
        connections = list(self._connections)
        for task in connections:
            task.cancel()
        await asyncio.gather(*connections, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    async def __aenter__(self) -> Simulator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def start_in_thread(self) -> Simulator:
        """Serve from an event loop of its own in a daemon thread, for callers without a loop; returns once bound."""
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="llmtop-simulator", daemon=True)
        thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self.start(), loop).result()
        except BaseException:
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            loop.close()
            raise
        self._thread = (loop, thread)
        return self

    def stop_thread(self) -> None:
        """Undo start_in_thread: stop serving, then end the thread and its loop."""
        if self._thread is None:
            return
        loop, thread = self._thread
        self._thread = None
        asyncio.run_coroutine_threadsafe(self.stop(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()

    def _accept(self, stream: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Called in connection_made: a _SocketReader reads the socket from its first byte.
        # A task of our own rather than a coroutine callback: stop() cancels it, and asyncio's stream
        # machinery would log a cancelled callback task as an error (Python 3.11).
        try:
            reader = _SocketReader(writer) if _STAMPED_READS else _StreamRequestReader(stream)
        except OSError:  # no descriptor left for it (EMFILE): this connection ends, the rest go on
            writer.transport.abort()
            return

        def closed(_task: asyncio.Task) -> None:  # also when cancelled before it ran
            reader.close()
            writer.close()

        task = asyncio.get_running_loop().create_task(self._serve_connection(reader, writer))
        task.add_done_callback(closed)
        self._connections.add(task)
        task.add_done_callback(self._connections.discard)

    async def _serve_connection(self, reader: _SocketReader | _StreamRequestReader, writer: asyncio.StreamWriter) -> None:
        # Nagle's algorithm would hold a small chunk back until the previous one is acknowledged,
        # which shows up as tens of milliseconds of invented latency.
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while await self._serve_one(reader, writer):
                pass
        except (_Malformed, ConnectionError):
            pass  # the client sent garbage or went away: nobody is left to answer
        finally:
            reader.close()
            writer.close()

    async def _serve_one(self, reader: _SocketReader | _StreamRequestReader, writer: asyncio.StreamWriter) -> bool:
        """Read and answer one request; False when the connection must close."""
        req = await _read_request(reader)
        if req is None:
            return False
        name, _, rest = req.path[1:].partition("/")
        backend = self.backends.get(name)
        if backend is None:
            return await _send(writer, _json(404, {"error": f"no simulated backend named '{name}'"}), req.keep_alive)
        req = replace(req, path="/" + rest)
        backend.requests[req.path] += 1
        backend.headers_seen.append(req.headers)
        del backend.headers_seen[:-20]
        if req.path in _COMPLETION_PATHS and req.method == "POST":
            try:
                backend.bodies.append(json.loads(req.body or b"{}"))
            except ValueError:
                pass
            del backend.bodies[:-10]
        if backend.hold is not None and req.path in _COMPLETION_PATHS:
            await backend.hold.wait()
        fault = backend.fault
        if fault == "hang":
            await asyncio.get_running_loop().create_future()  # never resolves: stop() cancels it
        if fault == "reset":
            # Linger on with a zero timeout makes close() send RST instead of FIN.
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return False
        response = await self._respond(backend, req)
        if fault == "slow_headers":
            # Token deadlines stay anchored at the request, so a delayed stream then arrives in a burst,
            # as it does from behind a stalled proxy.
            await asyncio.sleep(_arg(backend, 30))
        return await _send(writer, response, req.keep_alive)

    async def _respond(self, backend: SimBackend, req: _Request) -> _Response:
        """The backend's answer, then what a hostile one does to it (HOSTILE_TEXT in its errors,
        the request's headers echoed back)."""
        response = await self._answer(backend, req)
        if response.status >= 400 and (backend.hostile or backend.echo_headers) and isinstance(response.body, bytes):
            message = "request refused"
            if backend.hostile:
                message += f": {HOSTILE_TEXT}"
            if backend.echo_headers:
                # The whole header block, then the key again, cut off mid-way as a log truncation would.
                sent = "; ".join(f"{k}: {v}" for k, v in req.headers.items())
                key = req.headers.get("authorization") or req.headers.get("x-api-key") or ""
                message += f"; you sent {sent}; first bytes of your key: {key[: max(4, len(key) * 2 // 3)]}"
            kept = tuple((k, v) for k, v in response.headers if k.lower() == "retry-after")
            return _error(backend, response.status, message, "invalid_request_error", kept)
        return response

    async def _answer(self, backend: SimBackend, req: _Request) -> _Response:
        """Apply the backend's status-level faults and auth, then its protocol's handler."""
        fault = backend.fault
        is_health = req.path in _HEALTH_PATHS
        is_completion = req.path in _COMPLETION_PATHS
        if fault == "5xx":
            return _error(backend, 503 if is_health else 500, "simulated server error", "server_error")
        if fault == "flapping" and self._flapped_down(backend):
            return _error(backend, 503, "simulated outage (flapping)", "unavailable_error")
        refusal = _auth_error(backend, req)
        if refusal is not None:
            return refusal
        if fault == "loading" and (is_health or is_completion):
            return _error(backend, 503, "Loading model", "unavailable_error")
        if fault == "429" and is_completion:
            retry_after = (("retry-after", str(round(_arg(backend, 30)))),)
            message = "Rate limit reached; retry after the Retry-After delay."
            return _error(backend, 429, message, "rate_limit_error", retry_after)
        if fault == "retry_forever":  # on every path: polls and probes alike are told to go away for ever
            message = "Rate limit reached; come back in three thousand years."
            return _error(backend, 429, message, "rate_limit_error", (("retry-after", "99999999999"),))
        if fault == "gzip_bomb" and (req.method == "POST" or req.path in ("/v1/models", "/api/tags")):
            content_type = _SSE if req.method == "POST" else _JSON
            return _Response(200, _gzip_bomb(), content_type, (("content-encoding", "gzip"),))
        if backend.health_route is not None and req.path == backend.health_route[0]:
            return _Response(backend.health_route[1], b"", None)
        handler = _ROUTES[backend.provider].get((req.method, req.path))
        if handler is None:
            return _error(backend, 404, f"no route for {req.method} {req.path}", "not_found_error")
        try:
            response = await handler(backend, req)
        except _HttpError as exc:
            return _error(backend, exc.status, exc.message, exc.kind)
        # Streams break their own chunks (see _streamed); here every whole JSON body is broken.
        if fault == "bad_json" and response.status == 200 and response.content_type == _JSON:
            if isinstance(response.body, bytes):
                return _Response(200, _BAD_JSON, _JSON)
        return response

    def _flapped_down(self, backend: SimBackend) -> bool:
        """Up for fault_arg seconds, down for as long, alternating from the simulator's start."""
        period = _arg(backend, 5.0)
        return int((self._clock() - self._started) / period) % 2 == 1


# --- Fleets and their configs ------------------------------------------------------------------------

# The demo's "missing model" backend: the config expects a model it does not serve.
_DEMO_UNSERVED = {"vllm-missing": ["meta-llama/Llama-3.1-70B-Instruct"]}


def demo_fleet(seed: int | None = None) -> list[SimBackend]:
    """A varied fleet for `llmtop --demo`: every provider, a flapping one, a rate-limited one, a
    missing model, and a hostile one (escape sequences in its model ids and errors, NaN metrics).

    The gauges wander on every scrape; pass `seed` for the same walk on every run.
    """
    llama_8b = "meta-llama/Llama-3.1-8B-Instruct"
    fleet = [
        SimBackend("vllm-fast", "vllm", [llama_8b, "llama-3.1-8b-sql-lora"], 20, 5, running=4, kv_cache=0.35),
        SimBackend("sglang-70b", "sglang", ["meta-llama/Llama-3.3-70B-Instruct"], 180, 28, running=9, kv_cache=0.7),
        SimBackend("tgi-mistral", "tgi", ["mistralai/Mistral-7B-Instruct-v0.3"], 90, 15, running=2),
        SimBackend("llamacpp-ws", "llamacpp", ["qwen2.5-coder-7b-instruct"], 120, 22, kv_cache=0.2),
        SimBackend("ollama-laptop", "ollama", ["llama3.2", "qwen2.5:7b"], 250, 60),
        SimBackend("lmstudio-mac", "lmstudio", ["qwen2.5-7b-instruct"], 300, 25),
        SimBackend("litellm-gw", "litellm", ["gpt-4o-mini", "claude-3-5-haiku"], 420, 12, running=3),
        SimBackend("anthropic-api", "anthropic", ["claude-sonnet-4-5"], 600, 20),
        SimBackend("vllm-flaky", "vllm", [llama_8b], 60, 10, fault="flapping", fault_arg=20),
        SimBackend("openai-ratelimited", "openai", ["gpt-4o-mini"], 350, 15, fault="429", fault_arg=45),
        SimBackend("vllm-missing", "vllm", [llama_8b], 45, 9, running=2, kv_cache=0.5),
        SimBackend("vllm-hostile", "vllm", [llama_8b], 70, 12, fault="nan", hostile=True),
    ]
    for backend in fleet:
        # String seeds hash the same on every run, so each backend walks its own reproducible path.
        backend.wander = random.Random(None if seed is None else f"{seed}:{backend.name}")
    return fleet


def uniform_fleet(n: int, ttft_ms: float = 40.0, gap_ms: float = 10.0, provider: str = "vllm") -> list[SimBackend]:
    """n identical backends named sim-0001..., for benchmarks."""
    return [SimBackend(f"sim-{i:04d}", provider, ttft_ms=ttft_ms, gap_ms=gap_ms) for i in range(1, n + 1)]


def demo_config_toml(sim: Simulator, backends: Iterable[SimBackend]) -> str:
    """The llmtop config that watches `backends` on the running `sim`, as TOML text."""
    entries: list[dict[str, Any]] = []
    alerted = False
    for backend in backends:
        entry: dict[str, Any] = {
            "name": backend.name,
            "provider": backend.provider,
            "url": sim.url(backend.name),
            "models": [*backend.models, *_DEMO_UNSERVED.get(backend.name, [])],
        }
        if backend.provider == "vllm" and not alerted:
            entry["alert"] = [{"metric": "vllm:num_requests_waiting", "above": 10}]
            alerted = True
        entries.append(entry)
    return tomli_w.dumps({"settings": {"health_interval_s": 2, "probe_interval_s": 10}, "backend": entries})


# --- Command line ------------------------------------------------------------------------------------


async def _serve_until_signalled(
    backends: list[SimBackend], port: int, config_out: Path | None, *, parent_pipe: bool = False, remove_dir: Path | None = None
) -> None:
    try:
        async with Simulator(backends, port=port) as sim:
            config = demo_config_toml(sim, backends)
            if config_out is None:
                print(config, end="", flush=True)
            else:
                config_out.write_text(config, encoding="utf-8")
            print(f"listening on {sim.base_url}", file=sys.stderr, flush=True)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.add_signal_handler(sig, stop.set)
            if parent_pipe:
                # The parent holds the other end of stdin and never writes: end of file means it has
                # gone, even by SIGKILL, which leaves it no chance to stop us.
                def stdin_readable() -> None:
                    try:
                        more = os.read(sys.stdin.fileno(), 4096)
                    except OSError:
                        more = b""
                    if not more:
                        loop.remove_reader(sys.stdin.fileno())
                        stop.set()

                loop.add_reader(sys.stdin.fileno(), stdin_readable)
            await stop.wait()
    finally:
        if remove_dir is not None:
            shutil.rmtree(remove_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llmtop.simulator",
        description="Serve simulated LLM backends on 127.0.0.1 and print the llmtop config that watches them.",
    )
    fleet = parser.add_mutually_exclusive_group()
    fleet.add_argument("--demo", action="store_true", help="the varied demo fleet (the default)")
    fleet.add_argument("--count", type=int, metavar="N", help="N identical vLLM backends, for benchmarks")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (default: any free port)")
    parser.add_argument("--ttft-ms", type=float, default=40.0, help="time to first token with --count (default 40)")
    parser.add_argument("--gap-ms", type=float, default=10.0, help="gap between tokens with --count (default 10)")
    parser.add_argument("--config-out", type=Path, metavar="PATH", help="write the config here instead of to stdout")
    parser.add_argument(
        "--parent-pipe", action="store_true",
        help="stop when standard input closes (the process that started this one has ended)",
    )
    parser.add_argument("--remove-on-exit", type=Path, metavar="DIR", help="delete this directory when stopping")
    args = parser.parse_args(argv)
    if args.count is not None and args.count < 1:
        parser.error("--count must be at least 1")
    backends = uniform_fleet(args.count, args.ttft_ms, args.gap_ms) if args.count else demo_fleet()
    asyncio.run(
        _serve_until_signalled(
            backends, args.port, args.config_out, parent_pipe=args.parent_pipe, remove_dir=args.remove_on_exit
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
