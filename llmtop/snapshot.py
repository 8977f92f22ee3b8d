"""Immutable, plain-data views of the fleet that every face (TUI, check, JSON) reads."""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from llmtop.sanitize import for_terminal

STATUSES = ("unknown", "loading", "healthy", "degraded", "down")
CIRCUITS = ("closed", "open", "half_open")
ADMIN_STATES = ("active", "draining", "disabled")
PROBE_MODES = ("completion", "health", "off")  # as config.PROBE_MODES


RECENT_ERRORS_SENT = 5  # of a backend's recent errors, in its JSON

# Bucket bounds of the probe histograms (blackbox_exporter-like spreads, in base units).
TTFT_BUCKETS_S = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TPS_BUCKETS = (5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)


@dataclass(frozen=True)
class Counters:
    """What a backend's probes have cost and measured since llmtop started, cumulative, for
    exporters (Prometheus counters and histograms) read straight off the snapshot."""

    probes: int = 0  # completion probes sent (and answered, failed or refused)
    probe_failures: int = 0
    probe_tokens: int = 0  # output tokens the probes were given (usage, or counted chunks)
    probe_input_tokens: int = 0  # prompt tokens the probes were charged (from usage; 0 where none is reported)
    probe_cost: float = 0.0  # what those tokens cost at the configured prices (0 without prices)
    probes_skipped: int = 0  # due probes not sent because skip_probe_when said the backend was saturated
    breaker_transitions: int = 0
    ttft_buckets: tuple[int, ...] = (0,) * (len(TTFT_BUCKETS_S) + 1)  # per bound, not cumulative; last: +Inf
    ttft_sum_s: float = 0.0
    tps_buckets: tuple[int, ...] = (0,) * (len(TPS_BUCKETS) + 1)
    tps_sum: float = 0.0
    last_success_at: float | None = None  # wall time of the last probe that measured a TTFT


@dataclass(frozen=True)
class ProbeSummary:
    model: str | None
    ttft_ms: float | None
    tokens_per_s: float | None
    output_tokens: int | None
    tokens_estimated: bool
    error: str | None
    at: float  # wall-clock time (time.time()) the probe finished
    server_ttft_ms: float | None = None  # the server's own figures, where it reports them
    server_tokens_per_s: float | None = None
    load_ms: float | None = None
    connect_ms: float | None = None  # the request's phases (probe.Phases); None where there was none
    tls_ms: float | None = None
    ttfb_ms: float | None = None
    untimed: str | None = None  # why a probe that generated text carries no TTFT or rate
    rate_limited: bool = False  # refused with a 429
    input_tokens: int | None = None  # prompt tokens, from the server's usage
    reasoning_only: bool = False  # all its text was reasoning: TTFT is the first reasoning token
    note: str | None = None  # about a probe that did not fail (hidden reasoning used up max_tokens)

    def to_json(self, now: float) -> dict[str, Any]:
        out = {
            "model": self.model,
            "at": round(self.at, 3),
            "age_s": _round(max(0.0, now - self.at)),
            "ttft_ms": _round(_round(self.ttft_ms, 2)),  # from the phases' figure: one document, one rounding path
            "tokens_per_s": _round(self.tokens_per_s),
            "output_tokens": self.output_tokens,
            "tokens_estimated": self.tokens_estimated,
            "phases": {
                "connect_ms": _round(self.connect_ms, 2),
                "tls_ms": _round(self.tls_ms, 2),
                "ttfb_ms": _round(self.ttfb_ms, 2),
                "ttft_ms": _round(self.ttft_ms, 2),
            },
            "untimed": self.untimed,
            "error": self.error,
            "input_tokens": self.input_tokens,
            "reasoning_only": self.reasoning_only,
            "note": self.note,
        }
        for key in ("server_ttft_ms", "server_tokens_per_s", "load_ms"):
            value = getattr(self, key)
            if value is not None:
                out[key] = _round(value)
        return out


