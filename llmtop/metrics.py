"""Read Prometheus text (the few series llmtop uses) and map engine-specific names to common fields."""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

from llmtop.snapshot import Metrics


class MetricsParseError(ValueError):
    pass


@dataclass(frozen=True)
class MetricNames:
    """Which series an engine uses for each common field; the first name present wins (renames)."""

    requests_running: tuple[str, ...] = ()
    requests_waiting: tuple[str, ...] = ()
    kv_cache_usage: tuple[str, ...] = ()
    ttft_histogram: tuple[str, ...] = ()  # histogram base names, in seconds
    tpot_histogram: tuple[str, ...] = ()  # seconds per output token after the first (its inverse is the decode rate)
    tokens_per_s_gauge: tuple[str, ...] = ()  # engines that export the decode rate itself


_SAMPLE_START = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*[{ ]")
_SUFFIXES = ("_total", "_sum", "_count", "_bucket", "_created", "_info")


def _base(name: str) -> str:
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def select_series(text: str, wanted: set[str]) -> str:
    """Keep only the sample lines of the wanted series (their buckets and `_created` stamps left out).

    A real vLLM page is ~60 KB of hundreds of series; llmtop reads a handful, so only their lines
    are parsed. `wanted` holds sample or family names; suffixes are understood. One regular
    expression per set of names finds them: a Python loop over every line of a 60 KB page cost
    1.2 ms (a tenth of a core at 500 backends polled every 5 s); the expression, 0.1 ms. It is
    not anchored with a multiline ^ (tried at every character of the page, 0.45 ms); a match
    counts where it starts a line.
    """
    found = _series_pattern(frozenset(wanted)).finditer(text)
    return "\n".join(m.group() for m in found if m.start() == 0 or text[m.start() - 1] == "\n") + "\n"


@functools.lru_cache(maxsize=64)
def _series_pattern(wanted: frozenset[str]) -> re.Pattern[str]:
    bases = wanted | {_base(n) for n in wanted}
    # Buckets are never read (a histogram's _sum/_count give its mean) and are most of its lines.
    names = {n for n in wanted if not n.endswith(("_bucket", "_created"))}
    names |= {b + suffix for b in bases for suffix in _SUFFIXES if suffix not in ("_bucket", "_created")}
    names |= bases
    # The name, then its labels and value up to the end of the line, or the line's end at once.
    return re.compile(_trie_pattern(sorted(names)) + r"(?:[{ \t][^\n]*)?(?=\n|\Z)")


def _trie_pattern(names: list[str]) -> str:
    """A regex matching exactly `names`, as a trie ("vllm:(?:a|b)" rather than "vllm:a|vllm:b"):
    the regex engine tries alternatives one by one, so shared prefixes are read once, not once
    per name."""
    groups: dict[str, list[str]] = {}
    for name in names:
        if name:
            groups.setdefault(name[0], []).append(name[1:])
    parts = [re.escape(head) + _trie_pattern(tails) for head, tails in sorted(groups.items())]
    if not parts:
        return ""
    body = parts[0] if len(parts) == 1 else "(?:" + "|".join(parts) + ")"
    return "(?:" + body + ")?" if "" in names else body


def wanted_series(names: "MetricNames", extra: tuple[str, ...] = ()) -> set[str]:
    return {
        *names.requests_running,
        *names.requests_waiting,
        *names.kv_cache_usage,
        *names.ttft_histogram,
        *names.tpot_histogram,
        *names.tokens_per_s_gauge,
        *extra,
    }


# A sample line: its name, its label set (skipped whole: quoted values may hold braces, commas
# and escaped quotes), then the value and an optional timestamp.
_SAMPLE = re.compile(r'([a-zA-Z_:][a-zA-Z0-9_:]*)[ \t]*(?:\{(?:[^"}]|"(?:[^"\\]|\\.)*")*\}[ \t]*)?([^ \t]+)')


def samples(text: str):
    """(name, value) of each sample line, in order. Labels are not read: every figure llmtop takes
    sums or maximises over label sets. Written for speed (prometheus_client's parser reads a
    label set a character at a time, a fifth of the CPU a poll cost at 500 backends) and held to
    prometheus_client's reading of the same pages by the tests."""
    for line in text.split("\n"):
        line = line.strip()
        if not line or line[0] == "#":
            continue
        match = _SAMPLE.match(line)
        if match is None:
            raise MetricsParseError(f"metrics page is not Prometheus text (line {line[:40]!r})")
        try:
            value = float(match.group(2))
        except ValueError:
            raise MetricsParseError(f"metrics page is not Prometheus text (value in {line[:40]!r})") from None
        yield match.group(1), value


def parse_samples(
    text: str, max_of: tuple[str, ...] = (), ignored: list[str] | None = None
) -> tuple[dict[str, float], dict[str, float]]:
    """One pass over the page: every sample summed by name across its label sets (buckets and
    `_created` stamps dropped), and the maximum of the series named in `max_of`.

    NaN and ±Inf (which Prometheus text allows) carry no reading: such a sample is left out, and
    its series named in `ignored`, so the engine can say why a figure is absent.

    Summing is right for the gauges and counters we read (requests across engines or models);
    a histogram's `_sum` and `_count` sum too, so their ratio stays a true mean. KV-cache usage
    takes the maximum: the fullest engine matters, not a sum of fractions.
    """
    totals: dict[str, float] = {}
    maxima: dict[str, float] = {}
    for name, value in samples(text):
        if name.endswith("_bucket") or name.endswith("_created"):
            continue
        if not math.isfinite(value):  # NaN poisons sums; an infinite gauge is no reading
            if ignored is not None and name not in ignored:
                ignored.append(name)
            continue
        totals[name] = totals.get(name, 0.0) + value
        if name in max_of:
            maxima[name] = max(maxima.get(name, value), value)
    for name in [n for n, v in totals.items() if not math.isfinite(v)]:  # finite values summed past the float range
        del totals[name]
        if ignored is not None and name not in ignored:
            ignored.append(name)
    return totals, maxima


def _first(values: dict[str, float], names: tuple[str, ...]) -> float | None:
    for name in names:
        if name in values:
            return values[name]
    return None


def _histogram_mean(values: dict[str, float], bases: tuple[str, ...], previous: Metrics | None) -> float | None:
    """Mean of the first histogram present: over the interval since `previous` when it saw new
    observations (what the server does now), else since the server started."""
    for base in bases:
        total, count = values.get(f"{base}_sum"), values.get(f"{base}_count")
        if total is None or count is None:
            continue
        if previous is not None:
            prev_total = previous.raw.get(f"{base}_sum")
            prev_count = previous.raw.get(f"{base}_count")
            # A counter that went down is a server that restarted: its figures since the start are
            # the ones to read, not a difference against the old process's (which came out negative).
            if prev_total is not None and prev_count is not None and count > prev_count and total >= prev_total:
                return (total - prev_total) / (count - prev_count)
        mean = total / count if count > 0 else None
        return mean if mean is None or mean >= 0 else None
    return None


def _finite(value: float | None) -> float | None:
    """A derived figure (a mean, a rate) that came out NaN or infinite is no figure."""
    return value if value is not None and math.isfinite(value) else None


def map_metrics(
    text: str, names: MetricNames, previous: Metrics | None = None, extra: tuple[str, ...] = ()
) -> Metrics:
    """Common fields from one scrape, plus the `extra` series alert rules name. The server's TTFT
    and decode rate are means over the interval since `previous` (see _histogram_mean)."""
    if not text.strip():
        return Metrics()
    first = text.lstrip().split("\n", 1)[0]
    if not (first.startswith("#") or _SAMPLE_START.match(first)):
        raise MetricsParseError(f"metrics page is not Prometheus text (starts {first[:40]!r})")
    ignored: list[str] = []
    values, maxima = parse_samples(select_series(text, wanted_series(names, extra)), names.kv_cache_usage, ignored)
    kv = _first(maxima, names.kv_cache_usage)
    server_ttft = _histogram_mean(values, names.ttft_histogram, previous)
    tpot = _histogram_mean(values, names.tpot_histogram, previous)
    rate = 1.0 / tpot if tpot and tpot > 0 else _first(values, names.tokens_per_s_gauge)
    return Metrics(
        requests_running=_first(values, names.requests_running),
        requests_waiting=_first(values, names.requests_waiting),
        kv_cache_usage=kv,  # every engine mapped here exports a 0..1 fraction
        server_ttft_ms=_finite(None if server_ttft is None else server_ttft * 1000.0),
        server_tokens_per_s=_finite(rate),
        raw=values,
        ignored=tuple(f"metric {name}: not a finite number, ignored" for name in ignored[:10]),
    )


def alert_values(metrics: Metrics) -> dict[str, float]:
    """What alert rules can name: any exposed series name, or a common field name."""
    return {**metrics.raw, **metrics.common()}
