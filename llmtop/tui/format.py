"""How a backend's figures read on screen: badges, numbers, glance levels and sort orders (pure, no Textual)."""

from __future__ import annotations

import math
import time
from typing import Callable, Iterable, NamedTuple

from llmtop.snapshot import BackendSnapshot, ProbeSummary

# A level names how a cell should catch the eye; the theme decides the colour (see palette.py).
OK, WARN, BAD, MUTED, PLAIN = "ok", "warn", "bad", "muted", "plain"


class Cell(NamedTuple):
    text: str
    level: str = PLAIN


NONE = Cell("-", MUTED)

# Symbol + word, so state reads without colour (NO_COLOR, 16 colours, colour-blind eyes).
STATUS_BADGES = {
    "healthy": Cell("● healthy", OK),
    "degraded": Cell("▲ degraded", WARN),
    "down": Cell("✖ down", BAD),
    "loading": Cell("◌ loading", WARN),
    "unknown": Cell("? unknown", MUTED),
}
STATUS_SYMBOLS = {"healthy": "●", "degraded": "▲", "down": "✖", "loading": "◌", "unknown": "?"}
ADMIN_BADGES = {
    "active": Cell("active", MUTED),
    "draining": Cell("⏸ draining", WARN),
    "disabled": Cell("○ disabled", MUTED),
}
CIRCUIT_BADGES = {
    "closed": Cell("closed", MUTED),
    "open": Cell("OPEN", BAD),
    "half_open": Cell("half-open", WARN),
}
EVENT_MARKS = {"error": Cell("✖", BAD), "warning": Cell("▲", WARN), "info": Cell("·", MUTED)}
PROBING = Cell("⟳ probing", PLAIN)

SPARK_BARS = "▁▂▃▄▅▆▇█"

# Glance thresholds for figures the engine does not judge itself. A value past its warning level
# ends in "!", past its alarm level in "!!", so it reads without colour.
TPS_WARN, TPS_BAD = 20.0, 5.0  # below reading speed a chat feels broken
LATENCY_WARN_MS, LATENCY_BAD_MS = 500.0, 2000.0
QUEUE_BAD = 10.0  # anything waiting at all is already worth a warning
KV_WARN, KV_BAD = 0.80, 0.95
MARKS = {WARN: "!", BAD: "!!"}


STALE = Cell("◷ stale", MUTED)


def status_badge(b: BackendSnapshot) -> Cell:
    """One meaning at every width: the symbol is the backend's health, the word is its health
    or, when the operator took it out of service, that (`● draining`: drained and healthy).
    A row whose agent is lost is `stale`: not known to be down, only unseen since then."""
    if b.stale_since is not None:
        return STALE
    if b.admin == "disabled":
        return ADMIN_BADGES["disabled"]  # nothing is sent to it: no health to show
    if b.admin == "draining":
        return Cell(f"{STATUS_SYMBOLS.get(b.status, '?')} draining", WARN)
    return STATUS_BADGES.get(b.status, Cell(b.status, MUTED))


def admin_badge(b: BackendSnapshot) -> Cell:
    return ADMIN_BADGES.get(b.admin, Cell(b.admin, MUTED))


def circuit_badge(b: BackendSnapshot) -> Cell:
    return CIRCUIT_BADGES.get(b.circuit, Cell(b.circuit, MUTED))


