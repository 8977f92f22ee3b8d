"""Prometheus metrics made at scrape time from the latest snapshot: a custom collector, no second set of counters."""

from __future__ import annotations

import itertools
from typing import Callable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    StateSetMetricFamily,
)
from prometheus_client.registry import Collector

from llmtop import __version__
from llmtop.serve.readiness import readiness
from llmtop.snapshot import ADMIN_STATES, CIRCUITS, STATUSES, TPS_BUCKETS, TTFT_BUCKETS_S, BackendSnapshot, FleetSnapshot

MIB = 1024 * 1024


def _bounds(bounds: tuple[float, ...]) -> list[str]:
    return [repr(float(b)) for b in bounds] + ["+Inf"]


class FleetCollector(Collector):
    """Every family from one snapshot, taken once per scrape (`snapshot()`), so all series of a
    scrape describe the same instant. Names follow Prometheus' conventions: an `llmtop_` prefix,
    base units (seconds, ratios, bytes), `_total` counters, state sets for enums, `_info`."""

    def __init__(self, snapshot: Callable[[], FleetSnapshot], ready_when: Callable[[], tuple[str, ...]]):
        self._snapshot = snapshot
        self._ready_when = ready_when

    def describe(self):
        return []  # made at scrape time; nothing to check at registration

    def collect(self) -> Iterator:
        fleet = self._snapshot()
        ready_when = self._ready_when()
        yield InfoMetricFamily("llmtop_build", "llmtop's version.", value={"version": __version__})
        names = sorted({k for b in fleet.backends for k, _ in b.labels})
        keys = ["backend", "provider", *names]

        def family(cls, name: str, doc: str, extra: tuple[str, ...] = (), **kw):
            return cls(name, doc, labels=[*keys, *extra], **kw)

        def labels(b: BackendSnapshot, *extra: str) -> list[str]:
            own = dict(b.labels)
            return [b.name, b.provider, *(own.get(n, "") for n in names), *extra]

        up = family(GaugeMetricFamily, "llmtop_backend_up", "1 when the backend's last health poll answered (ready or loading), else 0.")
        ready = family(GaugeMetricFamily, "llmtop_backend_ready", "1 when the backend should take traffic (what /backends/NAME/ready answers 200 for).")
        status = family(StateSetMetricFamily, "llmtop_backend_status", "The backend's health, one series per status.")
        circuit = family(StateSetMetricFamily, "llmtop_backend_circuit", "The circuit breaker's state.")
        admin = family(StateSetMetricFamily, "llmtop_backend_admin", "The operator's state: active, draining or disabled.")
        latency = family(GaugeMetricFamily, "llmtop_backend_health_latency_seconds", "The last health poll's latency.")
        missing = family(GaugeMetricFamily, "llmtop_backend_model_missing", "1 when an expected model is not served, 0 when it is (absent while the model list is unknown).", ("model",))
        models_known = family(GaugeMetricFamily, "llmtop_backend_model_list_known", "1 when the backend's model list could be read.")
        alert = family(GaugeMetricFamily, "llmtop_backend_alert_tripped", "1 when a configured metric rule is tripped, 0 when not.", ("rule",))
        running = family(GaugeMetricFamily, "llmtop_backend_requests_running", "Requests the engine is running (its own metric).")
        waiting = family(GaugeMetricFamily, "llmtop_backend_requests_waiting", "Requests waiting in the engine's queue (its own metric).")
        kv = family(GaugeMetricFamily, "llmtop_backend_kv_cache_usage_ratio", "The engine's KV-cache usage, 0 to 1.")
        server_ttft = family(GaugeMetricFamily, "llmtop_backend_server_ttft_seconds", "The engine's own mean time to first token over its last scrape interval.")
        last_ttft = family(GaugeMetricFamily, "llmtop_probe_last_ttft_seconds", "The last probe's time to first token (absent when it is not current).")
        last_tps = family(GaugeMetricFamily, "llmtop_probe_last_decode_tokens_per_second", "The last probe's decode rate (absent when it is not current).")
        ttft_hist = family(HistogramMetricFamily, "llmtop_probe_ttft_seconds", "Time to first token of every probe that measured one.")
        tps_hist = family(HistogramMetricFamily, "llmtop_probe_decode_tokens_per_second", "Decode rate of every probe that measured one.")
        probes = family(CounterMetricFamily, "llmtop_probes", "Completion probes sent.")
        failures = family(CounterMetricFamily, "llmtop_probe_failures", "Completion probes that failed (or were refused).")
        tokens = family(CounterMetricFamily, "llmtop_probe_output_tokens", "Output tokens the probes were given: what they cost.")
        transitions = family(CounterMetricFamily, "llmtop_breaker_transitions", "Circuit breaker transitions.")
        last_success = family(GaugeMetricFamily, "llmtop_probe_last_success_timestamp_seconds", "When a probe last measured a time to first token (Unix time).")

        for b in fleet.backends:
            own = labels(b)
            if b.last_health_at is not None and b.admin != "disabled":
                up.add_metric(own, 1.0 if b.latency_ms is not None or b.status == "loading" else 0.0)
            ready.add_metric(own, 1.0 if readiness(b, ready_when).ready else 0.0)
            status.add_metric(own, {s: b.status == s for s in STATUSES})
            circuit.add_metric(own, {c: b.circuit == c for c in CIRCUITS})
            admin.add_metric(own, {a: b.admin == a for a in ADMIN_STATES})
            if b.latency_ms is not None:
                latency.add_metric(own, b.latency_ms / 1000.0)
            models_known.add_metric(own, 0.0 if b.models is None else 1.0)
            if b.models is not None:
                for model in b.expected_models:
                    missing.add_metric(labels(b, model), 1.0 if model in b.missing_models else 0.0)
            if b.metrics is not None:
                tripped = {a.split(" (now")[0] for a in b.alerts}
                for rule in b.alert_rules:
                    alert.add_metric(labels(b, rule), 1.0 if rule in tripped else 0.0)
                m = b.metrics
                for fam, value, scale in ((running, m.requests_running, 1.0), (waiting, m.requests_waiting, 1.0),
                                          (kv, m.kv_cache_usage, 1.0), (server_ttft, m.server_ttft_ms, 0.001)):
                    if value is not None:
                        fam.add_metric(own, value * scale)
            if b.figures_current(fleet.at) and b.probe is not None:
                if b.probe.ttft_ms is not None:
                    last_ttft.add_metric(own, b.probe.ttft_ms / 1000.0)
                if b.probe.tokens_per_s is not None:
                    last_tps.add_metric(own, b.probe.tokens_per_s)
            c = b.counters
            ttft_hist.add_metric(own, list(zip(_bounds(TTFT_BUCKETS_S), itertools.accumulate(c.ttft_buckets))), sum_value=c.ttft_sum_s)
            tps_hist.add_metric(own, list(zip(_bounds(TPS_BUCKETS), itertools.accumulate(c.tps_buckets))), sum_value=c.tps_sum)
            probes.add_metric(own, c.probes)
            failures.add_metric(own, c.probe_failures)
            tokens.add_metric(own, c.probe_tokens)
            transitions.add_metric(own, c.breaker_transitions)
            if c.last_success_at is not None:
                last_success.add_metric(own, c.last_success_at)
        yield from (up, ready, status, circuit, admin, latency, models_known, missing, alert, running, waiting, kv,
                    server_ttft, last_ttft, last_tps, ttft_hist, tps_hist, probes, failures, tokens, transitions,
                    last_success)
        yield from _gpu_families(fleet)


