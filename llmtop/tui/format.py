"""How a backend's figures read on screen: badges, numbers, glance levels and sort orders (pure, no Textual)."""

from __future__ import annotations

import time
from typing import Iterable, NamedTuple

from llmtop.snapshot import BackendSnapshot

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

# Glance thresholds for figures the engine does not judge itself. A value past "bad" also gets a
# trailing "!" so it reads without colour.
TPS_WARN, TPS_BAD = 20.0, 5.0  # below reading speed a chat feels broken
LATENCY_WARN_MS, LATENCY_BAD_MS = 500.0, 2000.0
QUEUE_BAD = 10.0  # anything waiting at all is already worth a warning
KV_WARN, KV_BAD = 0.80, 0.95


def status_badge(b: BackendSnapshot, with_admin: bool = False) -> Cell:
    """The health badge; with_admin lets a drained or disabled state stand in for it (compact layouts)."""
    if with_admin and b.admin != "active":
        return ADMIN_BADGES[b.admin]
    return STATUS_BADGES.get(b.status, Cell(b.status, MUTED))


def admin_badge(b: BackendSnapshot) -> Cell:
    return ADMIN_BADGES.get(b.admin, Cell(b.admin, MUTED))


def circuit_badge(b: BackendSnapshot) -> Cell:
    return CIRCUIT_BADGES.get(b.circuit, Cell(b.circuit, MUTED))


def ms(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 1000:
        return f"{value:.0f}ms"
    if value < 10_000:
        return f"{value / 1000:.1f}s"
    return f"{value / 1000:.0f}s"


def _mark(text: str, level: str) -> Cell:
    return Cell(text + "!" if level == BAD else text, level)


def ttft_cell(b: BackendSnapshot, slow_ms: float) -> Cell:
    p = b.probe
    if p is None or p.ttft_ms is None:
        return NONE
    level = BAD if p.ttft_ms >= slow_ms else WARN if p.ttft_ms >= min(1000.0, slow_ms / 2) else PLAIN
    return _mark(ms(p.ttft_ms), level)


def tps_cell(b: BackendSnapshot) -> Cell:
    p = b.probe
    if p is None or p.tokens_per_s is None:
        return NONE
    tps = p.tokens_per_s
    text = f"{tps:.0f}" if tps >= 1000 else f"{tps:.1f}"
    if p.tokens_estimated:  # counted from chunks, not the server's usage figure
        text += "~"
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
    if b.expected_models:
        served = len(b.expected_models) - len(b.missing_models)
        text = f"{served}/{len(b.expected_models)}"
        return Cell(text + " !", WARN) if b.missing_models else Cell(text)
    if b.models:
        return Cell(str(len(b.models)))
    return NONE


def last_contact(b: BackendSnapshot) -> float | None:
    """Wall time of the newest poll or probe answer, whichever came last."""
    times = [t for t in (b.last_health_at, b.probe.at if b.probe else None) if t is not None]
    return max(times) if times else None


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


def age_cell(b: BackendSnapshot, now: float, stale_s: float) -> Cell:
    last = last_contact(b)
    if last is None:
        return NONE
    seconds = now - last
    return Cell(age(seconds), WARN if seconds >= stale_s else MUTED)


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
    """The `/` filter: a case-insensitive substring of the name, provider, status or admin state."""
    if not needle:
        return True
    needle = needle.lower()
    return any(needle in field.lower() for field in (b.name, b.provider, b.status, b.admin))


# -- sort orders: each puts the backends that need attention first --------------------------

_STATUS_RANK = {"down": 0, "degraded": 1, "loading": 2, "unknown": 3, "healthy": 6}
_ADMIN_RANK = {"draining": 4, "disabled": 5}
_LAST = float("inf")


def _status_rank(b: BackendSnapshot) -> int:
    return _ADMIN_RANK.get(b.admin, _STATUS_RANK.get(b.status, 3))


def _ttft(b: BackendSnapshot) -> float:
    return -b.probe.ttft_ms if b.probe and b.probe.ttft_ms is not None else _LAST


def _tps(b: BackendSnapshot) -> float:
    return b.probe.tokens_per_s if b.probe and b.probe.tokens_per_s is not None else _LAST


def _queue(b: BackendSnapshot) -> float:
    waiting = b.metrics.requests_waiting if b.metrics else None
    return -waiting if waiting is not None else _LAST


SORTS = (
    ("name", "name", lambda b: (b.name,)),
    ("status", "status, worst first", lambda b: (_status_rank(b), b.name)),
    ("ttft", "TTFT, slowest first", lambda b: (_ttft(b), b.name)),
    ("tps", "tok/s, slowest first", lambda b: (_tps(b), b.name)),
    ("queue", "queue, longest first", lambda b: (_queue(b), b.name)),
)
SORT_NAMES = tuple(s[0] for s in SORTS)
SORT_LABELS = {name: label for name, label, _ in SORTS}
SORT_KEYS = {name: key for name, _, key in SORTS}
