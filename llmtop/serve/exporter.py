"""Prometheus metrics made at scrape time from the latest snapshot: every series read off it (no second set of counters), rendered fast.

One table says what families there are (FAMILIES) and one function what a backend's series are
(backend_series). Two things turn those into Prometheus' formats:
- `Exposition`, what /metrics answers with: the text format, or OpenMetrics when asked, written
  directly, each backend's lines kept until the engine makes it a new snapshot. prometheus_client's own
  writer took 220 ms (text) and 330 ms (OpenMetrics, what Prometheus asks for) to render 500
  backends, on the event loop every probe is timed on; this takes a few milliseconds;
- `FleetCollector`, a prometheus_client collector over the same series, for Python users who
  register it in a registry of their own, and for the tests, which hold the fast output to what
  prometheus_client makes of the same data.
Names follow Prometheus' conventions: an `llmtop_` prefix, base units (seconds, ratios, bytes),
`_total` counters, state sets for enums, `_info` for the build.
"""

from __future__ import annotations

import itertools
from typing import Callable, Iterator, NamedTuple

from llmtop import __version__
from llmtop.metrics import alert_values
from llmtop.serve.readiness import readiness
from llmtop.snapshot import ADMIN_STATES, CIRCUITS, STATUSES, TPS_BUCKETS, TTFT_BUCKETS_S, BackendSnapshot, FleetSnapshot

MIB = 1024 * 1024
TEXT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"


class Family(NamedTuple):
    name: str
    kind: str  # gauge | counter | stateset | histogram
    help: str
    extra: str | None = None  # the label of a series' own (model, rule), besides the backend's


FAMILIES = (
    Family("llmtop_backend_up", "gauge", "1 when the backend's last health poll answered (ready or loading), else 0."),
    Family("llmtop_backend_ready", "gauge", "1 when the backend should take traffic (what /backends/NAME/ready answers 200 for)."),
    Family("llmtop_backend_status", "stateset", "The backend's health, one series per status."),
    Family("llmtop_backend_circuit", "stateset", "The circuit breaker's state."),
    Family("llmtop_backend_admin", "stateset", "The operator's state: active, draining or disabled."),
    Family("llmtop_backend_health_latency_seconds", "gauge", "The last health poll's latency."),
    Family("llmtop_backend_model_list_known", "gauge", "1 when the backend's model list could be read."),
    Family("llmtop_backend_models_served", "gauge", "How many models the backend lists (absent while the model list is unknown)."),
    Family("llmtop_backend_model_missing", "gauge", "1 when an expected model is not served, 0 when it is (absent while the model list is unknown).", "model"),
    Family("llmtop_backend_alert_tripped", "gauge", "1 when a configured metric rule is tripped, 0 when not.", "rule"),
    Family("llmtop_backend_requests_running", "gauge", "Requests the engine is running (its own metric)."),
    Family("llmtop_backend_requests_waiting", "gauge", "Requests waiting in the engine's queue (its own metric)."),
    Family("llmtop_backend_kv_cache_usage_ratio", "gauge", "The engine's KV-cache usage, 0 to 1."),
    Family("llmtop_backend_server_ttft_seconds", "gauge", "The engine's own mean time to first token over its last scrape interval."),
    Family("llmtop_probe_last_ttft_seconds", "gauge", "The last probe's time to first token (absent when it is not current)."),
    Family("llmtop_probe_last_decode_tokens_per_second", "gauge", "The last probe's decode rate (absent when it is not current)."),
    Family("llmtop_probe_ttft_seconds", "histogram", "Time to first token of every probe that measured one."),
    Family("llmtop_probe_decode_tokens_per_second", "histogram", "Decode rate of every probe that measured one."),
    Family("llmtop_probes", "counter", "Completion probes sent."),
    Family("llmtop_probe_failures", "counter", "Completion probes that failed (or were refused)."),
    Family("llmtop_probe_output_tokens", "counter", "Output tokens the probes were given: what they cost."),
    Family("llmtop_probe_input_tokens", "counter", "Input (prompt) tokens the probes were charged, where the server reports usage."),
    Family("llmtop_probe_cost", "counter", "What the probes cost at the configured prices, in their currency (absent without a price)."),
    Family("llmtop_probes_skipped", "counter", "Due probes not sent because skip_probe_when said the backend was saturated."),
    Family("llmtop_probe_interval_seconds", "gauge", "Seconds between completion probes now, after any budget stretched it (absent when none are sent)."),
    Family("llmtop_breaker_transitions", "counter", "Circuit breaker transitions."),
    Family("llmtop_probe_last_success_timestamp_seconds", "gauge", "When a probe last measured a time to first token (Unix time)."),
)
FIRST_COUNT = [f.name for f in FAMILIES].index("llmtop_probe_ttft_seconds")  # where probe_count_series' families begin
GPU_FAMILIES = (
    Family("llmtop_gpu_utilization_ratio", "gauge", "GPU utilization, 0 to 1."),
    Family("llmtop_gpu_memory_used_bytes", "gauge", "GPU memory in use."),
    Family("llmtop_gpu_memory_total_bytes", "gauge", "GPU memory in all."),
    Family("llmtop_gpu_temperature_celsius", "gauge", "GPU temperature."),
    Family("llmtop_gpu_power_watts", "gauge", "GPU power draw."),
    Family("llmtop_gpu_power_limit_watts", "gauge", "GPU enforced power limit."),
)
BUILD = Family("llmtop_build", "info", "llmtop's version.")
TTFT_BOUNDS = (*TTFT_BUCKETS_S, float("inf"))
TPS_BOUNDS = (*TPS_BUCKETS, float("inf"))

