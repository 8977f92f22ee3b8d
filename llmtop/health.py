"""Pure health logic: sliding outcome window, circuit breaker, model matching and status rules."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable

from llmtop.config import AlertRule, BreakerSettings

Clock = Callable[[], float]

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class OutcomeWindow:
    """Outcomes (time, ok) within the last window_s seconds, plus consecutive counters."""

    def __init__(self, window_s: float, clock: Clock):
        self.window_s = window_s
        self.clock = clock
        self._items: deque[tuple[float, bool]] = deque()
        self._failures = 0
        self.consecutive_failures = 0
        self.consecutive_successes = 0

    def record(self, ok: bool) -> None:
        self._items.append((self.clock(), ok))
        self._failures += not ok
        if ok:
            self.consecutive_successes += 1
            self.consecutive_failures = 0
        else:
            self.consecutive_failures += 1
            self.consecutive_successes = 0
        self._expire()

    def _expire(self) -> None:
        horizon = self.clock() - self.window_s
        while self._items and self._items[0][0] < horizon:
            _, ok = self._items.popleft()
            self._failures -= not ok

    def __len__(self) -> int:
        self._expire()
        return len(self._items)

    def error_rate(self) -> float | None:
        self._expire()
        if not self._items:
            return None
        return self._failures / len(self._items)

    def reset_counters(self) -> None:
        self.consecutive_failures = 0
        self.consecutive_successes = 0


@dataclass(frozen=True)
class Transition:
    at: float
    from_state: str
    to_state: str
    reason: str


class CircuitBreaker:
    """closed -> open on consecutive failures or window error rate; open -> half_open after a
    cooldown that doubles on each re-open; half_open -> closed after N successes, or -> open on a failure.

    Time only moves through the injected clock, so every transition is testable without sleeps.
    """

    def __init__(self, settings: BreakerSettings, clock: Clock):
        self.settings = settings
        self.clock = clock
        self.window = OutcomeWindow(settings.window_s, clock)
        self._state = CLOSED
        self.opened_at: float | None = None
        self.cooldown_s = settings.cooldown_s
        self._half_open_successes = 0
        self.transitions: list[Transition] = []  # the last 50
        self.transition_count = 0  # ever, so a reader of the trimmed list knows what is new

    @property
    def state(self) -> str:
        """Current state; an open breaker whose cooldown has passed reads as half-open."""
        if self._state == OPEN and self.opened_at is not None:
            if self.clock() - self.opened_at >= self.cooldown_s:
                self._move(HALF_OPEN, f"cooldown of {self.cooldown_s:g}s passed", at=self.opened_at + self.cooldown_s)
                self._half_open_successes = 0
        return self._state

    def advance(self) -> str:
        """Apply what time alone changes (open -> half-open once the cooldown passed); the state."""
        return self.state

    def retry_at(self) -> float | None:
        """Clock time when an open breaker will let a trial through."""
        if self._state == OPEN and self.opened_at is not None:
            return self.opened_at + self.cooldown_s
        return None

    def reconfigure(self, settings: BreakerSettings) -> None:
        """New thresholds from a reloaded config; the state and its history stay."""
        if settings == self.settings:
            return
        self.settings = settings
        self.window.window_s = settings.window_s
        if self._state != OPEN:
            self.cooldown_s = settings.cooldown_s
        else:
            self.cooldown_s = min(self.cooldown_s, settings.max_cooldown_s)

    def allows_probe(self) -> bool:
        return self.state != OPEN

    def record(self, ok: bool, reason: str = "") -> Transition | None:
        """Feed one outcome; returns the transition it caused, if any."""
        state = self.state
        before = len(self.transitions)
        if state == OPEN:
            return None  # outcomes while open (health polls) do not move the breaker
        self.window.record(ok)
        if state == HALF_OPEN:
            if ok:
                self._half_open_successes += 1
                if self._half_open_successes >= self.settings.consecutive_successes:
                    self.cooldown_s = self.settings.cooldown_s
                    # Outcomes from before the recovery would keep a healed backend "degraded" for a window.
                    self.window = OutcomeWindow(self.settings.window_s, self.clock)
                    self._move(CLOSED, f"{self._half_open_successes} trial successes")
            else:
                self._open(f"trial failed: {reason}" if reason else "trial failed", grow=True)
        else:
            s = self.settings
            rate = self.window.error_rate()
            if not ok and self.window.consecutive_failures >= s.consecutive_failures:
                self._open(f"{self.window.consecutive_failures} consecutive failures" + (f" ({reason})" if reason else ""))
            elif not ok and rate is not None and len(self.window) >= s.min_requests and rate >= s.error_rate:
                self._open(f"error rate {rate:.0%} over {len(self.window)} requests in {s.window_s:g}s")
        return self.transitions[-1] if len(self.transitions) > before else None

    def _open(self, reason: str, grow: bool = False) -> None:
        if grow:
            self.cooldown_s = min(self.cooldown_s * 2, self.settings.max_cooldown_s)
        self.opened_at = self.clock()
        self.window.reset_counters()
        self._move(OPEN, reason)

    def _move(self, to_state: str, reason: str, at: float | None = None) -> None:
        self.transitions.append(Transition(self.clock() if at is None else at, self._state, to_state, reason))
        self.transition_count += 1
        del self.transitions[:-50]
        self._state = to_state


def served_matches(expected: str, served: Iterable[str], ollama: bool = False) -> bool:
    """Exact match, except that Ollama's untagged name means ':latest'. No prefix matching."""
    served = set(served)
    if expected in served:
        return True
    if ollama:
        if ":" not in expected and f"{expected}:latest" in served:
            return True
        if expected.endswith(":latest") and expected[: -len(":latest")] in served:
            return True
    return False


