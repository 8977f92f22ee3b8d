"""Admits probes and polls only as fast as this process can still time them truthfully, and paces their starts.

A probe's TTFT and decode rate are stamped with the kernel's receive time of each read
(transport.py), but once this process reads late, the kernel merges what arrived meanwhile and a
first token read together with the next is stamped with the next one's time: measured on
2 cores, 500 probes at once inflated the median TTFT by 140 ms. The meter notices such a read
and calls the probe untimed (probe.StreamMeter) rather than report it wrong; the governor keeps
that rare by admitting probes only as fast as the loop stays punctual. It samples the loop's
lateness, counts untimed probes, and opens or closes the gate on both (multiplicative increase
while all is well, multiplicative decrease on trouble), up to the hard cap `probe_concurrency`.
A fixed cap would trade truth against wall time blindly: fast-token fleets need a low one,
slow-token fleets could take far more, and a slower CPU needs less than a faster one.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

PERIOD_S = 0.005  # how often the loop's lateness is sampled while probes run
TARGET_LAG_S = 0.002  # lateness that still keeps a TTFT stamped when read within a couple of milliseconds
# Where the kernel stamps each read, lateness enters no TTFT; it only risks a first token read
# together with the next (untimed, engine.Engine._probe_lag_target). Keeping it under 12.5 ms
# (2.5x this) keeps that rare for tokens 10 ms or more apart.
STAMPED_LAG_S = 0.005
ADJUST_EVERY = 20  # samples (100 ms) between two decisions
IDLE_STOP_S = 1.0  # stop sampling this long after the last probe


class Governor:
    def __init__(self, cap: int, start: int = 32, target_lag_s: float = TARGET_LAG_S):
        self.cap = max(1, cap)
        self.allowed = min(start, self.cap)
        self.target_lag_s = target_lag_s
        self.in_flight = 0
        self.untimed = 0  # probes read too late to time since the last decision (note_untimed)
        self._lags: deque[float] = deque(maxlen=ADJUST_EVERY)
        # Waiters in arrival order, each woken alone when a slot is handed to it. (One shared
        # Event woke all 500 queued probes whenever one finished: 220,000 futile wake-ups a round,
        # a third of the process's CPU.)
        self._waiters: deque[asyncio.Future] = deque()
        self._sampler: asyncio.Task | None = None
        self._last_busy = 0.0

    async def __aenter__(self) -> "Governor":
        self._ensure_sampler()
        if self.in_flight < self.allowed and not self._waiters:
            self.in_flight += 1
            return self
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter  # resolved by _hand_out, which has already counted this task in
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # granted, then cancelled: pass the slot on
                self.in_flight -= 1
                self._hand_out()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        self.in_flight -= 1
        self._last_busy = time.monotonic()
        self._hand_out()

    def _hand_out(self) -> None:
        """Give free slots to the longest waiters, one wake-up each."""
        while self._waiters and self.in_flight < self.allowed:
            waiter = self._waiters.popleft()
            if not waiter.done():  # a cancelled waiter is skipped
                self.in_flight += 1
                waiter.set_result(None)

    def set_cap(self, cap: int) -> None:
        """A reloaded config's hard cap; in-flight work above a lowered one finishes normally."""
        self.cap = max(1, cap)
        self.allowed = min(self.allowed, self.cap)
        self._hand_out()

    def _ensure_sampler(self) -> None:
        if self._sampler is None or self._sampler.done():
            self._sampler = asyncio.create_task(self._sample(), name="llmtop:governor")

    async def _sample(self) -> None:
        n = 0
        while self.in_flight or time.monotonic() - self._last_busy < IDLE_STOP_S:
            start = time.perf_counter()
            await asyncio.sleep(PERIOD_S)
            self._lags.append(time.perf_counter() - start - PERIOD_S)
            n += 1
            if n % ADJUST_EVERY == 0:
                self.adjust(sorted(self._lags)[int(len(self._lags) * 0.9)])

    def note_untimed(self) -> None:
        """A probe came back untimed: the loop read its first tokens late. Evidence, not a sample."""
        self.untimed += 1

    def adjust(self, lag_p90: float) -> None:
        """One decision from the loop's recent lateness (its 90th percentile) and the probes
        that came back untimed since the last one."""
        untimed, self.untimed = self.untimed, 0
        if untimed or lag_p90 > 2.5 * self.target_lag_s:
            self.allowed = max(4, int(self.allowed * (0.5 if untimed > 2 else 0.7)))
        elif lag_p90 < self.target_lag_s and self.in_flight >= self.allowed * 0.9:
            self.allowed = min(self.cap, self.allowed + max(4, self.allowed // 2))
            self._hand_out()

    async def close(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            await asyncio.gather(self._sampler, return_exceptions=True)
            self._sampler = None


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