# A series' value: a number; a state set {state: on}; or a histogram (bounds, cumulative counts, sum).
Series = list[tuple[tuple[str, ...], object]]


def backend_series(b: BackendSnapshot, now: float, ready_when: tuple[str, ...]) -> dict[str, Series]:
    """Every series of one backend, by family name: (values of the family's own label, value)."""
    return {**health_series(b, now, ready_when), **probe_count_series(b)}


def health_series(b: BackendSnapshot, now: float, ready_when: tuple[str, ...]) -> dict[str, Series]:
    """The series of FAMILIES up to FIRST_COUNT: what a health poll or a probe's last figures change."""
    out: dict[str, Series] = {}

    def put(name: str, value, *extra: str) -> None:
        if value is not None:
            out.setdefault(name, []).append((extra, value))

    if b.up is not None:
        put("llmtop_backend_up", 1.0 if b.up else 0.0)
    put("llmtop_backend_ready", 1.0 if readiness(b, ready_when).ready else 0.0)
    put("llmtop_backend_status", {s: b.status == s for s in STATUSES})
    put("llmtop_backend_circuit", {c: b.circuit == c for c in CIRCUITS})
    put("llmtop_backend_admin", {a: b.admin == a for a in ADMIN_STATES})
    put("llmtop_backend_health_latency_seconds", None if b.latency_ms is None else b.latency_ms / 1000.0)
    put("llmtop_backend_model_list_known", 0.0 if b.models is None else 1.0)
    if b.models is not None:
        put("llmtop_backend_models_served", float(b.models_total if b.models_total is not None else len(b.models)))
        for model in b.expected_models:
            put("llmtop_backend_model_missing", 1.0 if model in b.missing_models else 0.0, model)
    if b.metrics is not None:
        tripped = {a.split(" (now")[0] for a in b.alerts}
        exposed = alert_values(b.metrics)
        for rule, metric in b.alert_rules:
            if metric in exposed:  # a rule whose metric the server does not expose is unknown, not "not tripped"
                put("llmtop_backend_alert_tripped", 1.0 if rule in tripped else 0.0, rule)
        m = b.metrics
        put("llmtop_backend_requests_running", m.requests_running)
        put("llmtop_backend_requests_waiting", m.requests_waiting)
        put("llmtop_backend_kv_cache_usage_ratio", m.kv_cache_usage)
        put("llmtop_backend_server_ttft_seconds", None if m.server_ttft_ms is None else m.server_ttft_ms / 1000.0)
    if b.probe is not None and b.figures_current(now):
        put("llmtop_probe_last_ttft_seconds", None if b.probe.ttft_ms is None else b.probe.ttft_ms / 1000.0)
        put("llmtop_probe_last_decode_tokens_per_second", b.probe.tokens_per_s)
    return out


