"""The engine: schedules polls and probes over the fleet's trackers (tracker.py) and publishes FleetSnapshots."""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from typing import Callable, Iterable

import httpx

from llmtop import budget, kernelclock, transport
from llmtop.config import Config
from llmtop.governor import STAMPED_LAG_S, TARGET_LAG_S, Governor, Pacer
from llmtop.gpu import STALL_NOTE_S
from llmtop.metrics import alert_values
from llmtop.owners import Owners, local_ports
from llmtop.snapshot import BackendSnapshot, Event, FleetSnapshot, GpuStatus
from llmtop.state import StateStore
from llmtop.tracker import BackendTracker, uses_tls
from llmtop.transport import backend_client

Clock = Callable[[], float]
PROBES_AT_START = 64


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
        self._owners = Owners()
        self.events: deque[Event] = deque(maxlen=500)
        self._listeners: list[Callable[[Event], None]] = []
        self._watchers: list[Callable[[BackendSnapshot | None], None]] = []
        self.trackers: dict[str, BackendTracker] = {}
        self.config_error: str | None = None
        # Both gates open only as far as the event loop stays punctual (governor.py): a health
        # latency is as easily inflated by our own queueing as a TTFT (500 polls at once measured
        # 55 ms median against a server answering in under 1 ms; gated, 7 ms).
        # Probes start a modest number at once and grow by half every 100 ms while the loop reads
        # on time: a wide-open start admitted hundreds before the first decision, and on a slower
        # or busier CPU most of them came back untimed (their tokens read late).
        self._probe_gate = Governor(config.settings.probe_concurrency, start=PROBES_AT_START, target_lag_s=self._probe_lag_target(config))
        self._poll_gate = Governor(config.settings.max_concurrency, start=8, target_lag_s=0.001)
        self._pacer = Pacer(0.00075)
        self._tasks: dict[str, asyncio.Task] = {}
        self._gpu_task: asyncio.Task | None = None
        self._closing: set[asyncio.Future] = set()
        self._running = False
        self._rng = random.Random()
        self.budget: budget.Pacer | None = None  # [budget] tokens_per_hour's hard pace
        self._budget_for: float | None = None
        self._stretch: tuple[float, float] | None = None  # (clock, factor) of the last fleet plan
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
        # fleet that uses TLS. Every client shares the process's one context.
        if any(uses_tls(b.url) for b in self.config.backends):
            transport.shared_ssl_context()

    def new_client(self, tls: bool = True, timeout_s: float | None = None) -> httpx.AsyncClient:
        """A small connection pool for one backend (transport.py).

        One pool per backend rather than one for the fleet: the fleet-wide bounds are the
        governors (governor.py). A backend has a poll (Ollama's asks two things at once) or a probe
        in flight, so four connections mean a request never waits for one, which would count
        against its timeout.
        """
        # Loaded by open(), or here for the first https backend a reload added.
        return backend_client(timeout_s or self.config.settings.timeout_s, transport.shared_ssl_context() if tls else None)

    async def close(self) -> None:
        await self.stop()
        await self._probe_gate.close()
        await self._poll_gate.close()
        clients = [t.client for t in self.trackers.values() if t.client is not None]
        for tracker in self.trackers.values():
            tracker.client = tracker.adapter = None
        await asyncio.gather(*(c.aclose() for c in clients), return_exceptions=True)
        if self.gpu is not None:
            # Returns at once: NVML is shut down on a daemon thread once a read in flight is done,
            # and a stalled driver call holds neither this loop nor the process's exit.
            self.gpu.close()

    # -- time -------------------------------------------------------------------------------

    def to_wall(self, mono: float) -> float:
        return mono + (self.wall() - self.clock())

    def emit(self, event: Event) -> None:
        self.events.append(event)
        for listener in tuple(self._listeners):
            listener(event)

    def subscribe(self, listener: Callable[[Event], None]) -> Callable[[], None]:
        """Call `listener` with every event as it happens (serve's log lines and event streams);
        returns what unsubscribes it. A listener must not block: it runs on the engine's loop."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def watch(self, watcher: Callable[[BackendSnapshot | None], None]) -> Callable[[], None]:
        """Call `watcher` with a backend's new snapshot each time the engine makes one (whatever
        changed it: a poll, a probe, an operator's action, the state file, time moving a breaker),
        and with None once a reload changed the fleet; returns what unsubscribes it.

        Synchronously, on the engine's loop, before the change can be seen any other way: what a
        watcher publishes (serve's readiness answers) is never behind what `backend_snapshot`
        says. A watcher must be quick and must not block."""
        self._watchers.append(watcher)
        return lambda: self._watchers.remove(watcher) if watcher in self._watchers else None

    def backend_changed(self, tracker: BackendTracker) -> None:
        """A tracker's state changed (its seq moved): tell the watchers, unless a reload dropped it."""
        if self._watchers and self.trackers.get(tracker.name) is tracker:
            snap = tracker.snapshot()
            for watcher in tuple(self._watchers):
                watcher(snap)

    # -- one backend ------------------------------------------------------------------------

    async def _poll(self, tracker: BackendTracker) -> None:
        """Health, models and metrics (skipped while disabled, inside a Retry-After, or probe = "off")."""
        if tracker.admin == "disabled" or tracker.rate_limited() or tracker.policy.probe == "off":
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

    def _admit(self, tracker: BackendTracker, paced: bool) -> bool:
        """Whether a wanted probe goes now. Not while skip_probe_when says the backend is
        saturated (the probe is skipped: counted and said, never a failure); and, when `paced`,
        not before the budgets have accrued its tokens (it is booked the time they will have, and
        the live loop wakes for it then). A probe that goes unpaced is booked all the same."""
        rule = tracker.policy.skip_probe_when
        if rule is not None and tracker.metrics is not None:
            value = alert_values(tracker.metrics).get(rule.metric)
            if value is not None and value > rule.above:
                self._refund(tracker, 0.0)  # a probe booked for now and not sent costs nothing
                tracker.next_probe_at = self.clock() + self._jittered(tracker.plan.interval_s)
                tracker.skipped(f"probe skipped: {rule.metric} {value:g} > {rule.above:g}")
                return False
        if tracker.charged:  # booked earlier for now: already paid for
            return True
        pacers = [p for p in (self._fleet_pacer(), tracker.own_pacer()) if p is not None]
        if not pacers:
            return True
        now = self.clock()
        out_tokens, in_tokens = tracker.probe_cost()
        tracker.charged = out_tokens + in_tokens
        go = max(p.book(tracker.charged, now) for p in pacers)
        if paced and go > now:
            tracker.next_probe_at = go  # the live loop wakes for it then (_next_round_at)
            return False
        return True

    def _fleet_pacer(self) -> budget.Pacer | None:
        cap = self.config.budget.tokens_per_hour
        if cap != self._budget_for:
            self.budget, self._budget_for, self._stretch = (budget.Pacer(cap) if cap else None), cap, None
        return self.budget

    def _plan(self, tracker: BackendTracker) -> budget.Plan:
        """The backend's probe interval: its own, stretched by its probe_tokens_per_hour, then by
        the fleet's tokens_per_hour, which stretches every probing backend's alike."""
        policy = tracker.policy
        out_tokens, in_tokens = tracker.probe_cost()
        plan = budget.own_interval(policy.probe_interval_s, out_tokens + in_tokens, policy.probe_tokens_per_hour)
        cap = self.config.budget.tokens_per_hour
        if cap is None:
            return plan
        return budget.stretched(plan, self._fleet_factor(), cap)

    def replan(self) -> None:
        """Every backend's probe plan made again now, from what the probes have cost so far: a
        one-shot check ends with the plans the live loop would have (each round re-plans its own
        backend; a plan made before another backend's first probe priced it is out of date)."""
        self._stretch = None
        for tracker in self.trackers.values():
            plan = self._plan(tracker) if tracker.can_complete() else budget.Plan(tracker.policy.probe_interval_s)
            if plan != tracker.plan:
                tracker.plan = plan
                tracker.update()

    def _fleet_factor(self) -> float:
        """How much the fleet's budget stretches every interval; planned again at most once a second."""
        now = self.clock()
        if self._stretch is not None and now - self._stretch[0] < 1.0:
            return self._stretch[1]
        demands = []
        for t in self.trackers.values():
            if t.can_complete():
                out_tokens, in_tokens = t.probe_cost()
                own = budget.own_interval(t.policy.probe_interval_s, out_tokens + in_tokens, t.policy.probe_tokens_per_hour)
                demands.append((own.interval_s, out_tokens + in_tokens))
        factor = budget.fleet_stretch(demands, self.config.budget.tokens_per_hour)
        self._stretch = (now, factor)
        return factor

    async def _probe(self, tracker: BackendTracker) -> None:
        # Probes pass a gate of their own: their figures are only true while this process reads
        # each chunk as it arrives (see governor.py).
        async with self._probe_gate:
            if not self._probe_wanted(tracker):  # the breaker or admin state may have moved while queued
                self._refund(tracker, 0.0)
                return
            await self._pacer.wait()
            result = await tracker.get_adapter().probe(tracker.probe_target().model)
        if result.untimed:
            self._probe_gate.note_untimed()
        self._refund(tracker, float((result.output_tokens or 0) + (result.input_tokens or 0)))
        if self.trackers.get(tracker.name) is tracker:
            # A probe this process read too late to time (probe.StreamMeter) is tried once more
            # soon, not a whole probe interval later; a second one in a row waits its interval
            # (probes cost tokens, and a loaded host would only be loaded again).
            again = result.untimed and not (tracker.probe is not None and tracker.probe.untimed)
            tracker.apply_probe(result)
            tracker.plan = self._plan(tracker)
            policy = tracker.policy
            interval = tracker.plan.interval_s * (budget.ASK_EARLY if tracker.plan.why else 1.0)
            interval = min(policy.health_interval_s, interval) if again else interval
            # A probe asked for while this one was on its way (force_probe) still goes: this one
            # started before the asking, so it does not answer it.
            tracker.next_probe_at = 0.0 if tracker.forced else self.clock() + self._jittered(interval)
            tracker.update()

    def _refund(self, tracker: BackendTracker, spent: float) -> None:
        """Correct the budgets by what the probe cost against what was charged when it was admitted."""
        charged, tracker.charged = tracker.charged, 0.0
        for p in (self.budget, tracker.pacer):
            if p is not None:
                p.correct(spent - charged)

    async def _step(self, tracker: BackendTracker, work) -> None:
        tracker.busy = True
        tracker.seq += 1
        self.backend_changed(tracker)
        try:
            await work(tracker)
        finally:
            tracker.busy = False
            tracker.update()

    async def refresh_backend(
        self, name: str, probe: bool = True, paced: bool = False, before_probe: asyncio.Future | None = None, retry_untimed: bool = False
    ) -> None:
        """One backend: a poll, then a completion probe when one is wanted (`paced`: and the
        budgets allow it now; an operator's or a check's probe is counted, never held back).
        `before_probe`: waited for between the two (a round's GPU reading). `retry_untimed`: a probe
        read too late to time (probe.StreamMeter) is sent once more at once, through the gate,
        which has just closed further on it (a check has no next round to wait for)."""
        tracker = self.trackers[name]

        async def work(t: BackendTracker) -> None:
            await self._poll(t)
            if probe and before_probe is not None:
                # Waited for, not awaited: its failure is the round's to report (run_round), and
                # one backend cancelled must not cancel the reading every other one waits for.
                await asyncio.wait({before_probe})
            if self.trackers.get(t.name) is not t:
                return  # a reload replaced or removed it meanwhile: its successor probes
            if probe and self._probe_wanted(t):
                if self._admit(t, paced):
                    await self._probe(t)
                    if (
                        retry_untimed and self.trackers.get(t.name) is t and t.probe is not None and t.probe.untimed
                        and self._probe_wanted(t) and self._admit(t, paced)
                    ):  # fmt: skip
                        await self._probe(t)  # a second one untimed stays so: shown untimed, never wrong
            elif probe and t.charged:
                self._refund(t, 0.0)  # booked, then the backend could not take it: the budget is given back

        await self._step(tracker, work)

    @staticmethod
    def _probe_lag_target(config: Config) -> float:
        """How late the event loop may run while probes are in flight (governor.py).

        Where the kernel stamps every read (plain HTTP on Linux, transport.py), lateness enters
        no TTFT: it only risks a first token read together with the next, which the meter sees
        (untimed) and the governor answers at once, so the bound is one that keeps that rare.
        Where a read is stamped when it is read (TLS, or no kernel stamps), lateness is TTFT
        error, and the bound is the tight one."""
        stamped = transport.SO_TIMESTAMPNS is not None and kernelclock.available() and not any(uses_tls(b.url) for b in config.backends)
        return STAMPED_LAG_S if stamped else TARGET_LAG_S

    # -- the fleet --------------------------------------------------------------------------

    async def run_round(self, names: Iterable[str] | None = None, probe: bool = True) -> None:
        """Every (or the named) backend at once: each one's poll, then its probe, as soon as its
        poll is in: no backend waits for the slowest poll of the fleet before its probe goes
        out. Both pass their gates (governor.py), which admit only as many as this process can
        still time truly; a TTFT is stamped from the request's send and the kernel's receive
        time of each read (transport.py), so other backends' polls running meanwhile do not
        enter it. Each request is bounded by timeout_s, so a backend that hangs delays no other.

        Measured with benchmarks/bench_check_fleet.py (500 backends, one worker): 3.3-3.9x the
        slowest probe, against 4.2-4.7x with every poll before any probe; with two workers the
        simulator and both share this host's two cores, and neither way is faster.
        """
        trackers = [self.trackers[n] for n in (self.trackers if names is None else names) if n in self.trackers]
        # The GPU is read beside the polls, never before them: a stalled NVML call delays no poll.
        # It is done before any probe (bounded by STALL_NOTE_S from its start), so its thread and
        # NVML calls do not land inside a timing.
        gpu = asyncio.create_task(self.read_gpu())
        try:
            await asyncio.gather(*(self.refresh_backend(t.name, probe, before_probe=gpu, retry_untimed=True) for t in trackers))
        finally:
            await gpu

    async def read_gpu(self) -> None:
        """The GPU reading, waited for at most STALL_NOTE_S from its start: a stalled NVML call
        delays one round's polls by that at most, and no later round's."""
        if self.gpu is not None:
            status = await self.gpu.read_async(wait_s=STALL_NOTE_S)
            ports = local_ports((b.name, b.url) for b in self.config.backends)
            if ports and status.gpus:  # which backend each GPU process serves: /proc reads, off the loop
                status = await asyncio.to_thread(self._owners.label, status, ports)
            self.gpu_status = status

    def _jittered(self, interval: float) -> float:
        return interval * self._rng.uniform(0.9, 1.1)

    async def _backend_loop(self, tracker: BackendTracker) -> None:
        # Spread the first polls over one interval so 300 backends are not hit at the same instant.
        await self._wait(tracker, self._rng.uniform(0, min(1.0, tracker.policy.health_interval_s)))
        while self._running and self.trackers.get(tracker.name) is tracker:
            # Cleared before the round, not after: a `p` pressed while this backend is busy must
            # cut the next wait short, not be lost until the interval after.
            tracker.wake.clear()
            await self._round(tracker)
            await self._wait(tracker, max(0.0, tracker.next_round_at - self.clock()))

    async def _round(self, tracker: BackendTracker) -> None:
        """What the live loop does when a backend's time comes: a poll, and the probe if one is due."""
        forced = tracker.forced or tracker.breaker.state == "half_open"
        tracker.forced = False
        try:
            await self.refresh_backend(tracker.name, probe=self._probe_due(tracker), paced=not forced)
        except Exception as exc:  # noqa: BLE001 - a bug in one backend's handling must not stop its loop
            tracker._error(f"internal error: {type(exc).__name__}: {exc}")
            tracker.update()
        tracker.next_poll_at = self.clock() + self._jittered(tracker.policy.health_interval_s)
        plan = self._plan(tracker) if tracker.can_complete() else budget.Plan(tracker.policy.probe_interval_s)
        if plan != tracker.plan:  # the fleet's plan moved (a backend came or went, a cost changed)
            tracker.plan = plan
            tracker.update()
        tracker.next_round_at = self._next_round_at(tracker)

    def _next_round_at(self, tracker: BackendTracker) -> float:
        """The next poll; sooner when a probe falls due before it (a probe keeps its own interval,
        not the next poll's), or a half-open trial is due."""
        now = self.clock()
        at = tracker.next_poll_at
        if tracker.breaker.state == "half_open" and tracker.admin == "active":
            at = min(at, now + 1.0)  # a trial is due now, do not wait a whole interval
        if tracker.can_complete() and now < tracker.next_probe_at < at:
            at = tracker.next_probe_at
        return at

    async def run_due(self) -> int:
        """Every backend whose round is due at clock() now, once, as the live loop would run it:
        for a driver that steps a fake clock (tests, benchmarks) instead of waiting. Returns how
        many backends had a round."""
        now = self.clock()
        due = [t for t in self.trackers.values() if now >= t.next_round_at or t.wake.is_set() or self._trial_due(t, now)]
        for t in due:
            t.wake.clear()
        await asyncio.gather(*(self._round(t) for t in due))
        return len(due)

    @staticmethod
    def _trial_due(tracker: BackendTracker, now: float) -> bool:
        """An open breaker's cooldown has passed (time alone moves it): its trial is due now."""
        retry_at = tracker.breaker.retry_at()
        return retry_at is not None and now >= retry_at

    def _probe_due(self, tracker: BackendTracker) -> bool:
        if tracker.policy.probe != "completion":
            return False
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

    def alive(self) -> str | None:
        """None while the live loop runs every backend's task; else what stopped."""
        if not self._running:
            return "the engine is not running"
        for name, task in self._tasks.items():
            if task.done():
                return f"the task of backend {name} ended"
        return None

    def first_round_pending(self) -> int:
        """Backends not polled once yet (disabled ones are never polled and do not count)."""
        return sum(1 for t in self.trackers.values() if t.last_health_at is None and t.admin != "disabled")

    def force_probe(self, names: Iterable[str] | None = None) -> None:
        """Ask the live loop to do a full round (poll + probe) now for these backends."""
        for name in names if names is not None else list(self.trackers):
            tracker = self.trackers.get(name)
            if tracker is not None:
                tracker.next_probe_at = 0.0
                tracker.forced = True
                tracker.wake.set()

    # -- operator actions -------------------------------------------------------------------

    async def set_admin(self, name: str, admin: str, by: str | None = None) -> None:
        """Persist an operator's choice (`by`: who, for the event log). The file work (a lock, a
        write, an fsync) runs in a thread: another llmtop holding the lock, or a slow disk, must
        not freeze the event loop."""
        before = self.trackers[name].admin
        await asyncio.to_thread(self.state.set_admin, name, admin)
        tracker = self.trackers.get(name)
        if tracker is None:  # a reload removed it meanwhile; the file still says what was asked
            return
        if tracker.admin != before:
            self.emit(Event(self.wall(), name, "admin", f"{before} -> {tracker.admin}" + (f" ({by})" if by else "")))
        tracker.update()
        tracker.wake.set()

    async def apply_admin(self, name: str, command: str, by: str | None = None) -> tuple[str, str]:
        """An operator command (drain, undrain, disable, enable) decided and written under the
        state file's lock (state.admin_after: undrain lifts only a drain, enable only a disable);
        (before, after). In a thread, as set_admin."""
        before, after = await asyncio.to_thread(self.state.apply, name, command)
        tracker = self.trackers.get(name)
        if tracker is not None and after != before:
            self.emit(Event(self.wall(), name, "admin", f"{before} -> {after}" + (f" ({by})" if by else "")))
            tracker.update()
            tracker.wake.set()
        return before, after

    async def refresh_state(self) -> None:
        """Pick up admin changes another llmtop wrote to the state file (read in a thread)."""
        if await asyncio.to_thread(self.state.refresh):
            for tracker in self.trackers.values():
                tracker.update()

    def reload(self, config: Config) -> None:
        """Swap in a new config. Backends whose name, provider and URL are unchanged keep their history."""
        old = self.trackers
        timeouts = {name: t.policy.timeout_s for name, t in old.items()}
        before = self.config.settings
        self.config = config  # first: the trackers resolve their policy from it
        self.config_error = None
        self.trackers = {}
        for backend in config.backends:
            prev = old.get(backend.name)
            if prev is not None and (prev.config.provider, prev.config.url) == (backend.provider, backend.url):
                prev.reconfigure(backend)
                self.trackers[backend.name] = prev
            else:
                self.trackers[backend.name] = BackendTracker(self, backend)
        s = config.settings
        self._poll_gate.set_cap(s.max_concurrency)
        self._probe_gate.set_cap(s.probe_concurrency)
        self._probe_gate.target_lag_s = self._probe_lag_target(config)
        self._stretch = None
        for name, tracker in old.items():
            if self.trackers.get(name) is not tracker:
                task = self._tasks.pop(name, None)
                if task is not None:
                    task.cancel()
                self._close_client(tracker)
        for tracker in self.trackers.values():
            if tracker.policy.timeout_s != timeouts.get(tracker.name, tracker.policy.timeout_s):
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
        for watcher in tuple(self._watchers):
            watcher(None)

    def _close_client(self, tracker: BackendTracker) -> None:
        if tracker.client is not None:
            self._closing.add(asyncio.ensure_future(tracker.client.aclose()))
            self._closing = {t for t in self._closing if not t.done()}
            tracker.client = tracker.adapter = None

    def note_state_error(self, message: str) -> None:
        self.emit(Event(self.wall(), None, "state", f"the state file cannot be read: {message}", "error"))

    def note_config_error(self, message: str) -> None:
        self.config_error = message
        self.emit(Event(self.wall(), None, "config", f"reload failed, keeping the running config: {message}", "error"))

    # -- output -----------------------------------------------------------------------------

    def backend_snapshot(self, name: str) -> BackendSnapshot | None:
        """One backend's latest snapshot, without building the fleet's (a balancer asks for one
        backend a thousand times a second)."""
        tracker = self.trackers.get(name)
        if tracker is None:
            return None
        if tracker.breaker.state != tracker.snapshot_circuit:  # time alone moved it (see snapshot)
            tracker.update()
        return tracker.snapshot()

    def breaker_moves_at(self, name: str) -> float:
        """When (engine clock) time alone will move this backend's breaker: an open one's cooldown
        ends; infinity when nothing will."""
        tracker = self.trackers.get(name)
        at = tracker.breaker.retry_at() if tracker is not None else None
        return float("inf") if at is None else at

    def snapshot(self) -> FleetSnapshot:
        for tracker in self.trackers.values():
            # Time alone moves a breaker (open -> half-open once its cooldown passed): a cached
            # snapshot must not go on saying "open" until something else happens to the backend.
            if tracker.breaker.state != tracker.snapshot_circuit:
                tracker.update()
        return FleetSnapshot(
            at=self.wall(),
            backends=tuple(t.snapshot() for t in self.trackers.values()),
            gpu=self.gpu_status,
            events=tuple(self.events),
            config_path=str(self.config.path) if self.config.path else None,
            config_error=self.config_error,
            budget_tokens_per_hour=self.config.budget.tokens_per_hour,
        )