@dataclass(frozen=True)
class Metrics:
    """Common fields mapped from each engine's Prometheus names; None where not exposed."""

    requests_running: float | None = None
    requests_waiting: float | None = None
    kv_cache_usage: float | None = None  # fraction 0..1
    server_ttft_ms: float | None = None  # mean over the last scrape interval (else since start)
    server_tokens_per_s: float | None = None  # the server's own decode rate, same window
    raw: dict[str, float] = field(default_factory=dict, compare=False)  # every unlabelled-sum series, for alert rules
    ignored: tuple[str, ...] = field(default=(), compare=False)  # why a series is absent (NaN, Inf)

    def common(self) -> dict[str, float]:
        out = {
            "requests_running": self.requests_running,
            "requests_waiting": self.requests_waiting,
            "kv_cache_usage": self.kv_cache_usage,
            "server_ttft_ms": self.server_ttft_ms,
            "server_tokens_per_s": self.server_tokens_per_s,
        }
        return {k: v for k, v in out.items() if v is not None}


@dataclass(frozen=True)
class Event:
    at: float  # wall-clock time
    backend: str | None
    kind: str  # breaker | alert | model | config | admin | probe | error
    message: str
    level: str = "info"  # info | warning | error


@dataclass(frozen=True)
class BackendSnapshot:
    name: str
    provider: str
    url: str
    status: str
    status_reason: str | None
    circuit: str
    admin: str
    enabled: bool
    latency_ms: float | None
    models: tuple[str, ...] | None  # served (the first MODELS_KEPT); None: the list could not be read
    expected_models: tuple[str, ...]
    missing_models: tuple[str, ...]  # () while the model list is unknown: see models
    alerts: tuple[str, ...]
    metrics: Metrics | None
    probe: ProbeSummary | None  # the last attempt, failed or not
    error: str | None
    error_rate: float | None
    last_health_at: float | None
    retry_after_at: float | None
    probe_tokens_per_hour: float
    models_total: int | None = None  # how many the server lists, of which `models` keeps the first
    models_error: str | None = None  # why the model list is unknown
    alerts_unknown: str | None = None  # alert rules that could not be judged, and why
    last_ok_probe: ProbeSummary | None = None  # the last probe that measured a TTFT
    probe_note: str | None = None  # why no completion probe is sent ("not probed: ...")
    stale_after_s: float = float("inf")  # probe figures older than this are shown as old
    counters: Counters = field(default_factory=Counters, compare=False)
    labels: tuple[tuple[str, str], ...] = ()  # the config's extra labels for exporters (team, region)
    alert_rules: tuple[tuple[str, str], ...] = ()  # the configured metric rules: (as `alerts` names them when tripped, their metric)
    up: bool | None = None  # the last poll got an answer (ready, loading or 429); None: not polled (or not now)
    trouble_at: float | None = None  # wall time a poll or probe last failed: figures from before it are old
    version: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    # Ring-buffer copies (tuples) of recent points: (wall time, value)
    ttft_history: tuple[tuple[float, float], ...] = ()
    tps_history: tuple[tuple[float, float], ...] = ()
    latency_history: tuple[tuple[float, float], ...] = ()
    queue_history: tuple[tuple[float, float], ...] = ()
    breaker_history: tuple[tuple[float, str, str], ...] = ()  # (wall time, from, to)
    recent_errors: tuple[tuple[float, str], ...] = ()
    in_flight: bool = False  # a poll or probe of this backend is running now
    seq: int = 0  # bumps whenever anything about this backend changes
    agent: str | None = None  # the remote llmtop agent that watches it; None: this process does
    stale_since: float | None = None  # wall time the agent was lost: every figure is as it was then
    probe_mode: str = "completion"  # the config's probe = completion | health | off
    probe_interval_s: float | None = None  # between completion probes now (a budget may stretch it); None: none sent
    probe_input_tokens_per_hour: float = 0.0  # what the probes' prompts cost per hour at that interval
    probe_cost_per_hour: float | None = None  # at the configured prices; None: no price set

    def models_summary(self) -> str:
        """served/expected for the expected models, else how many are served; `?` for a count
        that could not be read, never a good figure made of no data."""
        if self.expected_models:
            served = "?" if self.models is None else str(len(self.expected_models) - len(self.missing_models))
            return f"{served}/{len(self.expected_models)}"
        if self.models is None:
            return "?"
        return str(self.models_total if self.models_total is not None else len(self.models))

    def figures_current(self, now: float) -> bool:
        """Whether the last probe's figures describe the backend now: it measured, the backend is
        not down, and it is not older than `stale_after_s`. Otherwise faces show them as old."""
        p = self.probe
        return (
            p is not None
            and p is self.last_ok_probe
            and self.status not in ("down", "unknown", "loading")
            and (self.trouble_at is None or p.at > self.trouble_at)  # taken after the last failure, not before it
            and now - p.at <= self.stale_after_s
            and self.stale_since is None  # its agent is lost: what it said then is not now
        )

    def to_json(self, now: float) -> dict[str, Any]:
        known = self.models is not None
        last_ok = self.last_ok_probe
        return {
            "name": self.name,
            "provider": self.provider,
            "url": self.url,
            "status": self.status,
            "status_reason": self.status_reason,
            "circuit": self.circuit,
            "admin": self.admin,
            "latency_ms": _round(self.latency_ms),
            "expected_models": list(self.expected_models),
            "models": list(self.models) if known else None,  # null: the list could not be read
            "models_total": self.models_total,
            "models_error": self.models_error,
            "missing_models": list(self.missing_models) if known else None,
            "alerts": list(self.alerts),
            "alerts_unknown": self.alerts_unknown,
            "metrics": {k: _round(v, 4) for k, v in self.metrics.common().items()} if self.metrics else {},
            "probe": self.probe.to_json(now) if self.probe else None,
            "probe_current": self.figures_current(now),
            "last_ok_probe": last_ok.to_json(now) if last_ok is not None and last_ok is not self.probe else None,
            "probe_note": self.probe_note,
            "rate_limited_until": None if self.retry_after_at is None else round(self.retry_after_at, 3),
            "error": self.error,
            # What a remote face needs to show this backend as this process does (wire.py reads it back).
            "agent": self.agent,
            "stale_since": None if self.stale_since is None else round(self.stale_since, 3),
            "enabled": self.enabled,
            "up": self.up,
            "error_rate": _round(self.error_rate, 4),
            "last_health_at": None if self.last_health_at is None else round(self.last_health_at, 3),
            "trouble_at": None if self.trouble_at is None else round(self.trouble_at, 3),
            "stale_after_s": _round(self.stale_after_s, 3),  # null: never
            "probe_tokens_per_hour": _round(self.probe_tokens_per_hour),
            "probe_mode": self.probe_mode,
            "probe_interval_s": _round(self.probe_interval_s),
            "probe_input_tokens_per_hour": _round(self.probe_input_tokens_per_hour),
            "probe_cost_per_hour": _round(self.probe_cost_per_hour, 6),
            "spent": {
                "probes": self.counters.probes,
                "probes_skipped": self.counters.probes_skipped,
                "output_tokens": self.counters.probe_tokens,
                "input_tokens": self.counters.probe_input_tokens,
                "cost": _round(self.counters.probe_cost, 6),
            },
            "version": self.version,
            "labels": dict(self.labels),
            "recent_errors": [[round(at, 3), message] for at, message in self.recent_errors[-RECENT_ERRORS_SENT:]],
        }

    def for_terminal(self) -> "BackendSnapshot":
        """This snapshot with every text from outside made safe to print (sanitize.py); itself when
        every text already is (the common case: a copy of 40 fields for each change of 3,000
        remote rows was most of a screen's tick)."""
        probe = _safe_probe(self.probe)
        last_ok = probe if self.last_ok_probe is self.probe else _safe_probe(self.last_ok_probe)
        safe = {
            "name": for_terminal(self.name, 64),
            "url": for_terminal(self.url, 200),
            "status_reason": _safe(self.status_reason, 300),
            "models": None if self.models is None else tuple(for_terminal(m, 120) for m in self.models),
            "models_error": _safe(self.models_error, 300),
            "expected_models": tuple(for_terminal(m, 120) for m in self.expected_models),
            "missing_models": tuple(for_terminal(m, 120) for m in self.missing_models),
            "alerts": tuple(for_terminal(a, 200) for a in self.alerts),
            "alerts_unknown": _safe(self.alerts_unknown, 300),
            "probe": probe,
            "last_ok_probe": last_ok,
            "probe_note": _safe(self.probe_note, 200),
            "error": _safe(self.error, 300),
            "version": _safe(self.version, 40),
            "extra": {
                k: (tuple(for_terminal(m, 120) for m in v) if isinstance(v, tuple) else _safe(v, 300) if isinstance(v, str) else v)
                for k, v in self.extra.items()
            },
            "recent_errors": tuple((at, for_terminal(m, 300)) for at, m in self.recent_errors),
            # A remote row's agent is named by the agent itself, or by a Prometheus label its exporter chose.
            "agent": _safe(self.agent, 64),
            "labels": tuple((for_terminal(k, 64), for_terminal(v, 120)) for k, v in self.labels),
        }
        changed = {k: v for k, v in safe.items() if v is not getattr(self, k) and v != getattr(self, k)}
        return dataclasses.replace(self, **changed) if changed else self