def probe_count_series(b: BackendSnapshot) -> dict[str, Series]:
    """The series of FAMILIES from FIRST_COUNT on: read off the backend's counters (a new object
    only when a probe, a skip or a breaker transition changed them), its probe interval and
    whether it has a price."""
    out: dict[str, Series] = {}

    def put(name: str, value) -> None:
        if value is not None:
            out[name] = [((), value)]

    c = b.counters
    put("llmtop_probe_ttft_seconds", (TTFT_BOUNDS, tuple(itertools.accumulate(c.ttft_buckets)), c.ttft_sum_s))
    put("llmtop_probe_decode_tokens_per_second", (TPS_BOUNDS, tuple(itertools.accumulate(c.tps_buckets)), c.tps_sum))
    put("llmtop_probes", float(c.probes))
    put("llmtop_probe_failures", float(c.probe_failures))
    put("llmtop_probe_output_tokens", float(c.probe_tokens))
    put("llmtop_probe_input_tokens", float(c.probe_input_tokens))
    put("llmtop_probe_cost", float(c.probe_cost) if b.probe_cost_per_hour is not None else None)
    put("llmtop_probes_skipped", float(c.probes_skipped))
    put("llmtop_probe_interval_seconds", b.probe_interval_s)
    put("llmtop_breaker_transitions", float(c.breaker_transitions))
    put("llmtop_probe_last_success_timestamp_seconds", c.last_success_at)
    return out


def gpu_series(fleet: FleetSnapshot) -> dict[str, list[tuple[tuple[str, str], float]]]:
    out: dict[str, list] = {}
    for g in fleet.gpu.gpus:
        labels = (str(g.index), g.name)
        for name, value, scale in (
            ("llmtop_gpu_utilization_ratio", g.utilization_pct, 0.01), ("llmtop_gpu_memory_used_bytes", g.memory_used_mib, MIB),
            ("llmtop_gpu_memory_total_bytes", g.memory_total_mib, MIB), ("llmtop_gpu_temperature_celsius", g.temperature_c, 1.0),
            ("llmtop_gpu_power_watts", g.power_w, 1.0), ("llmtop_gpu_power_limit_watts", g.power_limit_w, 1.0),
        ):
            if value is not None:
                out.setdefault(name, []).append((labels, value * scale))
    return out


def label_names(fleet: FleetSnapshot) -> tuple[str, ...]:
    """The backend labels: backend, provider, then every config label any backend has."""
    return ("backend", "provider", *sorted({k for b in fleet.backends for k, _ in b.labels}))


def backend_labels(b: BackendSnapshot, names: tuple[str, ...]) -> tuple[str, ...]:
    own = dict(b.labels)
    return (b.name, b.provider, *(own.get(n, "") for n in names[2:]))


# -- writing the formats -------------------------------------------------------------------------------


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names, values) -> str:
    return ",".join(f'{n}="{_escape(v)}"' for n, v in zip(names, values))


def _number(value: float) -> str:
    if value == float("inf"):
        return "+Inf"
    if value == float("-inf"):
        return "-Inf"
    return repr(float(value))


def _same_counts(old: BackendSnapshot, new: BackendSnapshot) -> bool:
    """Whether probe_count_series would say the same of both (the tracker keeps its counters'
    object until they change)."""
    return (
        old.counters is new.counters
        and old.probe_interval_s == new.probe_interval_s
        and (old.probe_cost_per_hour is None) == (new.probe_cost_per_hour is None)
    )


# What _backend_lines needs of each family, in FAMILIES' order: its name, kind, own label, and
# for a histogram the start of its bucket lines; the bounds' text, written once.
_WRITING = tuple((f.name, f.kind, f.extra, f"{f.name}_bucket{{") for f in FAMILIES)
_BOUND_TEXT = {bounds: tuple(map(_number, bounds)) for bounds in (TTFT_BOUNDS, TPS_BOUNDS)}


