"""The engine: schedules polls and probes per backend, tracks health, and publishes FleetSnapshots."""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from typing import Callable, Iterable
from urllib.parse import urlsplit

import httpx

from llmtop.config import BackendConfig, Config
from llmtop.governor import Governor
from llmtop.health import OPEN, CircuitBreaker, StatusInputs, derive_status, missing_models, tripped_alerts
from llmtop.metrics import alert_values
from llmtop.probe import HealthResult, ProbeResult
from llmtop.providers import adapter_class
from llmtop.providers.base import Adapter, PollResult
from llmtop.snapshot import BackendSnapshot, Event, FleetSnapshot, GpuStatus, Metrics, ProbeSummary
from llmtop.state import StateStore
from llmtop.transport import backend_client

Clock = Callable[[], float]


def uses_tls(url: str) -> bool:
    return urlsplit(url).scheme.lower() == "https"  # the config accepts HTTPS:// too


class Pacer:
    """Spaces request starts at least `gap_s` apart.

    Where the kernel does not stamp arrivals (TLS, not Linux), everything this process times
    includes the time the event loop takes to get to it; and a burst of starts delays the
    sends and the servers' own handling either way. Eleven polls started in the same instant
    measured 8 ms of latency each against a server that answers in 0.7 ms: they queued behind
    each other's parsing. Starting them
    0.75 ms apart (a request costs this process about 0.3 ms of CPU, transport.py) keeps the
    figures the server's. Measured over 500 backends (benchmarks/bench_check_fleet.py, with
    kernel receive stamps): 1 ms apart, TTFT error +0.8 ms median and 1.96x the slowest probe;
    0.75 ms, +0.9 ms and 1.85x; 0.5 ms, +1.4 ms (p95 +3.1) and 1.80x.
    """

    def __init__(self, gap_s: float):
        self.gap_s = gap_s
        self._next = 0.0

    async def wait(self) -> None:
        now = time.monotonic()
        start = max(now, self._next)
        self._next = start + self.gap_s
        if start > now:
            await asyncio.sleep(start - now)