def _safe(text: str | None, limit: int) -> str | None:
    return None if text is None else for_terminal(text, limit)


def _safe_probe(p: ProbeSummary | None) -> ProbeSummary | None:
    if p is None:
        return None
    safe = {"model": _safe(p.model, 120), "error": _safe(p.error, 300), "untimed": _safe(p.untimed, 120), "note": _safe(p.note, 160)}
    changed = {k: v for k, v in safe.items() if v != getattr(p, k)}
    return dataclasses.replace(p, **changed) if changed else p


@dataclass(frozen=True)
class GpuProcess:
    pid: int  # as NVML reports it: a host PID, even inside a container
    name: str  # its command line; "?" when unknown
    used_memory_mib: float | None
    name_note: str | None = None  # why the name is unknown or came from NVML rather than this machine's /proc
    backend: str | None = None  # the configured backend it serves (owners.py), when this machine's /proc says


@dataclass(frozen=True)
class MigInstance:
    """One MIG device (a GPU instance's compute instance) of a MIG-enabled GPU."""

    gpu_instance_id: int | None
    compute_instance_id: int | None
    name: str
    memory_used_mib: float | None
    memory_total_mib: float | None
    processes: tuple[GpuProcess, ...] = ()


@dataclass(frozen=True)
class GpuSnapshot:
    index: int
    name: str
    utilization_pct: float | None
    memory_used_mib: float | None
    memory_total_mib: float | None
    temperature_c: float | None
    power_w: float | None
    power_limit_w: float | None
    processes: tuple[GpuProcess, ...] = ()
    agent: str | None = None  # the remote agent whose machine it is in; None: this one
    problem: str | None = None  # the whole GPU unreadable: "lost", "no permission", ...
    unavailable: dict[str, str] = field(default_factory=dict)  # field name -> why it is None ("not supported", ...)
    mig: tuple[MigInstance, ...] = ()  # its MIG devices, when MIG is enabled

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GpuStatus:
    gpus: tuple[GpuSnapshot, ...] = ()
    message: str | None = None  # "no NVIDIA GPU" and why, when there are none