def _head(family: Family, openmetrics: bool) -> str:
    name, kind = family.name, family.kind
    if openmetrics:
        shown = name
    else:  # the text format knows no state sets or info, and names a counter by its samples
        kind = {"stateset": "gauge", "info": "gauge"}.get(kind, kind)
        shown = name + ("_total" if family.kind == "counter" else "_info" if family.kind == "info" else "")
    help_text = family.help.replace("\\", "\\\\").replace("\n", "\\n")
    return f"# HELP {shown} {help_text}\n# TYPE {shown} {kind}\n"


class Exposition:
    """/metrics: the text format or OpenMetrics from the latest snapshot.

    Each backend's lines are kept, family by family, with the snapshot they were written from,
    and written again only when the engine made that backend a new snapshot (a snapshot is
    immutable and the engine makes a new one only when something about the backend changed),
    when the labels or ready_when changed, or when time alone made its last probe's figures
    old. A scrape of 500 backends of which a few changed writes those few and joins the rest;
    of a backend whose counters did not change (no probe since), the counters' and histograms'
    lines are kept too."""

    def __init__(self, snapshot: Callable[[], FleetSnapshot], ready_when: Callable[[], tuple[str, ...]]):
        self._snapshot = snapshot
        self._ready_when = ready_when
        # per format: backend name -> (its snapshot, what else its lines depend on, its lines by family)
        self._cache: dict[bool, dict[str, tuple[BackendSnapshot, tuple, tuple[str, ...]]]] = {False: {}, True: {}}

    def render(self, openmetrics: bool) -> bytes:
        return self.render_fleet(self._snapshot(), self._ready_when(), openmetrics)

    def render_fleet(self, fleet: FleetSnapshot, ready_when: tuple[str, ...], openmetrics: bool) -> bytes:
        """The exposition of this snapshot. Not for two threads at once (the cache is shared)."""
        rows = self.refresh(fleet, ready_when, openmetrics)
        parts = [_head(BUILD, openmetrics), f'llmtop_build_info{{version="{_escape(__version__)}"}} 1.0\n']
        columns = zip(*rows) if rows else [()] * len(FAMILIES)
        for family, column in zip(FAMILIES, columns):
            parts.append(_head(family, openmetrics))
            parts.extend(column)
        gpus = gpu_series(fleet)
        for family in GPU_FAMILIES:
            parts.append(_head(family, openmetrics))
            for labels, value in gpus.get(family.name, ()):
                parts.append(f"{family.name}{{{_labels(('gpu', 'name'), labels)}}} {_number(value)}\n")
        if openmetrics:
            parts.append("# EOF\n")
        return "".join(parts).encode()

    def refresh(self, fleet: FleetSnapshot, ready_when: tuple[str, ...], openmetrics: bool) -> list[tuple[str, ...]]:
        """Bring the kept lines up to this snapshot, and return each backend's (serve calls this
        between scrapes, so that a scrape finds little left to write)."""
        names = label_names(fleet)
        cache = self._cache[openmetrics]
        kept = {}
        rows = []
        for b in fleet.backends:
            depends = (names, backend_labels(b, names), ready_when, b.figures_current(fleet.at))
            hit = cache.get(b.name)
            if hit is None or hit[0] is not b or hit[1] != depends:
                counted = None
                if hit is not None and hit[1] == depends and _same_counts(hit[0], b):
                    counted = hit[2][FIRST_COUNT:]
                hit = (b, depends, self._backend_lines(b, fleet.at, names, ready_when, counted))
            kept[b.name] = hit
            rows.append(hit[2])
        self._cache[openmetrics] = kept  # backends a reload removed are forgotten here
        return rows

    @staticmethod
    def _backend_lines(
        b: BackendSnapshot, now: float, names: tuple[str, ...], ready_when: tuple[str, ...], counted: tuple[str, ...] | None
    ) -> tuple[str, ...]:
        """One backend's lines of each family, in FAMILIES' order ("" where it has none); with
        `counted`, the lines of probe_count_series' families as they were written before.

        A scrape after a round of polls meets a new snapshot of every backend, with new health
        figures and, unless a probe went out meanwhile, the same counters: their histograms'
        and counters' lines, most of each backend's, are kept. Every family is written in one
        loop: a call, a list and a join per family were most of what a backend cost."""
        label_str = _labels(names, backend_labels(b, names))
        series = health_series(b, now, ready_when) if counted is not None else backend_series(b, now, ready_when)
        out = []
        for name, kind, extra, bucket_prefix in _WRITING if counted is None else _WRITING[:FIRST_COUNT]:
            values = series.get(name)
            if values is None:
                out.append("")
                continue
            text = ""
            for own, value in values:
                labels = label_str + (f',{extra}="{_escape(own[0])}"' if extra and own else "")
                if kind == "gauge":
                    text += f"{name}{{{labels}}} {_number(value)}\n"
                elif kind == "counter":
                    text += f"{name}_total{{{labels}}} {_number(value)}\n"
                elif kind == "stateset":
                    text += "".join([f'{name}{{{labels},{name}="{state}"}} {1.0 if on else 0.0}\n' for state, on in value.items()])
                else:  # histogram
                    bounds, counts, total = value
                    les = _BOUND_TEXT.get(bounds) or tuple(map(_number, bounds))
                    text += "".join([f'{bucket_prefix}{labels},le="{le}"}} {float(n)!r}\n' for le, n in zip(les, counts)])
                    text += f"{name}_count{{{labels}}} {float(counts[-1])!r}\n{name}_sum{{{labels}}} {_number(total)}\n"
            out.append(text)
        return tuple(out) if counted is None else (*out, *counted)

    def answer(self, accept: str) -> tuple[bytes, str]:
        """The body and its content type for a request's Accept header (OpenMetrics when asked for)."""
        openmetrics = wants_openmetrics(accept)
        return self.render(openmetrics), content_type(openmetrics)


