"""serve's HTTP endpoints (aiohttp.web, on a loop of its own beside the engine's): liveness, readiness, metrics, the fleet, events, admin."""

from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import json
import os
import socket
import time
from typing import Callable

from aiohttp import web

from llmtop.config import ServeSettings, split_address
from llmtop.engine import Engine
from llmtop.serve import answers
from llmtop.serve.answers import STALL_S
from llmtop.serve.board import BoardServer
from llmtop.serve.front import FORWARDED_FOR, MAX_REQUEST_BYTES, Front
from llmtop.serve.exporter import Exposition, content_type, wants_openmetrics
from llmtop.snapshot import Event, FleetSnapshot
from llmtop.sanitize import for_terminal
from llmtop.state import LIFTS, StateError

SCHEMA = 1  # of /api/v1/fleet and /api/v1/events; bumped when a field changes meaning
EVENT_QUEUE = 1000  # events held for one slow event-stream client before it is let go
KEEPALIVE_S = 15.0
WRITE_S = 5.0  # an event-stream client that takes longer to accept a write is let go
TICK_S = 0.5  # how often an event stream looks for changed backends
RECENT_EVENTS = 50  # sent after the fleet to each new event-stream client
ACTIONS = ("drain", "undrain", "disable", "enable", "probe")
# Between scrapes, /metrics' kept lines are brought up to date this often (the render thread, a
# millisecond or two over 500 backends when little changed), so that a scrape writes only what
# changed since: for as long as scrapes keep coming, up to WARM_FOR_S after the last.
WARM_EVERY_S = 1.0
WARM_FOR_S = 300.0


def fleet_document(fleet: FleetSnapshot) -> dict:
    """What `llmtop check --json` prints, with a schema version for clients that read it live."""
    return {"schema": SCHEMA, **fleet.to_json()}


def event_document(event: Event) -> dict:
    return {"at": round(event.at, 3), "backend": event.backend, "kind": event.kind, "level": event.level, "message": event.message}


def _text(status: int, line: str) -> web.Response:
    return web.Response(status=status, text=line.rstrip("\n") + "\n", content_type="text/plain")


def fleet_json(fleet: FleetSnapshot) -> str:
    """json.dumps(fleet_document(fleet)), byte for byte, written one backend at a time: one call
    over 500 backends holds the GIL for 12 ms, and every readiness answer with it (loopthread.py)."""
    doc = fleet_document(fleet)
    backends = doc["backends"]
    doc["backends"] = []
    # The first '"backends": []' is the key's: only "schema", "at" and "time" (a number and a
    # date) come before it, and inside a JSON string a quote is always escaped.
    head, _, tail = json.dumps(doc, allow_nan=False).partition('"backends": []')
    return head + '"backends": [' + ", ".join(json.dumps(b, allow_nan=False) for b in backends) + "]" + tail