def ms(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 10:
        return f"{value:.1f}ms"  # a LAN health check answers in under a millisecond: "0ms" would say nothing
    if value < 1000:
        return f"{value:.0f}ms"
    if value < 10_000:
        return f"{value / 1000:.1f}s"
    return f"{value / 1000:.0f}s"


def _mark(text: str, level: str) -> Cell:
    return Cell(text + MARKS.get(level, ""), level)


def shown_probe(b: BackendSnapshot, now: float) -> tuple[ProbeSummary | None, bool]:
    """The probe whose figures the table shows, and whether they are current: the last probe's
    when they describe the backend now, else the last good one's, shown as old."""
    if b.figures_current(now):
        return b.probe, True
    return b.last_ok_probe, False


def _old(text: str) -> Cell:
    """A figure from before the backend's present state (down, failing, stale): in parentheses, dimmed."""
    return Cell(f"({text})", MUTED)


def ttft_cell(b: BackendSnapshot, slow_ms: float, now: float) -> Cell:
    p, current = shown_probe(b, now)
    if p is None or p.ttft_ms is None:
        return _not_probed(b)
    if not current:
        return _old(ms(p.ttft_ms))
    level = BAD if p.ttft_ms >= slow_ms else WARN if p.ttft_ms >= min(1000.0, slow_ms / 2) else PLAIN
    return _mark(ms(p.ttft_ms) + ("ʳ" if p.reasoning_only else ""), level)  # ʳ: all its tokens were reasoning


def _not_probed(b: BackendSnapshot) -> Cell:
    """Why there is no TTFT, in a word or two, where a figure would stand."""
    if b.admin == "active" and b.probe_mode != "completion":
        return Cell("health only" if b.probe_mode == "health" else "off", MUTED)
    if b.probe is not None and b.probe.note and b.probe.error is None:
        return Cell("thinking", MUTED)  # hidden reasoning used up max_tokens: nothing to time
    if b.admin == "active" and b.probe_note:
        if b.probe_note.startswith(("probe skipped", "interval stretched")):
            return Cell("skipped" if b.probe_note.startswith("probe skipped") else "budget", MUTED)
        return Cell("not loaded" if "not loaded" in b.probe_note else "no model", MUTED)
    if b.probe is not None and b.probe.untimed:
        return Cell("untimed", MUTED)
    return NONE


def tps_cell(b: BackendSnapshot, now: float) -> Cell:
    p, current = shown_probe(b, now)
    if p is None or p.tokens_per_s is None:
        return NONE
    tps = p.tokens_per_s
    text = f"{tps:.0f}" if tps >= 1000 else f"{tps:.1f}"
    if p.tokens_estimated:  # counted from chunks, not the server's usage figure
        text += "~"
    if not current:
        return _old(text)
    level = BAD if tps < TPS_BAD else WARN if tps < TPS_WARN else PLAIN
    return _mark(text, level)


def latency_cell(b: BackendSnapshot) -> Cell:
    if b.latency_ms is None:
        return NONE
    level = BAD if b.latency_ms >= LATENCY_BAD_MS else WARN if b.latency_ms >= LATENCY_WARN_MS else PLAIN
    return _mark(ms(b.latency_ms), level)


def queue_cell(b: BackendSnapshot) -> Cell:
    waiting = b.metrics.requests_waiting if b.metrics else None
    if waiting is None:
        return NONE
    level = BAD if waiting >= QUEUE_BAD else WARN if waiting > 0 else PLAIN
    return _mark(f"{waiting:g}", level)


def kv_cell(b: BackendSnapshot) -> Cell:
    kv = b.metrics.kv_cache_usage if b.metrics else None
    if kv is None:
        return NONE
    level = BAD if kv >= KV_BAD else WARN if kv >= KV_WARN else PLAIN
    return _mark(f"{kv:.0%}", level)


def models_cell(b: BackendSnapshot) -> Cell:
    """served/expected; `?` where the list could not be read, never a good count from no data."""
    text = b.models_summary()
    if b.models is None:
        return Cell(text, WARN if b.status != "down" else MUTED)
    if b.missing_models:
        return _mark(text, WARN)
    return Cell(text) if text else NONE


def age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    if seconds < 86400:
        return f"{seconds / 3600:.0f}h"
    return f"{seconds / 86400:.0f}d"


def age_cell(b: BackendSnapshot, now: float) -> Cell:
    """The age of the figures it sits beside (TTFT, tok/s), not of the last contact."""
    p, current = shown_probe(b, now)
    if p is None:
        return NONE
    return Cell(age(now - p.at), MUTED if current else WARN)


def history_mark(history: tuple) -> tuple[int, object]:
    """Changes whenever a point is added to a ring buffer, full or not; cheaper than comparing the points."""
    return len(history), history[-1] if history else None


def spark(values: Iterable[float], width: int, low: float | None = None, high: float | None = None) -> str:
    """The last `width` values as block characters, scaled to low..high (default: their own min and max)."""
    points = list(values)[-width:] if width > 0 else []
    if not points:
        return ""
    low = min(points) if low is None else low
    high = max(points) if high is None else high
    # Scaled to its own min..max, 602 -> 603 ms would draw as a cliff: the scale spans at least
    # a fifth of the values' size, so a small change looks small.
    min_span = abs(high) * 0.2
    if high - low < min_span:
        middle = (high + low) / 2
        low, high = middle - min_span / 2, middle + min_span / 2
    if high - low < 1e-9:
        return SPARK_BARS[len(SPARK_BARS) // 2] * len(points)
    top = len(SPARK_BARS) - 1
    return "".join(SPARK_BARS[round((min(max(v, low), high) - low) / (high - low) * top)] for v in points)


def clock_time(at: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(at))


def matches(b: BackendSnapshot, needle: str) -> bool:
    """The `/` filter: a case-insensitive substring of the name, provider, status, admin state,
    agent (`local` for this machine's own) or a model name (served or expected). Costs at most what the engine keeps per backend."""
    if not needle:
        return True
    needle = needle.lower()
    fields = (b.name, b.provider, b.status, b.admin, b.agent or "local", *b.expected_models, *(b.models or ()))
    return any(needle in field.lower() for field in fields)


# -- sort orders: the first direction of each puts what needs attention first ---------------

_STATUS_RANK = {"down": 0, "degraded": 1, "loading": 2, "unknown": 3, "healthy": 6}
_ADMIN_RANK = {"draining": 4, "disabled": 5}
_CIRCUIT_RANK = {"open": 0, "half_open": 1, "closed": 2}
NO_FIGURE = float("inf")


def _status_rank(b: BackendSnapshot) -> int:
    if b.stale_since is not None:
        return 3  # unseen: with the unknown
    return _ADMIN_RANK.get(b.admin, _STATUS_RANK.get(b.status, 3))


def _figure(value: float | None, biggest_first: bool = True) -> float:
    if value is None:
        return NO_FIGURE  # no figure sorts last, whichever way
    return -value if biggest_first else value


def _probe_figure(b: BackendSnapshot, attr: str, biggest_first: bool) -> float:
    p = b.probe if b.probe is not None and b.probe is b.last_ok_probe else b.last_ok_probe
    return _figure(getattr(p, attr) if p is not None else None, biggest_first)


def _age(b: BackendSnapshot) -> float:
    p = b.last_ok_probe
    return p.at if p is not None else NO_FIGURE  # oldest first


def _models(b: BackendSnapshot) -> tuple:
    unknown = b.models is None
    return (not unknown and not b.missing_models, -len(b.missing_models))


class Sort(NamedTuple):
    key: str  # a column key
    label: str  # what the first direction puts first
    order: Callable[[BackendSnapshot], tuple]


SORTS = (
    Sort("status", "status, worst first", lambda b: (_status_rank(b), b.name)),
    Sort("name", "name", lambda b: (b.name,)),
    Sort("ttft", "TTFT, slowest first", lambda b: (_probe_figure(b, "ttft_ms", True), b.name)),
    Sort("tps", "tok/s, slowest first", lambda b: (_probe_figure(b, "tokens_per_s", False), b.name)),
    Sort("latency", "latency, slowest first", lambda b: (_figure(b.latency_ms), b.name)),
    Sort("queue", "queue, longest first", lambda b: (_figure(b.metrics.requests_waiting if b.metrics else None), b.name)),
    Sort("kv", "KV cache, fullest first", lambda b: (_figure(b.metrics.kv_cache_usage if b.metrics else None), b.name)),
    Sort("models", "models, missing first", lambda b: (*_models(b), b.name)),
    Sort("age", "age, oldest first", lambda b: (_age(b), b.name)),
    Sort("circuit", "circuit, open first", lambda b: (_CIRCUIT_RANK.get(b.circuit, 3), b.name)),
    Sort("provider", "provider", lambda b: (b.provider, b.name)),
)
SORT_NAMES = tuple(s.key for s in SORTS)
SORT_LABELS = {s.key: s.label for s in SORTS}
SORT_KEYS = {s.key: s.order for s in SORTS}


def percentile(values: list[float], fraction: float) -> float | None:
    """The nearest-rank percentile (p50, p95) of what the history keeps; None when it is empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))]