class BackendTracker:
    """Everything known about one backend, fed by poll and probe results; one per configured backend."""

    def __init__(self, engine: "Engine", config: BackendConfig):
        self.engine = engine
        self.config = config
        settings = engine.config.settings
        self.breaker = CircuitBreaker(engine.config.breaker, engine.clock)
        self.adapter: Adapter | None = None
        self.client: httpx.AsyncClient | None = None
        self.health: HealthResult | None = None
        self.models: tuple[str, ...] | None = None
        self.models_error: str | None = None
        self.models_extra: dict = {}
        self.metrics: Metrics | None = None
        self.metrics_error: str | None = None
        self.probe: ProbeSummary | None = None
        self.last_health_at: float | None = None
        self.retry_after_until: float | None = None  # monotonic
        self.next_probe_at: float = 0.0  # monotonic; 0 = as soon as allowed
        self.status, self.status_reason = "unknown", "not yet probed"
        self.missing: tuple[str, ...] = ()
        self.alerts: tuple[str, ...] = ()
        n = settings.history
        self.ttft_history: deque = deque(maxlen=n)
        self.tps_history: deque = deque(maxlen=n)
        self.latency_history: deque = deque(maxlen=n)
        self.queue_history: deque = deque(maxlen=n)
        self.recent_errors: deque = deque(maxlen=20)
        self._transitions_seen = 0
        self.seq = 0
        self._snapshot: BackendSnapshot | None = None
        self._snapshot_seq = -1
        self.wake = asyncio.Event()
        self.busy = False

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def admin(self) -> str:
        if not self.config.enabled:
            return "disabled"
        return self.engine.state.admin(self.name)

    def get_adapter(self) -> Adapter:
        if self.adapter is None:
            s = self.engine.config.settings
            cls = adapter_class(self.config.provider)
            if self.client is None:
                self.client = self.engine.new_client(tls=uses_tls(self.config.url))
            self.adapter = cls(self.config, self.client, s.timeout_s, s.probe_max_tokens)
        return self.adapter

    def may_probe(self) -> bool:
        """Whether a completion probe may be sent now: active, circuit not open, no Retry-After
        pending, and a model to ask."""
        return (
            self.admin == "active"
            and self.breaker.allows_probe()
            and not self.rate_limited()
            and self.config.effective_probe_model is not None
        )

    def rate_limited(self) -> bool:
        return self.retry_after_until is not None and self.engine.clock() < self.retry_after_until

    def _note_retry_after(self, seconds: float | None) -> None:
        if seconds is not None:
            self.retry_after_until = self.engine.clock() + seconds

    def _error(self, message: str) -> None:
        if not self.recent_errors or self.recent_errors[-1][1] != message:
            self.recent_errors.append((self.engine.wall(), message))

    # -- results in -------------------------------------------------------------------------

    def apply_poll(self, result: PollResult) -> None:
        wall = self.engine.wall()
        health = result.health
        self.health = health
        self.last_health_at = wall
        self._note_retry_after(health.retry_after_s)
        if health.ok and health.latency_ms is not None:
            self.latency_history.append((wall, health.latency_ms))
        if health.error:
            self._error(health.error)
        if self._poll_counts():
            self.breaker.record(health.ok, health.error or "")
        if result.models is not None:
            if result.models.models is not None:
                self.models = result.models.models
                self.models_error = None
                self.models_extra = result.models.extra
            else:
                self.models_error = result.models.error
                if result.models.error and result.models.error != health.error:
                    self._error(result.models.error)
        if result.metrics is not None:
            self.metrics = result.metrics
            if result.metrics.requests_waiting is not None:
                self.queue_history.append((wall, result.metrics.requests_waiting))
        self.metrics_error = result.metrics_error
        self.update()

    def _poll_counts(self) -> bool:
        """Polls feed the breaker while closed. Once it opened, only completion probes are trials,
        unless this backend cannot be probed (no model, or draining): then polls are its trials.
        A model still loading is neither a success nor a failure."""
        if self.health is not None and self.health.loading:
            return False
        state = self.breaker.state
        if state == "half_open":
            # No probe goes to a server that does not answer its poll, so that poll is the trial.
            return not self.can_complete() or bool(self.health and self.health.unreachable)
        return state == "closed"

    def can_complete(self) -> bool:
        return self.admin == "active" and self.config.effective_probe_model is not None

    def apply_probe(self, result: ProbeResult) -> None:
        wall = self.engine.wall()
        self._note_retry_after(result.retry_after_s)
        self.probe = ProbeSummary(
            model=result.model,
            ttft_ms=result.ttft_ms,
            tokens_per_s=result.tokens_per_s,
            output_tokens=result.output_tokens,
            tokens_estimated=result.tokens_estimated,
            error=result.error,
            at=wall,
            server_ttft_ms=result.server_ttft_ms,
            server_tokens_per_s=result.server_tokens_per_s,
            load_ms=result.load_ms,
        )
        if result.ok:
            if result.ttft_ms is not None:
                self.ttft_history.append((wall, result.ttft_ms))
            if result.tokens_per_s is not None:
                self.tps_history.append((wall, result.tokens_per_s))
        else:
            self._error(result.error or "probe failed")
        self.breaker.record(result.ok, result.error or "")
        self.update()

    def update(self) -> None:
        """Recompute status, missing models and alerts, and turn changes into events."""
        self.seq += 1
        engine = self.engine
        self.breaker.advance()
        new = min(self.breaker.transition_count - self._transitions_seen, len(self.breaker.transitions))
        for t in self.breaker.transitions[len(self.breaker.transitions) - new :]:
            level = "error" if t.to_state == OPEN else "warning" if t.to_state == "half_open" else "info"
            engine.emit(
                Event(engine.to_wall(t.at), self.name, "breaker", f"circuit {t.from_state} -> {t.to_state}: {t.reason}", level)
            )
        self._transitions_seen = self.breaker.transition_count

        missing = ()
        if self.models is not None:
            missing = missing_models(self.config.models, self.models, self.get_adapter().ollama_names)
        if missing != self.missing:
            new = [m for m in missing if m not in self.missing]
            back = [m for m in self.missing if m not in missing]
            if new:
                engine.emit(Event(engine.wall(), self.name, "model", f"missing model: {', '.join(new)}", "warning"))
            if back:
                engine.emit(Event(engine.wall(), self.name, "model", f"model served again: {', '.join(back)}"))
            self.missing = missing

        alerts = tripped_alerts(self.config.alerts, alert_values(self.metrics)) if self.metrics else ()
        old_rules = {a.split(" (now")[0] for a in self.alerts}
        new_rules = {a.split(" (now")[0] for a in alerts}
        for a in alerts:
            if a.split(" (now")[0] not in old_rules:
                engine.emit(Event(engine.wall(), self.name, "alert", f"alert tripped: {a}", "warning"))
        for rule in old_rules - new_rules:
            engine.emit(Event(engine.wall(), self.name, "alert", f"alert cleared: {rule}"))
        self.alerts = alerts

        health = self.health
        probe = self.probe
        status, reason = derive_status(
            StatusInputs(
                probed=health is not None or probe is not None,
                circuit=self.breaker.state,
                reachable=None if health is None else (health.ok or health.loading),
                loading=bool(health and health.loading),
                health_error=health.error if health else None,
                probe_error=probe.error if probe else None,
                missing=self.missing,
                alerts=self.alerts,
                error_rate=self.breaker.window.error_rate(),
                degraded_error_rate=engine.config.settings.degraded_error_rate,
                ttft_ms=probe.ttft_ms if probe else None,
                slow_ttft_ms=engine.config.settings.slow_ttft_ms,
                rate_limited=self.rate_limited(),
            )
        )
        # A first healthy reading is not news; every other change of status is.
        if status != self.status and not (self.status == "unknown" and status == "healthy"):
            level = {"down": "error", "degraded": "warning"}.get(status, "info")
            suffix = f": {reason}" if reason else ""
            engine.emit(Event(engine.wall(), self.name, "status", f"{self.status} -> {status}{suffix}", level))
        self.status, self.status_reason = status, reason

    # -- snapshot out -----------------------------------------------------------------------

    def snapshot(self) -> BackendSnapshot:
        if self._snapshot is not None and self._snapshot_seq == self.seq:
            return self._snapshot
        engine = self.engine
        probe_interval = engine.config.settings.probe_interval_s
        tokens = (self.probe.output_tokens if self.probe and self.probe.output_tokens else None) or (
            engine.config.settings.probe_max_tokens
        )
        probing = self.can_complete()
        retry_at = self.breaker.retry_at()
        health = self.health
        error = None
        if health is not None and not health.ok:
            error = health.error
        elif self.probe is not None and self.probe.error:
            error = self.probe.error
        elif self.models_error:
            error = self.models_error
        extra = {}
        if self.models_extra.get("loaded") is not None:
            extra["loaded_models"] = tuple(self.models_extra["loaded"])
        if self.metrics_error:
            extra["metrics_error"] = self.metrics_error
        if retry_at is not None:
            extra["circuit_retry_at"] = engine.to_wall(retry_at)
        snap = BackendSnapshot(
            name=self.name,
            provider=self.config.provider,
            url=self.config.url,
            status=self.status,
            status_reason=self.status_reason,
            circuit=self.breaker.state,
            admin=self.admin,
            enabled=self.config.enabled,
            latency_ms=health.latency_ms if health and health.ok else None,
            models=self.models or (),
            expected_models=self.config.models,
            missing_models=self.missing,
            alerts=self.alerts,
            metrics=self.metrics,
            probe=self.probe,
            error=error,
            error_rate=self.breaker.window.error_rate(),
            last_health_at=self.last_health_at,
            retry_after_at=engine.to_wall(self.retry_after_until) if self.rate_limited() else None,
            probe_tokens_per_hour=(3600.0 / probe_interval) * tokens if probing else 0.0,
            version=(health.version if health else None) or self.models_extra.get("version"),
            extra=extra,
            ttft_history=tuple(self.ttft_history),
            tps_history=tuple(self.tps_history),
            latency_history=tuple(self.latency_history),
            queue_history=tuple(self.queue_history),
            breaker_history=tuple((engine.to_wall(t.at), t.from_state, t.to_state) for t in self.breaker.transitions),
            recent_errors=tuple(self.recent_errors),
            in_flight=self.busy,
            seq=self.seq,
        )
        self._snapshot, self._snapshot_seq = snap, self.seq
        return snap