class ServeSite(BoardServer):
    """The endpoints over one engine. Every answer comes from the engine's latest snapshot: a
    balancer asking is never kept waiting on a backend, nor on the engine's loop.

    aiohttp runs on a thread of its own (loopthread.py). Readiness is answered there from the
    published table (board.py); what needs the engine (a snapshot, an admin action) is asked of
    the engine's loop; rendering /metrics and the fleet's JSON runs on a third thread, so that
    neither the readiness answers nor the probes' timing waits for it longer than the GIL's
    switch interval.

    `llmtop serve` binds its port before it starts (`sock`) and answers readiness in a process of
    its own (`front`, front.py): this site then reads only the connections the front hands it,
    and takes the port back if the front ends. The screen's `--listen` has neither."""

    def __init__(
        self,
        engine: Engine,
        listen: str,
        *,
        settings: Callable[[], ServeSettings] | None = None,
        sock: socket.socket | None = None,
        front: Front | None = None,
        relay_path: str | None = None,
    ):
        super().__init__(engine, settings, "llmtop-http", front=front)
        self.listen = listen
        self._sock = sock
        self._relay_path = relay_path  # where the front relays what it cannot answer (front.py)
        self._runner: web.AppRunner | None = None
        self._closing: asyncio.Event | None = None  # the thread's
        self._exposition = Exposition(engine.snapshot, lambda: self._settings().ready_when)
        self._render = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="llmtop-render")  # one: the cache is shared
        self._scraped: tuple[float, bool] | None = None  # (time.monotonic(), OpenMetrics?) of the last /metrics
        self._warming: asyncio.Task | None = None  # the thread's

    # -- lifecycle ------------------------------------------------------------------------------

    async def _start(self) -> int:
        self._closing = asyncio.Event()
        self._warming = asyncio.ensure_future(self._keep_warm())
        host, port = split_address(self.listen)
        app = web.Application(client_max_size=MAX_REQUEST_BYTES)
        app.add_routes(
            [
                web.get("/livez", self.livez),
                web.get("/readyz", self.readyz),
                web.get("/backends/{name}/ready", self.backend_ready),
                web.get("/metrics", self.metrics),
                web.get("/api/v1/fleet", self.fleet),
                web.get("/api/v1/events", self.events),
                web.post("/api/v1/backends/{name}/{action}", self.admin),
                web.post("/api/v1/probe", self.probe_all),
            ]
        )
        app.on_shutdown.append(self._shutdown)
        # No access log: a balancer asking every second would drown the event log.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)  # event streams end on their own (on_shutdown)
        await self._runner.setup()
        if self._sock is not None:
            if self._front is not None and not self._front.lost:
                await web.UnixSite(self._runner, self._relay_path).start()
                asyncio.get_running_loop().add_reader(self._front.ctl.fileno(), self._take)
            else:
                await web.SockSite(self._runner, self._sock).start()
            return self._sock.getsockname()[1]
        site = web.TCPSite(self._runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            self._runner = None
            raise OSError(exc.errno, f"cannot listen on {self.listen}: {exc.strerror}") from None
        return self._runner.addresses[0][1]

    def _take(self) -> None:
        """On this thread: the connections the front handed over, read from their first byte by
        this site; once the front is gone, the port itself."""
        loop = asyncio.get_running_loop()
        conns = self._front.receive()
        for conn in conns or ():
            conn.setblocking(False)
            loop.create_task(loop.connect_accepted_socket(self._runner.server, conn))
        if conns is None:
            loop.remove_reader(self._front.ctl.fileno())
            self._front.give_up()
            loop.create_task(self._take_the_port())

    async def _take_the_port(self) -> None:
        self._front.reap()
        if self._runner is None or self._closing.is_set():
            return
        await web.SockSite(self._runner, self._sock).start()
        self._thread.to_home(
            self.engine.emit,
            Event(time.time(), None, "serve", "the readiness front ended: serve answers readiness itself now (slower under load)", "warning"),
        )

    def _after_stop(self) -> None:
        self._render.shutdown(wait=False)

    async def _stop(self) -> None:
        self._closing.set()
        if self._warming is not None:
            self._warming.cancel()
        if self._front is not None and not self._front.lost:
            asyncio.get_running_loop().remove_reader(self._front.ctl.fileno())
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _shutdown(self, _app) -> None:
        self._closing.set()  # event streams end at once, not after the shutdown timeout

    # -- health of llmtop itself ------------------------------------------------------------

    async def livez(self, request: web.Request) -> web.Response:
        stalled = self._board.stalled()
        if stalled is not None:
            return _text(503, f"the event loop missed its heartbeat for {stalled:.1f}s")
        try:
            problem = await asyncio.wait_for(self._thread.on_home(self.engine.alive), STALL_S)
        except asyncio.TimeoutError:
            return _text(503, f"the event loop did not answer within {STALL_S:g}s")
        return _text(503, problem) if problem else _text(200, "ok")

    async def readyz(self, request: web.Request) -> web.Response:
        return _text(*answers.readyz(self._board.stalled(), self._board.table.pending))

    # -- readiness per backend ---------------------------------------------------------------

    async def backend_ready(self, request: web.Request) -> web.Response:
        """From the published table (board.py), without waiting on the engine's loop; what the
        engine would answer at this instant (readiness.readiness of its latest snapshot)."""
        stalled = self._board.stalled()
        if stalled is not None:
            return _text(*answers.backend_ready(stalled, None))
        name = request.match_info["name"]
        current, a = self._board.current(name)
        if not current:
            a = await self._thread.on_home(self._board.ask, name)
        return _text(*answers.backend_ready(None, None if a is None else (a.ready, a.reason)))

    # -- metrics and the fleet -----------------------------------------------------------------

    async def metrics(self, request: web.Request) -> web.Response:
        """From the snapshots the engine published (board.py), without waiting on its loop, and
        rendered on the render thread."""
        openmetrics = wants_openmetrics(request.headers.get("Accept", ""))
        self._scraped = (time.monotonic(), openmetrics)
        fleet = await self._published()
        ready_when = self._settings().ready_when
        body = await asyncio.get_running_loop().run_in_executor(self._render, self._exposition.render_fleet, fleet, ready_when, openmetrics)
        return web.Response(body=body, headers={"Content-Type": content_type(openmetrics)})

    async def _published(self) -> FleetSnapshot:
        backends = self._board.backends()
        if backends is None:
            return await self._thread.on_home(self.engine.snapshot)
        # what the exposition reads of Engine.snapshot(): the time, the backends, the GPUs
        return FleetSnapshot(at=self.engine.wall(), backends=backends, gpu=self.engine.gpu_status, events=())

    async def _keep_warm(self) -> None:
        """Bring /metrics' kept lines up to date every WARM_EVERY_S while scrapes come (see there):
        a scrape every 15-60 s would otherwise meet every backend changed and write them all.
        With a readiness front, the whole body goes to it each time, and it answers the scrapes
        itself (front.py), in a process whose answers wait on no thread of serve's."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(WARM_EVERY_S)
            scraped = max((s for s in (self._scraped, self._front.scraped if self._front else None) if s), default=None)
            if scraped is None or time.monotonic() - scraped[0] > WARM_FOR_S:
                continue
            fleet = await self._published()
            ready_when, openmetrics = self._settings().ready_when, scraped[1]
            front = self._front if self._front is not None and not self._front.lost else None
            try:
                if front is None:
                    await loop.run_in_executor(self._render, self._exposition.refresh, fleet, ready_when, openmetrics)
                else:
                    body = await loop.run_in_executor(self._render, self._exposition.render_fleet, fleet, ready_when, openmetrics)
                    self._thread.to_home(front.metrics, openmetrics, body)
            except RuntimeError:  # the render thread is shut down: serve is stopping
                return

    async def fleet(self, request: web.Request) -> web.Response:
        fleet = await self._thread.on_home(self.engine.snapshot)
        body = await asyncio.get_running_loop().run_in_executor(self._render, fleet_json, fleet)
        return web.Response(text=body, content_type="application/json")

    async def events(self, request: web.Request) -> web.StreamResponse:
        """Server-Sent Events: the whole fleet first, then each backend whose state changed, the
        GPUs when they change, and every engine event as it happens. A client that reads too
        slowly is let go rather than buffered for."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        await response.prepare(request)
        queue: asyncio.Queue[Event] = asyncio.Queue(maxsize=EVENT_QUEUE)
        overflow = asyncio.Event()

        def put(event: Event) -> None:
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                overflow.set()

        def listen(event: Event) -> None:  # on the engine's loop
            self._thread.call_soon(put, event)

        unsubscribe = await self._thread.on_home(self.engine.subscribe, listen)
        try:
            fleet = await self._thread.on_home(self.engine.snapshot)
            await _send(response, "fleet", fleet_json(fleet))
            for event in fleet.events[-RECENT_EVENTS:]:  # a screen that connects sees what led here
                await _send(response, "event", event_document(event))
            seqs = {b.name: b.seq for b in fleet.backends}
            gpu = fleet.gpu
            last_write = time.monotonic()
            while not self._closing.is_set():
                if overflow.is_set():
                    await _send(response, "error", {"message": "too slow: more than 1000 events behind; reconnect"})
                    break
                try:
                    event = await asyncio.wait_for(queue.get(), TICK_S)
                except asyncio.TimeoutError:
                    event = None
                if event is not None:
                    await _send(response, "event", event_document(event))
                    last_write = time.monotonic()
                fleet = await self._thread.on_home(self.engine.snapshot)
                for b in fleet.backends:
                    if seqs.get(b.name) != b.seq:
                        seqs[b.name] = b.seq
                        await _send(response, "backend", b.to_json(fleet.at))
                        last_write = time.monotonic()
                gone = [name for name in seqs if fleet.backend(name) is None]
                for name in gone:  # a reload removed it
                    del seqs[name]
                    await _send(response, "removed", {"name": name})
                if fleet.gpu is not gpu and fleet.gpu != gpu:
                    gpu = fleet.gpu
                    await _send(response, "gpus", {"gpus": [g.to_json() for g in gpu.gpus], "gpu_message": gpu.message})
                if time.monotonic() - last_write > KEEPALIVE_S:
                    await asyncio.wait_for(response.write(b": keepalive\n\n"), WRITE_S)
                    last_write = time.monotonic()
        except (ConnectionResetError, asyncio.CancelledError, asyncio.TimeoutError):
            pass  # the client went away, stopped reading, or the server is stopping
        finally:
            self._thread.to_home(unsubscribe)
        return response

    # -- admin -----------------------------------------------------------------------------

    async def _refusal(self, request: web.Request) -> web.Response | None:
        """None when the request carries the admin token; else the answer that refuses it."""
        await request.read()  # no action takes a body; reading it enforces the size bound (413 past it)
        settings = self._settings()
        env = settings.admin_token_env
        if not env:
            return _text(403, "the admin API is off: set [serve] admin_token_env to the name of an environment variable holding a token")
        token = os.environ.get(env, "")
        if not token:
            return _text(403, f"the admin API is off: ${env} is empty in llmtop's environment")
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode("utf-8", "replace"), f"Bearer {token}".encode()):
            return _text(401, "a token is needed: send Authorization: Bearer <the token>")
        return None

    async def admin(self, request: web.Request) -> web.Response:
        refusal = await self._refusal(request)
        if refusal is not None:
            return refusal
        name, action = request.match_info["name"], request.match_info["action"]
        if action not in ACTIONS:
            return _text(404, f"no such action; use one of {', '.join(ACTIONS)}")
        return _text(*await self._thread.on_home_await(self._act(name, action, _peer(request))))

    async def probe_all(self, request: web.Request) -> web.Response:
        """Every backend probed now (the TUI's `P` on an agent's rows): one request, not one per backend."""
        refusal = await self._refusal(request)
        if refusal is not None:
            return refusal
        peer = _peer(request)

        def probe() -> tuple[int, str]:
            count = len(self.engine.trackers)
            self.engine.force_probe(None)
            self.engine.emit(Event(time.time(), None, "admin", f"probe of all {count} backends requested (API, from {peer})"))
            return 202, f"probing {count} backends"

        return _text(*await self._thread.on_home(probe))

    async def _act(self, name: str, action: str, peer: str) -> tuple[int, str]:
        """On the engine's loop: the action, and the status and line to answer with. A drain is
        published (board.py), and is in the readiness front's socket, before this returns: the
        next readiness answer already says it."""
        if self.engine.backend_snapshot(name) is None:
            return 404, "no such backend in llmtop's config"
        if action == "probe":
            self.engine.force_probe([name])
            self.engine.emit(Event(time.time(), name, "admin", f"probe requested (API, from {peer})"))
            return 202, "probing"
        try:
            before, after = await self.engine.apply_admin(name, action, by=f"API, from {peer}")
        except StateError as exc:  # the file cannot be written (a directory, a full disk, a lock)
            self.engine.note_state_error(str(exc))
            return 503, f"not changed: {for_terminal(str(exc), 300)}"
        if self._front is not None:
            await self._front.sent()  # a front behind on its messages must not answer "ready" after this
        if action in LIFTS and before not in (LIFTS[action], "active"):
            # undrain of a disabled backend, enable of a draining one: left as it is, and why.
            lift = next(c for c, lifted in LIFTS.items() if lifted == before)
            return 409, f"{before}, not {LIFTS[action]}; left {before} ({lift} lifts it)"
        return 200, f"{before} -> {after}"


def _peer(request: web.Request) -> str:
    """The client's address, for the event log; through serve's Unix socket only the readiness
    front asks (front.py), and it says for whom."""
    sock = request.transport.get_extra_info("socket") if request.transport is not None else None
    if sock is not None and sock.family == socket.AF_UNIX:
        return request.headers.get(FORWARDED_FOR, "") or "?"
    return request.remote or "?"


async def _send(response: web.StreamResponse, kind: str, data: dict | str) -> None:
    # One SSE event: its name, then its JSON (or JSON already written) on one line (JSON escapes
    # newlines and controls). Bounded: a client that stopped reading fills its socket, and would
    # hold its stream for ever.
    text = data if isinstance(data, str) else json.dumps(data, allow_nan=False)
    await asyncio.wait_for(response.write(f"event: {kind}\ndata: {text}\n\n".encode()), WRITE_S)