def missing_models(expected: Iterable[str], served: Iterable[str], ollama: bool = False) -> tuple[str, ...]:
    served = tuple(served)
    return tuple(m for m in expected if not served_matches(m, served, ollama))


def tripped_alerts(rules: Iterable[AlertRule], values: dict[str, float]) -> tuple[str, ...]:
    """Rules whose metric is present and over (or under) its threshold, as readable strings."""
    out = []
    for rule in rules:
        value = values.get(rule.metric)
        if value is None:
            continue
        if (rule.above is not None and value > rule.above) or (rule.below is not None and value < rule.below):
            out.append(f"{rule.describe()} (now {value:g})")
    return tuple(out)


@dataclass(frozen=True)
class StatusInputs:
    probed: bool  # any health poll or probe has completed
    circuit: str
    reachable: bool | None  # last health poll reached a server that answered (ready, loading or 429)
    loading: bool
    health_error: str | None
    probe_error: str | None
    missing: tuple[str, ...]
    alerts: tuple[str, ...]
    error_rate: float | None
    degraded_error_rate: float
    ttft_ms: float | None
    slow_ttft_ms: float
    rate_limited: bool
    models_unknown: str | None = None  # why the model list could not be read
    alerts_unknown: str | None = None  # why some alert rules could not be judged
    not_probed: str | None = None  # why no completion probe can be sent
    not_monitored: str | None = None  # the config says not to poll or probe it (probe = "off"), and so


def derive_status(i: StatusInputs) -> tuple[str, str | None]:
    """(status, reason) following DESIGN.md: down beats loading beats degraded beats healthy.

    The one place that decides: an input that could not be read (a model list, a metric an alert
    rule needs, a probe that cannot be sent) is never read as good; it makes the backend degraded,
    with the reason in words."""
    if i.not_monitored:
        return "unknown", i.not_monitored
    if not i.probed:
        return "unknown", "not yet probed"
    if i.circuit == OPEN:
        return "down", "circuit open" + (f": {i.health_error or i.probe_error}" if (i.health_error or i.probe_error) else "")
    if i.loading:
        return "loading", i.health_error or "loading model"
    if i.reachable is False:
        return "down", i.health_error or "unreachable"
    reasons = []
    if i.rate_limited:
        reasons.append("rate limited (429)")
    elif i.models_unknown:
        reasons.append(f"model list unknown: {i.models_unknown}")
    if i.missing:
        reasons.append("missing " + ", ".join(i.missing))
    if i.alerts:
        reasons.extend(i.alerts)
    if i.alerts_unknown:
        reasons.append(i.alerts_unknown)
    if i.not_probed and not i.rate_limited:
        reasons.append(i.not_probed)
    if i.probe_error:
        reasons.append(f"probe failed: {i.probe_error}")
    if i.error_rate is not None and i.error_rate >= i.degraded_error_rate:
        reasons.append(f"error rate {i.error_rate:.0%}")
    if i.ttft_ms is not None and i.ttft_ms > i.slow_ttft_ms:
        reasons.append(f"slow TTFT {i.ttft_ms:.0f} ms")
    if i.circuit == HALF_OPEN:
        reasons.append("circuit half-open")
    if reasons:
        return "degraded", "; ".join(reasons)
    return "healthy", None