class Engine:
    """Owns one HTTP connection pool and a tracker per backend.

    Two ways to drive it: `run_round()` (what `llmtop check` does N times) and `run()` (the live
    loop for the TUI: per-backend tasks that each schedule their next poll after the last one
    finished, with jitter, so polls never overlap and a large fleet is not hit in lockstep).
    """

    def __init__(
        self,
        config: Config,
        state: StateStore,
        *,
        clock: Clock = time.monotonic,
        wall: Clock = time.time,
        gpu=None,
    ):
        self.config = config
        self.state = state
        self.clock = clock
        self.wall = wall
        self.gpu = gpu
        self.gpu_status = GpuStatus(message="GPU not read yet")
        self.events: deque[Event] = deque(maxlen=500)
        self._ssl = None
        self.trackers: dict[str, BackendTracker] = {}
        self.config_error: str | None = None
        # Both gates open only as far as the event loop stays punctual (governor.py): a health
        # latency is as easily inflated by our own queueing as a TTFT (500 polls at once measured
        # 55 ms median against a server answering in under 1 ms; gated, 7 ms).
        # Probes start wide open: the pacer already spaces their starts, and a slow start (it was
        # 32, growing by half every 100 ms) held a 500-backend check back by 0.4 s.
        self._probe_gate = Governor(config.settings.probe_concurrency, start=config.settings.probe_concurrency)
        self._poll_gate = Governor(config.settings.max_concurrency, start=8, target_lag_s=0.001)
        self._pacer = Pacer(0.00075)
        self._tasks: dict[str, asyncio.Task] = {}
        self._gpu_task: asyncio.Task | None = None
        self._closing: set[asyncio.Future] = set()
        self._running = False
        self._rng = random.Random()
        for backend in config.backends:
            self.trackers[backend.name] = BackendTracker(self, backend)

    # -- lifecycle --------------------------------------------------------------------------

    async def __aenter__(self) -> "Engine":
        await self.open()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def open(self) -> None:
        # Loading the CA bundle blocks for ~20 ms: here, before anything is timed, and only for a
        # fleet that uses TLS. Every backend's client shares the one context.
        if any(uses_tls(b.url) for b in self.config.backends):
            self._ssl = httpx.create_ssl_context()

    def new_client(self, tls: bool = True) -> httpx.AsyncClient:
        """A small connection pool for one backend (transport.py).

        One pool per backend rather than one for the fleet: the fleet-wide bounds are the
        governors (governor.py). A backend has a poll (Ollama's asks two things at once) or a probe
        in flight, so four connections mean a request never waits for one, which would count
        against its timeout.
        """
        if tls and self._ssl is None:  # the first https backend, added by a reload
            self._ssl = httpx.create_ssl_context()
        return backend_client(self.config.settings.timeout_s, self._ssl if tls else None)

    async def close(self) -> None:
        await self.stop()
        await self._probe_gate.close()
        await self._poll_gate.close()
        clients = [t.client for t in self.trackers.values() if t.client is not None]
        for tracker in self.trackers.values():
            tracker.client = tracker.adapter = None
        await asyncio.gather(*(c.aclose() for c in clients), return_exceptions=True)
        if self.gpu is not None:
            self.gpu.close()

    # -- time -------------------------------------------------------------------------------

    def to_wall(self, mono: float) -> float:
        return mono + (self.wall() - self.clock())

    def emit(self, event: Event) -> None:
        self.events.append(event)

    # -- one backend ------------------------------------------------------------------------

    async def _poll(self, tracker: BackendTracker) -> None:
        """Health, models and metrics (skipped while disabled or inside a Retry-After)."""
        if tracker.admin == "disabled" or tracker.rate_limited():
            return
        async with self._poll_gate:
            await self._pacer.wait()
            result = await tracker.get_adapter().poll(tracker.metrics)
        if self.trackers.get(tracker.name) is tracker:  # a reload may have replaced it meanwhile
            tracker.apply_poll(result)

    def _probe_wanted(self, tracker: BackendTracker) -> bool:
        """Allowed, and not pointless: a server that did not answer its poll or is loading a model
        would only fail the probe too (one more timeout for a hung one)."""
        health = tracker.health
        if health is not None and (health.unreachable or health.loading):
            return False
        return tracker.may_probe()

    async def _probe(self, tracker: BackendTracker) -> None:
        # Probes pass a gate of their own: their figures are only true while this process reads
        # each chunk as it arrives (see governor.py).
        async with self._probe_gate:
            if not self._probe_wanted(tracker):  # the breaker or admin state may have moved while queued
                return
            await self._pacer.wait()
            result = await tracker.get_adapter().probe(tracker.config.effective_probe_model)
        if self.trackers.get(tracker.name) is tracker:
            tracker.next_probe_at = self.clock() + self._jittered(self.config.settings.probe_interval_s)
            tracker.apply_probe(result)

    async def _step(self, tracker: BackendTracker, work) -> None:
        tracker.busy = True
        tracker.seq += 1
        try:
            await work(tracker)
        finally:
            tracker.busy = False
            tracker.update()

    async def refresh_backend(self, name: str, probe: bool = True) -> None:
        """One backend: a poll, then a completion probe when one is wanted."""
        tracker = self.trackers[name]

        async def work(t: BackendTracker) -> None:
            await self._poll(t)
            if probe and self._probe_wanted(t):
                await self._probe(t)

        await self._step(tracker, work)

    # -- the fleet --------------------------------------------------------------------------

    async def run_round(self, names: Iterable[str] | None = None, probe: bool = True) -> None:
        """Every (or the named) backend: all polls at once, then the probes.

        Polls first, so their burst of CPU work is over before any probe is timed; each request is
        bounded by timeout_s, so a backend that hangs delays no other.
        """
        trackers = [self.trackers[n] for n in (self.trackers if names is None else names) if n in self.trackers]
        await self.read_gpu()  # first: its thread start and NVML calls must not land inside a timing
        await asyncio.gather(*(self._step(t, self._poll) for t in trackers))
        if probe:
            await asyncio.gather(*(self._step(t, self._probe) for t in trackers if self._probe_wanted(t)))

    async def read_gpu(self) -> None:
        if self.gpu is not None:
            self.gpu_status = await self.gpu.read_async()

    def _jittered(self, interval: float) -> float:
        return interval * self._rng.uniform(0.9, 1.1)

    async def _backend_loop(self, tracker: BackendTracker) -> None:
        # Spread the first polls over one interval so 300 backends are not hit at the same instant.
        await self._wait(tracker, self._rng.uniform(0, min(1.0, self.config.settings.health_interval_s)))
        while self._running and self.trackers.get(tracker.name) is tracker:
            # Cleared before the round, not after: a `p` pressed while this backend is busy must
            # cut the next wait short, not be lost until the interval after.
            tracker.wake.clear()
            try:
                await self.refresh_backend(tracker.name, probe=self._probe_due(tracker))
            except Exception as exc:  # noqa: BLE001 - a bug in one backend's handling must not stop its loop
                tracker._error(f"internal error: {type(exc).__name__}: {exc}")
                tracker.update()
            delay = self._jittered(self.config.settings.health_interval_s)
            if tracker.breaker.state == "half_open" and tracker.admin == "active":
                delay = min(delay, 1.0)  # a trial is due now, do not wait a whole interval
            await self._wait(tracker, delay)

    def _probe_due(self, tracker: BackendTracker) -> bool:
        if tracker.breaker.state == "half_open":
            return True
        return self.clock() >= tracker.next_probe_at

    async def _wait(self, tracker: BackendTracker, delay: float) -> None:
        retry_at = tracker.breaker.retry_at()
        if retry_at is not None:
            delay = min(delay, max(0.0, retry_at - self.clock()))
        try:
            await asyncio.wait_for(tracker.wake.wait(), delay)
        except asyncio.TimeoutError:
            pass

    async def _gpu_loop(self) -> None:
        while self._running:
            await self.read_gpu()
            await asyncio.sleep(1.0)

    def start(self) -> None:
        """Start the live loop (the TUI's mode). Must be called inside a running event loop."""
        if self._running:
            return
        self._running = True
        for tracker in self.trackers.values():
            self._start_tracker(tracker)
        if self.gpu is not None:
            self._gpu_task = asyncio.create_task(self._gpu_loop())

    def _start_tracker(self, tracker: BackendTracker) -> None:
        self._tasks[tracker.name] = asyncio.create_task(self._backend_loop(tracker), name=f"llmtop:{tracker.name}")

    async def stop(self) -> None:
        self._running = False
        tasks = list(self._tasks.values()) + ([self._gpu_task] if self._gpu_task else [])
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self._gpu_task = None

    def force_probe(self, names: Iterable[str] | None = None) -> None:
        """Ask the live loop to do a full round (poll + probe) now for these backends."""
        for name in names if names is not None else list(self.trackers):
            tracker = self.trackers.get(name)
            if tracker is not None:
                tracker.next_probe_at = 0.0
                tracker.wake.set()

    # -- operator actions -------------------------------------------------------------------

    async def set_admin(self, name: str, admin: str) -> None:
        """Persist an operator's choice. The file work (a lock, a write, an fsync) runs in a
        thread: another llmtop holding the lock, or a slow disk, must not freeze the event loop."""
        before = self.trackers[name].admin
        await asyncio.to_thread(self.state.set_admin, name, admin)
        tracker = self.trackers.get(name)
        if tracker is None:  # a reload removed it meanwhile; the file still says what was asked
            return
        if tracker.admin != before:
            self.emit(Event(self.wall(), name, "admin", f"{before} -> {tracker.admin}"))
        tracker.update()
        tracker.wake.set()

    async def refresh_state(self) -> None:
        """Pick up admin changes another llmtop wrote to the state file (read in a thread)."""
        if await asyncio.to_thread(self.state.refresh):
            for tracker in self.trackers.values():
                tracker.update()

    def reload(self, config: Config) -> None:
        """Swap in a new config. Backends whose name, provider and URL are unchanged keep their history."""
        old = self.trackers
        self.trackers = {}
        for backend in config.backends:
            prev = old.get(backend.name)
            if prev is not None and (prev.config.provider, prev.config.url) == (backend.provider, backend.url):
                prev.config = backend
                prev.adapter = None  # headers, probe model or key env may have changed
                self.trackers[backend.name] = prev
            else:
                self.trackers[backend.name] = BackendTracker(self, backend)
        before = self.config.settings
        self.config = config
        self.config_error = None
        s = config.settings
        self._poll_gate.set_cap(s.max_concurrency)
        self._probe_gate.set_cap(s.probe_concurrency)
        for name, tracker in old.items():
            if self.trackers.get(name) is not tracker:
                task = self._tasks.pop(name, None)
                if task is not None:
                    task.cancel()
                self._close_client(tracker)
        for tracker in self.trackers.values():
            if s.timeout_s != before.timeout_s:
                self._close_client(tracker)  # the connect timeout lives in the client
            if s.history != before.history:
                for name in ("ttft_history", "tps_history", "latency_history", "queue_history"):
                    setattr(tracker, name, deque(getattr(tracker, name), maxlen=s.history))
            tracker.breaker.reconfigure(config.breaker)
            tracker.update()
            if self._running and tracker.name not in self._tasks:
                self._start_tracker(tracker)
        added = len([n for n in self.trackers if n not in old])
        removed = len([n for n in old if n not in self.trackers])
        self.emit(
            Event(self.wall(), None, "config", f"config reloaded: {len(self.trackers)} backends (+{added} -{removed})")
        )

    def _close_client(self, tracker: BackendTracker) -> None:
        if tracker.client is not None:
            self._closing.add(asyncio.ensure_future(tracker.client.aclose()))
            self._closing = {t for t in self._closing if not t.done()}
            tracker.client = tracker.adapter = None

    def note_config_error(self, message: str) -> None:
        self.config_error = message
        self.emit(Event(self.wall(), None, "config", f"reload failed, keeping the running config: {message}", "error"))

    # -- output -----------------------------------------------------------------------------

    def snapshot(self) -> FleetSnapshot:
        return FleetSnapshot(
            at=self.wall(),
            backends=tuple(t.snapshot() for t in self.trackers.values()),
            gpu=self.gpu_status,
            events=tuple(self.events),
            config_path=str(self.config.path) if self.config.path else None,
            config_error=self.config_error,
        )
