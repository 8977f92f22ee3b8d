"""Parse Prometheus text with prometheus_client's parser and map engine-specific names to common fields."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from llmtop.snapshot import Metrics


class MetricsParseError(ValueError):
    pass


@dataclass(frozen=True)
class MetricNames:
    """Which series an engine uses for each common field; the first name present wins (renames)."""

    requests_running: tuple[str, ...] = ()
    requests_waiting: tuple[str, ...] = ()
    kv_cache_usage: tuple[str, ...] = ()
    kv_cache_scale: float = 1.0  # multiply to get a 0..1 fraction
    ttft_histogram: tuple[str, ...] = ()  # histogram base names, in seconds


def parse_samples(text: str) -> dict[str, float]:
    """Sum every sample by name across its label sets; buckets and `_created` stamps are dropped.

    Summing is right for the gauges and counters we read (requests across engines or models);
    a histogram's `_sum` and `_count` sum too, so their ratio stays a true mean.
    """
    totals: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                name = sample.name
                if name.endswith("_bucket") or name.endswith("_created"):
                    continue
                value = sample.value
                if value != value:  # NaN carries no information and poisons sums
                    continue
                totals[name] = totals.get(name, 0.0) + value
    except (ValueError, TypeError, IndexError, KeyError) as exc:
        raise MetricsParseError(f"metrics page is not Prometheus text ({exc})") from None
    return totals


def _max_by_name(text: str, names: tuple[str, ...]) -> dict[str, float]:
    """For KV-cache usage: the fullest engine matters, not the sum of fractions."""
    wanted = set(names)
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                out[sample.name] = max(out.get(sample.name, float("-inf")), sample.value)
    return out


def _first(values: dict[str, float], names: tuple[str, ...]) -> float | None:
    for name in names:
        if name in values:
            return values[name]
    return None


def map_metrics(text: str, names: MetricNames, previous: Metrics | None = None) -> Metrics:
    """Common fields from one scrape. Server TTFT is the mean over the interval since `previous`
    when requests happened in between, else the mean since the server started."""
    if not text.strip():
        return Metrics()
    values = parse_samples(text)
    kv = None
    if names.kv_cache_usage:
        present = _max_by_name(text, names.kv_cache_usage)
        kv_raw = _first(present, names.kv_cache_usage)
        kv = None if kv_raw is None else kv_raw * names.kv_cache_scale
    server_ttft = None
    for base in names.ttft_histogram:
        total, count = values.get(f"{base}_sum"), values.get(f"{base}_count")
        if total is None or count is None:
            continue
        if previous is not None:
            prev_total = previous.raw.get(f"{base}_sum")
            prev_count = previous.raw.get(f"{base}_count")
            if prev_total is not None and prev_count is not None and count > prev_count:
                server_ttft = (total - prev_total) / (count - prev_count) * 1000.0
                break
        if count > 0:
            server_ttft = total / count * 1000.0
        break
    metrics = Metrics(
        requests_running=_first(values, names.requests_running),
        requests_waiting=_first(values, names.requests_waiting),
        kv_cache_usage=kv,
        server_ttft_ms=server_ttft,
        raw=values,
    )
    return metrics


def alert_values(metrics: Metrics) -> dict[str, float]:
    """What alert rules can name: any exposed series name, or a common field name."""
    return {**metrics.raw, **metrics.common()}
