"""Numbers, durations and JSON from a backend, checked where they enter: finite, in range, and strict.

A backend may send NaN or Infinity (Python's json module accepts both tokens, and Prometheus
text has them too), a Retry-After of a thousand years, or a duration that overflows a timestamp.
None of that may reach the engine: a NaN poisons every sum and comparison it meets, an infinite
Retry-After would stop a backend being watched forever, and a huge timestamp crashes the clock
that prints it. Each kind is checked here, in one place.
"""

from __future__ import annotations

import email.utils
import json
import math
import time
from typing import Any

# The longest a 429's Retry-After pauses a backend. Cloud APIs ask for hours when a daily quota
# is spent; polling again every ten minutes costs nothing and notices the quota's reset.
MAX_RETRY_AFTER_S = 600.0
# Durations a server reports about one request (Ollama's load and eval times, llama.cpp's
# timings): more than an hour for a probe of a few tokens is not a measurement.
MAX_SERVER_DURATION_S = 3600.0


class _Constant(Exception):
    pass


def _refuse_constant(token: str) -> None:
    raise _Constant(token)


# One decoder for the usual case, a text with no NaN or Infinity: json.loads with a keyword
# builds a new decoder each call, a quarter of the cost of reading a stream chunk.
_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)


def loads(data: str | bytes, notes: list[str] | None = None, what: str = "JSON") -> Any:
    """json.loads where NaN, Infinity and -Infinity (which JSON does not allow, and Python's json
    accepts) read as absent (None); each is noted in `notes`, so the engine can say why a figure
    is missing."""
    if isinstance(data, (bytes, bytearray)):
        data = data.decode(json.detect_encoding(data), "surrogatepass")
    if data.startswith("\ufeff"):
        raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", data, 0)
    try:
        return _DECODER.decode(data)
    except _Constant:
        pass

    def absent(token: str) -> None:
        if notes is not None and len(notes) < 20:
            notes.append(f"{what}: {token} is not a number; read as absent")
        return None

    return json.loads(data, parse_constant=absent)


def finite(value: Any) -> float | None:
    """value as a float when it is a real, finite number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int too big for a float
        return None
    return number if math.isfinite(number) else None


def count(value: Any, maximum: int = 1 << 31) -> int | None:
    """A token count or the like: a non-negative int no larger than `maximum`, else None."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum:
        return None
    return value


def duration_s(value: Any, scale: float = 1.0, maximum: float = MAX_SERVER_DURATION_S) -> float | None:
    """A server-reported duration (value * scale seconds) when finite, not negative and at most
    `maximum`; else None, since a figure out of range is not a figure."""
    number = finite(value)
    if number is None:
        return None
    seconds = number * scale
    if not 0.0 <= seconds <= maximum:
        return None
    return seconds


def retry_after_s(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds from now, clamped to 0..MAX_RETRY_AFTER_S; None when absent or unreadable.

    It is either delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()[:64]
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
            seconds = when.timestamp() - (time.time() if now is None else now)
        except (TypeError, ValueError, OverflowError, IndexError):
            return None
    if math.isnan(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)
