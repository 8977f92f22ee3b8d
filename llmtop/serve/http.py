"""serve's HTTP endpoints (aiohttp.web, in the engine's own event loop): liveness, readiness, metrics, the fleet, events, admin."""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import time
from typing import Callable

from aiohttp import web

from llmtop.config import ServeSettings, split_address
from llmtop.engine import Engine
from llmtop.serve.exporter import Exposition
from llmtop.serve.readiness import readiness
from llmtop.snapshot import Event, FleetSnapshot
from llmtop.sanitize import for_terminal
from llmtop.state import LIFTS, StateError

SCHEMA = 1  # of /api/v1/fleet and /api/v1/events; bumped when a field changes meaning
MAX_REQUEST_BYTES = 64 * 1024  # admin requests carry no body worth more
STALL_S = 5.0  # the loop missed its heartbeat this long: not live
EVENT_QUEUE = 1000  # events held for one slow event-stream client before it is let go
KEEPALIVE_S = 15.0
WRITE_S = 5.0  # an event-stream client that takes longer to accept a write is let go
TICK_S = 0.5  # how often an event stream looks for changed backends
RECENT_EVENTS = 50  # sent after the fleet to each new event-stream client
ACTIONS = ("drain", "undrain", "disable", "enable", "probe")


def fleet_document(fleet: FleetSnapshot) -> dict:
    """What `llmtop check --json` prints, with a schema version for clients that read it live."""
    return {"schema": SCHEMA, **fleet.to_json()}


def event_document(event: Event) -> dict:
    return {"at": round(event.at, 3), "backend": event.backend, "kind": event.kind, "level": event.level, "message": event.message}


def _text(status: int, line: str) -> web.Response:
    return web.Response(status=status, text=line.rstrip("\n") + "\n", content_type="text/plain")


class ServeSite:
    """The endpoints over one engine. Every answer comes from the engine's latest snapshot: a
    balancer asking is never kept waiting on a backend."""

    def __init__(
        self,
        engine: Engine,
        listen: str,
        *,
        settings: Callable[[], ServeSettings] | None = None,
    ):
        self.engine = engine
        self.listen = listen
        self._settings = settings or (lambda: engine.config.serve)
        self._runner: web.AppRunner | None = None
        self._beat = time.monotonic()
        self._heart: asyncio.Task | None = None
        self._closing = asyncio.Event()
        self._exposition = Exposition(engine.snapshot, lambda: self._settings().ready_when)
        self.port: int | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
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
            ]
        )
        app.on_shutdown.append(self._shutdown)
        # No access log: a balancer asking every second would drown the event log.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)  # event streams end on their own (on_shutdown)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            self._runner = None
            raise OSError(exc.errno, f"cannot listen on {self.listen}: {exc.strerror}") from None
        self.port = self._runner.addresses[0][1]
        self._heart = asyncio.create_task(self._heartbeat(), name="llmtop:serve-heartbeat")

    async def stop(self) -> None:
        self._closing.set()
        if self._heart is not None:
            self._heart.cancel()
            await asyncio.gather(self._heart, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _shutdown(self, _app) -> None:
        self._closing.set()  # event streams end at once, not after the shutdown timeout

    async def _heartbeat(self) -> None:
        while True:
            self._beat = time.monotonic()
            await asyncio.sleep(0.5)

    # -- health of llmtop itself ------------------------------------------------------------

    async def livez(self, request: web.Request) -> web.Response:
        stalled = time.monotonic() - self._beat
        if stalled > STALL_S:
            return _text(503, f"the event loop missed its heartbeat for {stalled:.1f}s")
        problem = self.engine.alive()
        return _text(503, problem) if problem else _text(200, "ok")

    async def readyz(self, request: web.Request) -> web.Response:
        waiting = self.engine.first_round_pending()
        if waiting:
            return _text(503, f"first round not done: {waiting} backends not polled yet")
        return _text(200, "ready")

    # -- readiness per backend ---------------------------------------------------------------

    async def backend_ready(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        b = self.engine.backend_snapshot(name)
        if b is None:
            return _text(404, "no such backend in llmtop's config")
        r = readiness(b, self._settings().ready_when)
        return _text(200 if r.ready else 503, r.reason)

    # -- metrics and the fleet -----------------------------------------------------------------

    async def metrics(self, request: web.Request) -> web.Response:
        body, content_type = self._exposition.answer(request.headers.get("Accept", ""))
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def fleet(self, request: web.Request) -> web.Response:
        body = json.dumps(fleet_document(self.engine.snapshot()), allow_nan=False)
        return web.Response(text=body, content_type="application/json")

    async def events(self, request: web.Request) -> web.StreamResponse:
        """Server-Sent Events: the whole fleet first, then each backend whose state changed, the
        GPUs when they change, and every engine event as it happens. A client that reads too
        slowly is let go rather than buffered for."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        await response.prepare(request)
        queue: asyncio.Queue[Event] = asyncio.Queue(maxsize=EVENT_QUEUE)
        overflow = asyncio.Event()

        def listen(event: Event) -> None:
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                overflow.set()

        unsubscribe = self.engine.subscribe(listen)
        try:
            fleet = self.engine.snapshot()
            await _send(response, "fleet", fleet_document(fleet))
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
                fleet = self.engine.snapshot()
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
            unsubscribe()
        return response

    # -- admin -----------------------------------------------------------------------------

    async def admin(self, request: web.Request) -> web.Response:
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
        name, action = request.match_info["name"], request.match_info["action"]
        if action not in ACTIONS:
            return _text(404, f"no such action; use one of {', '.join(ACTIONS)}")
        b = self.engine.backend_snapshot(name)
        if b is None:
            return _text(404, "no such backend in llmtop's config")
        peer = request.remote or "?"
        if action == "probe":
            self.engine.force_probe([name])
            self.engine.emit(Event(time.time(), name, "admin", f"probe requested (API, from {peer})"))
            return _text(202, "probing")
        try:
            before, after = await self.engine.apply_admin(name, action, by=f"API, from {peer}")
        except StateError as exc:  # the file cannot be written (a directory, a full disk, a lock)
            self.engine.note_state_error(str(exc))
            return _text(503, f"not changed: {for_terminal(str(exc), 300)}")
        if action in LIFTS and before not in (LIFTS[action], "active"):
            # undrain of a disabled backend, enable of a draining one: left as it is, and why.
            lift = next(c for c, lifted in LIFTS.items() if lifted == before)
            return _text(409, f"{before}, not {LIFTS[action]}; left {before} ({lift} lifts it)")
        return _text(200, f"{before} -> {after}")


async def _send(response: web.StreamResponse, kind: str, data: dict) -> None:
    # One SSE event: its name, then its JSON on one line (JSON escapes newlines and controls).
    # Bounded: a client that stopped reading fills its socket, and would hold its stream for ever.
    await asyncio.wait_for(response.write(f"event: {kind}\ndata: {json.dumps(data, allow_nan=False)}\n\n".encode()), WRITE_S)