@dataclass(frozen=True)
class FleetSnapshot:
    at: float
    backends: tuple[BackendSnapshot, ...]
    gpu: GpuStatus
    events: tuple[Event, ...]
    config_path: str | None = None
    config_error: str | None = None
    budget_tokens_per_hour: float | None = None  # the fleet's [budget] tokens_per_hour; None: no cap

    def spend(self) -> dict[str, Any]:
        """What the fleet's probes cost: planned per hour (tokens are input + output) and spent since start."""
        planned = sum(b.probe_tokens_per_hour + b.probe_input_tokens_per_hour for b in self.backends)
        costs = [b.probe_cost_per_hour for b in self.backends if b.probe_cost_per_hour is not None]
        return {
            "tokens_per_hour": planned,
            "cost_per_hour": sum(costs) if costs else None,
            "budget_tokens_per_hour": self.budget_tokens_per_hour,
            "spent_output_tokens": sum(b.counters.probe_tokens for b in self.backends),
            "spent_input_tokens": sum(b.counters.probe_input_tokens for b in self.backends),
            "spent_cost": sum(b.counters.probe_cost for b in self.backends) if costs else None,
        }

    def counts(self) -> dict[str, int]:
        counts = {s: 0 for s in STATUSES}
        counts["draining"] = 0
        counts["disabled"] = 0
        counts["stale"] = 0
        for b in self.backends:
            if b.stale_since is not None:
                counts["stale"] += 1  # its agent is lost: neither up nor down, unseen
            elif b.admin != "active":
                counts[b.admin] += 1
            else:
                counts[b.status] += 1
        return counts

    def backend(self, name: str) -> BackendSnapshot | None:
        return self._by_name.get(name)

    @functools.cached_property
    def _by_name(self) -> dict[str, BackendSnapshot]:
        """Built on the first look-up (a screen looks up the selected row every tick and every key;
        a scan of 3,000 rows each time was not free). The first of a name wins, as the scan's did."""
        index: dict[str, BackendSnapshot] = {}
        for b in self.backends:
            index.setdefault(b.name, b)
        return index

    def to_json(self) -> dict[str, Any]:
        """The exact data (no text is altered; JSON escapes what it must) for scripts."""
        return {
            "at": round(self.at, 3),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.at)),
            "backends": [b.to_json(self.at) for b in self.backends],
            "gpus": [g.to_json() for g in self.gpu.gpus],
            "gpu_message": self.gpu.message,
            "probe_spend": {k: _round(v, 6) if isinstance(v, float) else v for k, v in self.spend().items()},
        }