def _gpu_families(fleet: FleetSnapshot) -> Iterator:
    keys = ["gpu", "name"]
    util = GaugeMetricFamily("llmtop_gpu_utilization_ratio", "GPU utilization, 0 to 1.", labels=keys)
    used = GaugeMetricFamily("llmtop_gpu_memory_used_bytes", "GPU memory in use.", labels=keys)
    total = GaugeMetricFamily("llmtop_gpu_memory_total_bytes", "GPU memory in all.", labels=keys)
    temp = GaugeMetricFamily("llmtop_gpu_temperature_celsius", "GPU temperature.", labels=keys)
    power = GaugeMetricFamily("llmtop_gpu_power_watts", "GPU power draw.", labels=keys)
    limit = GaugeMetricFamily("llmtop_gpu_power_limit_watts", "GPU enforced power limit.", labels=keys)
    for g in fleet.gpu.gpus:
        own = [str(g.index), g.name]
        for fam, value, scale in ((util, g.utilization_pct, 0.01), (used, g.memory_used_mib, MIB), (total, g.memory_total_mib, MIB),
                                  (temp, g.temperature_c, 1.0), (power, g.power_w, 1.0), (limit, g.power_limit_w, 1.0)):
            if value is not None:
                fam.add_metric(own, value * scale)
    yield from (util, used, total, temp, power, limit)


def registry(snapshot: Callable[[], FleetSnapshot], ready_when: Callable[[], tuple[str, ...]]) -> CollectorRegistry:
    """A registry of its own (not prometheus_client's global one) holding just the fleet collector."""
    reg = CollectorRegistry()
    reg.register(FleetCollector(snapshot, ready_when))
    return reg
