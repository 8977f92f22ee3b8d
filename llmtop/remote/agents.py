"""Another llmtop agent (`llmtop serve`) as a source: its fleet live from its event stream, its admin API for actions.

One AgentSource per agent. It reads /api/v1/events (the whole fleet first, then each backend
that changed), so a TUI attached to ten agents of 300 backends costs what changes, not ten full
documents a second. A lost stream is retried with backoff and jitter; while it is lost every row
of that agent keeps its last values with `stale_since` set: the backends are not known to be
down, only unseen. Actions go to the agent's admin API with the token from `token_env`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import time
from collections import deque
from typing import Callable
from urllib.parse import quote, urlsplit, urlunsplit

import httpx

from llmtop import wire
from llmtop.redact import Redactor
from llmtop.remote import ActionRefused, SourceState, stop_following
from llmtop.snapshot import BackendSnapshot, Event, GpuStatus
from llmtop.transport import shared_ssl_context

DEFAULT_TOKEN_ENV = "LLMTOP_TOKEN"
CONNECT_S = 5.0
READ_S = 40.0  # the agent writes at least a keep-alive every 15 s: silence past this is a lost stream
BACKOFF_S = (0.5, 10.0)  # first retry, longest wait: an agent back is seen within 10 s
LINE_MAX = 4 * 1024 * 1024  # one event's JSON; a whole fleet document of thousands of backends fits
EVENTS_KEPT = 200
HISTORY_KEPT = 120  # points per sparkline, as the engine keeps
SLICE_S = 0.004  # the longest run of events taken before the loop is let go (a key waits no longer)
SKEW_SAID_S = 2.0  # a clock further from ours than this is said in the header


def agent_name(url: str) -> str:
    """The default name of an agent: its host (and port when not the default)."""
    parts = urlsplit(url)
    return parts.netloc.rsplit("@", 1)[-1] or url


class AgentSource:
    def __init__(
        self,
        url: str,
        name: str | None = None,
        token_env: str | None = None,
        *,
        clock: Callable[[], float] = time.time,
        on_change: Callable[[], None] | None = None,
        backoff: tuple[float, float] = BACKOFF_S,
    ):
        parts = urlsplit(url.rstrip("/"))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"an agent's URL is http(s)://host:port, not {url!r}")
        if parts.username or parts.password:
            raise ValueError("an agent's URL holds no credentials: put its token in an environment variable and name it with token_env")
        self.url = urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
        self.name = name or agent_name(self.url)
        self.token_env = token_env or DEFAULT_TOKEN_ENV
        self._clock = clock
        self._on_change = on_change or (lambda: None)
        self._backoff = backoff
        self._seq = 0
        self._ever_connected = False
        self._seen_events: deque[tuple] = deque(maxlen=EVENTS_KEPT)
        self._backends: dict[str, BackendSnapshot] = {}
        self._order: list[str] = []
        self._gpus = GpuStatus(message=None)
        self._events: deque[Event] = deque(maxlen=EVENTS_KEPT)
        self._history: dict[str, dict[str, deque]] = {}
        self._standing = "connecting"
        self._since: float | None = clock()
        self._detail: str | None = None
        self._lost_at: float | None = None
        self._skew: float | None = None
        self._task: asyncio.Task | None = None
        self._client: httpx.AsyncClient | None = None
        self._cache: tuple[BackendSnapshot, ...] | None = None
        self.connected = asyncio.Event()  # set on each (re)connect; tests and check wait on it

    # -- the Source protocol ---------------------------------------------------------------

    def state(self) -> SourceState:
        detail = self._detail
        if self._standing == "connected" and self._skew is not None and abs(self._skew) > SKEW_SAID_S:
            detail = f"its clock is {abs(self._skew):.0f} s {'ahead of' if self._skew > 0 else 'behind'} this machine's: ages are off by that much"
        return SourceState(
            name=self.name,
            url=self.url,
            standing=self._standing,
            since=self._since,
            detail=detail,
            can_act=bool(self._token()),
            backends=len(self._backends),
        )

    def backends(self) -> tuple[BackendSnapshot, ...]:
        if self._cache is None:
            self._cache = tuple(self._backends[n] for n in self._order)
        return self._cache

    def gpus(self) -> GpuStatus:
        return self._gpus

    def events(self) -> tuple[Event, ...]:
        return tuple(self._events)

    async def start(self) -> None:
        self._client = httpx.AsyncClient(trust_env=False, verify=shared_ssl_context(), timeout=httpx.Timeout(READ_S, connect=CONNECT_S))
        self._task = asyncio.create_task(self._follow(), name=f"llmtop:agent {self.name}")

    async def stop(self) -> None:
        task, client, self._task, self._client = self._task, self._client, None, None
        await stop_following(task, client)

    async def act(self, backend: str, action: str) -> str:
        return await self._post(f"/api/v1/backends/{quote(backend, safe='')}/{action}")

    async def probe_all(self) -> str:
        return await self._post("/api/v1/probe")

    async def _post(self, path: str) -> str:
        token = self._token()
        if not token:
            raise ActionRefused(f"read-only: set {self.token_env} to {self.name}'s admin token")
        client = self._client or httpx.AsyncClient(trust_env=False, verify=shared_ssl_context())
        try:
            response = await client.post(f"{self.url}{path}", headers={"Authorization": f"Bearer {token}"}, timeout=CONNECT_S * 2)
            line = _first_line(response.text)
        except httpx.HTTPError as exc:
            raise ActionRefused(f"{self.name}: {self._safe(str(exc) or type(exc).__name__)}") from None
        finally:
            if client is not self._client:
                await client.aclose()
        if response.status_code in (401, 403):
            raise ActionRefused(f"{self.name} refused ({response.status_code}): {line}; set {self.token_env} to its admin token")
        if response.status_code >= 300:
            raise ActionRefused(f"{self.name} ({response.status_code}): {line}")
        return f"{self.name}: {line}"

    async def fetch_once(self) -> None:
        """The agent's fleet now, in one request (`check`): connected, or lost with the reason."""
        client = self._client or httpx.AsyncClient(trust_env=False, verify=shared_ssl_context(), timeout=httpx.Timeout(READ_S, connect=CONNECT_S))
        try:
            headers = {"Accept-Encoding": "identity"}
            if self._token():
                headers["Authorization"] = f"Bearer {self._token()}"
            async with client.stream("GET", f"{self.url}/api/v1/fleet", headers=headers) as response:
                if response.status_code in (401, 403):
                    raise _Unauthorized(f"{response.status_code} from the agent: set {self.token_env} to its token")
                if response.status_code != 200:
                    raise ValueError(f"the agent answered {response.status_code} for /api/v1/fleet")
                body = bytearray()
                async for chunk in response.aiter_raw():
                    body += chunk
                    if len(body) > LINE_MAX:
                        raise ValueError(f"a fleet document of more than {LINE_MAX // (1024 * 1024)} MiB: not one llmtop sends")
            self._take("fleet", body.decode("utf-8", "replace"))
        except _Unauthorized as exc:
            self._lose("unauthorized", str(exc))
        except (httpx.HTTPError, OSError, wire.WireError, ValueError) as exc:
            self._lose("error", self._safe(_describe(exc)))
        finally:
            if client is not self._client:
                await client.aclose()

    # -- following the event stream ------------------------------------------------------------

    def _token(self) -> str:
        return os.environ.get(self.token_env, "")

    def _safe(self, text: str) -> str:
        token = self._token()
        return Redactor([token] if token else [])(text)[:300]

    async def _follow(self) -> None:
        failures = 0
        while True:
            try:
                await self._stream()
                why = "the agent ended its event stream"
            except asyncio.CancelledError:
                raise
            except _Unauthorized as exc:
                self._lose("unauthorized", str(exc))
                why = None
            except (httpx.HTTPError, OSError, wire.WireError, ValueError) as exc:
                why = self._safe(_describe(exc))
            if why is not None:
                self._lose("stale" if self._backends else "error", why)
            failures = 0 if self._standing == "connected" else failures + 1
            # Exponential, capped, with full jitter: ten TUIs that lost one agent do not return in step.
            wait = min(self._backoff[1], self._backoff[0] * (2 ** min(failures, 10)))
            await asyncio.sleep(random.uniform(wait / 2, wait))

    async def _stream(self) -> None:
        assert self._client is not None
        headers = {"Accept": "text/event-stream", "Accept-Encoding": "identity"}  # read raw, so bounded
        token = self._token()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        async with self._client.stream("GET", f"{self.url}/api/v1/events", headers=headers) as response:
            if response.status_code in (401, 403):
                raise _Unauthorized(f"{response.status_code} from the agent: set {self.token_env} to its token")
            if response.status_code != 200:
                raise ValueError(f"the agent answered {response.status_code} for its event stream")
            kind, data = None, []
            slice_from = time.perf_counter()
            async for line in _lines(response):
                if line == "":
                    if kind is not None and data:
                        self._take(kind, "\n".join(data))
                        # One read can hold hundreds of events (an agent's whole half second); taking
                        # them all at once held every key behind them for a tenth of a second.
                        if time.perf_counter() - slice_from > SLICE_S:
                            await asyncio.sleep(0)
                            slice_from = time.perf_counter()
                    kind, data = None, []
                elif line.startswith(":"):
                    continue  # a keep-alive
                elif line.startswith("event:"):
                    kind = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].lstrip(" "))

    def _take(self, kind: str, text: str) -> None:
        doc = json.loads(text, parse_constant=lambda _token: None)
        now = self._clock()
        if kind == "fleet":
            at, backends, gpus = wire.fleet(doc, agent=self.name)
            self._skew = at - now
            self._order = [b.name for b in backends]
            self._backends = {b.name: self._with_history(b) for b in backends}
            self._gpus = gpus
            if self._lost_at is not None and self._ever_connected:
                self._say(f"connected again; its rows were stale from {time.strftime('%H:%M:%S', time.localtime(self._lost_at))}", "info")
            self._standing, self._since, self._detail, self._lost_at = "connected", now, None, None
            self._cache = None
            self._ever_connected = True
            self.connected.set()
        elif kind == "backend":
            try:
                b = wire.backend(doc, agent=self.name)
            except wire.WireError:
                return
            if b.name not in self._backends:
                self._order.append(b.name)
            self._backends[b.name] = self._with_history(b)
            self._cache = None
        elif kind == "removed":
            name = doc.get("name") if isinstance(doc, dict) else None
            if name in self._backends:
                del self._backends[name]
                self._order.remove(name)
                self._history.pop(name, None)
                self._cache = None
        elif kind == "gpus":
            self._gpus = wire.gpus(doc)
        elif kind == "event":
            event = wire.event(doc, self.name)
            key = None if event is None else (event.at, event.backend, event.message)
            if event is not None and key not in self._seen_events:  # a reconnect replays the recent ones
                self._seen_events.append(key)
                self._events.append(event)
        elif kind == "error":
            message = doc.get("message") if isinstance(doc, dict) else None
            raise ValueError(f"the agent said: {str(message)[:200]}")
        self._on_change()

    def _with_history(self, b: BackendSnapshot) -> BackendSnapshot:
        """The agent sends each backend's present values; the sparklines are the points seen since
        this client connected (the agent's own history is not sent: a Prometheus source has it)."""
        h = self._history.setdefault(b.name, {k: deque(maxlen=HISTORY_KEPT) for k in ("ttft", "tps", "latency", "queue")})
        p = b.last_ok_probe
        if p is not None and p.ttft_ms is not None and (not h["ttft"] or h["ttft"][-1][0] < p.at):
            h["ttft"].append((p.at, p.ttft_ms))
            if p.tokens_per_s is not None:
                h["tps"].append((p.at, p.tokens_per_s))
        at = b.last_health_at
        if at is not None and b.latency_ms is not None and (not h["latency"] or h["latency"][-1][0] < at):
            h["latency"].append((at, b.latency_ms))
            if b.metrics is not None and b.metrics.requests_waiting is not None:
                h["queue"].append((at, b.metrics.requests_waiting))
        self._seq += 1  # this client's own count: the agent's is not sent, and restarts with it
        return dataclasses.replace(
            b,
            seq=self._seq,
            ttft_history=tuple(h["ttft"]),
            tps_history=tuple(h["tps"]),
            latency_history=tuple(h["latency"]),
            queue_history=tuple(h["queue"]),
        )

    def _lose(self, standing: str, why: str) -> None:
        now = self._clock()
        if self._lost_at is None:
            self._lost_at = now
            if self._backends:
                self._say(f"lost ({why}): its {len(self._backends)} backends are shown as they were, stale", "warning")
            self._seq += 1
            self._backends = {n: dataclasses.replace(b, stale_since=now, seq=self._seq) for n, b in self._backends.items()}
            self._cache = None
        if standing != self._standing:
            self._since = now if standing != "stale" else self._lost_at
        self._standing, self._detail = standing, why
        self.connected.clear()
        self._on_change()


    def _say(self, message: str, level: str) -> None:
        """An event about the agent itself, in this screen's log (backend None: the log names the agent)."""
        self._events.append(Event(self._clock(), None, "agent", message, level))


class _Unauthorized(Exception):
    pass


async def _lines(response: httpx.Response):
    """The stream's lines (LF or CRLF), each bounded: an agent cannot make this hold a line of gigabytes."""
    pending = b""
    async for chunk in response.aiter_raw():
        pending += chunk
        while True:
            cut = pending.find(b"\n")
            if cut < 0:
                if len(pending) > LINE_MAX:
                    raise ValueError(f"an event of more than {LINE_MAX // (1024 * 1024)} MiB: not a fleet llmtop sends")
                break
            line, pending = pending[:cut], pending[cut + 1 :]
            yield line.rstrip(b"\r").decode("utf-8", "replace")


def _first_line(text: str) -> str:
    return (text.strip().splitlines() or ["(no answer)"])[0][:300]


def _describe(exc: BaseException) -> str:
    if isinstance(exc, httpx.ConnectError):
        return "cannot connect (is `llmtop serve` running there?)"
    if isinstance(exc, (httpx.ReadTimeout,)):
        return f"no word from the agent for {READ_S:.0f} s"
    if isinstance(exc, httpx.RemoteProtocolError):
        return "the connection was cut"
    return str(exc) or type(exc).__name__