class TerminalView:
    """Turns FleetSnapshots into their terminal-safe copies (for_terminal), each backend's copy
    made once per change of its `seq`, so a screen of 300 backends costs nothing per tick."""

    def __init__(self) -> None:
        self._backends: dict[str, tuple[int, BackendSnapshot, BackendSnapshot]] = {}
        self._events: dict[int, Event] = {}
        self._gpu: tuple[GpuStatus, GpuStatus] | None = None
        self._rows: tuple[tuple[BackendSnapshot, ...], tuple[BackendSnapshot, ...]] | None = None  # (rows in, their copies)

    def __call__(self, fleet: FleetSnapshot) -> FleetSnapshot:
        if self._rows is None or fleet.backends is not self._rows[0]:  # else: the same rows, the same copies
            backends = []
            seen = {}
            for b in fleet.backends:
                cached = self._backends.get(b.name)
                if cached is None or cached[0] != b.seq or cached[1] is not b:
                    cached = (b.seq, b, b.for_terminal())
                seen[b.name] = cached
                backends.append(cached[2])
            self._backends = seen
            self._rows = (fleet.backends, tuple(backends))
        events = {}
        for e in fleet.events:
            safe = self._events.get(id(e))
            if safe is None or safe[0] is not e:
                safe = (e, dataclasses.replace(e, backend=_safe(e.backend, 64), message=for_terminal(e.message, 300)))
            events[id(e)] = safe
        self._events = events
        if self._gpu is None or self._gpu[0] is not fleet.gpu:
            self._gpu = (fleet.gpu, _safe_gpu(fleet.gpu))
        return dataclasses.replace(
            fleet,
            backends=self._rows[1],
            events=tuple(safe for _, safe in events.values()),
            gpu=self._gpu[1],
            config_path=_safe(fleet.config_path, 200),
            config_error=_safe(fleet.config_error, 400),
        )


def _safe_processes(processes: tuple[GpuProcess, ...]) -> tuple[GpuProcess, ...]:
    return tuple(
        dataclasses.replace(p, name=for_terminal(p.name, 40), name_note=_safe(p.name_note, 120), backend=_safe(p.backend, 64)) for p in processes
    )


def _safe_gpu(status: GpuStatus) -> GpuStatus:
    gpus = tuple(
        dataclasses.replace(
            g,
            name=for_terminal(g.name, 40),
            agent=_safe(g.agent, 64),
            processes=_safe_processes(g.processes),
            problem=_safe(g.problem, 80),
            unavailable={for_terminal(k, 40): for_terminal(v, 80) for k, v in g.unavailable.items()},
            mig=tuple(dataclasses.replace(m, name=for_terminal(m.name, 40), processes=_safe_processes(m.processes)) for m in g.mig),
        )
        for g in status.gpus
    )
    return GpuStatus(gpus=gpus, message=_safe(status.message, 200))


def _round(value: float | None, digits: int = 1) -> float | None:
    """A figure for JSON; a non-finite one (which strict JSON cannot carry) is no figure. Every
    number from outside is checked where it enters (inbound.py); this is the backstop, so one
    backend's bad figure can never break the document for the whole fleet."""
    if value is None or not math.isfinite(value):
        return None
    return round(value, digits)