def wants_openmetrics(accept: str | None) -> bool:
    return "application/openmetrics-text" in (accept or "")


def content_type(openmetrics: bool) -> str:
    return OPENMETRICS_TYPE if openmetrics else TEXT_TYPE


# -- the same series as a prometheus_client collector ----------------------------------------------------


class FleetCollector:
    """A prometheus_client collector over backend_series, for a registry of one's own (and the
    oracle the tests hold Exposition to)."""

    def __init__(self, snapshot: Callable[[], FleetSnapshot], ready_when: Callable[[], tuple[str, ...]]):
        self._snapshot = snapshot
        self._ready_when = ready_when

    def describe(self):
        return []  # made at scrape time; nothing to check at registration

    def collect(self) -> Iterator:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
            InfoMetricFamily,
            StateSetMetricFamily,
        )

        kinds = {"gauge": GaugeMetricFamily, "counter": CounterMetricFamily, "stateset": StateSetMetricFamily, "histogram": HistogramMetricFamily}
        fleet = self._snapshot()
        ready_when = self._ready_when()
        names = label_names(fleet)
        yield InfoMetricFamily(BUILD.name, BUILD.help, value={"version": __version__})
        series = [(backend_labels(b, names), backend_series(b, fleet.at, ready_when)) for b in fleet.backends]
        for family in FAMILIES:
            metric = kinds[family.kind](family.name, family.help, labels=[*names, *((family.extra,) if family.extra else ())])
            for labels, by_family in series:
                for own, value in by_family.get(family.name, ()):
                    if family.kind == "histogram":
                        bounds, counts, total = value
                        metric.add_metric([*labels, *own], [(_number(b), n) for b, n in zip(bounds, counts)], sum_value=total)
                    else:
                        metric.add_metric([*labels, *own], value)
            yield metric
        gpus = gpu_series(fleet)
        for family in GPU_FAMILIES:
            metric = GaugeMetricFamily(family.name, family.help, labels=["gpu", "name"])
            for labels, value in gpus.get(family.name, ()):
                metric.add_metric(list(labels), value)
            yield metric
