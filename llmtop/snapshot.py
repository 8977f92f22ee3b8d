"""Immutable, plain-data views of the fleet that every face (TUI, check, JSON) reads."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

STATUSES = ("unknown", "loading", "healthy", "degraded", "down")
CIRCUITS = ("closed", "open", "half_open")
ADMIN_STATES = ("active", "draining", "disabled")


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


@dataclass(frozen=True)
class Metrics:
    """Common fields mapped from each engine's Prometheus names; None where not exposed."""

    requests_running: float | None = None
    requests_waiting: float | None = None
    kv_cache_usage: float | None = None  # fraction 0..1
    server_ttft_ms: float | None = None  # mean over the last scrape interval (else since start)
    server_tokens_per_s: float | None = None  # the server's own decode rate, same window
    raw: dict[str, float] = field(default_factory=dict, compare=False)  # every unlabelled-sum series, for alert rules

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
    models: tuple[str, ...]
    expected_models: tuple[str, ...]
    missing_models: tuple[str, ...]
    alerts: tuple[str, ...]
    metrics: Metrics | None
    probe: ProbeSummary | None
    error: str | None
    error_rate: float | None
    last_health_at: float | None
    retry_after_at: float | None
    probe_tokens_per_hour: float
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

    def to_json(self) -> dict[str, Any]:
        probe = None
        if self.probe is not None:
            probe = {
                "model": self.probe.model,
                "ttft_ms": _round(self.probe.ttft_ms),
                "tokens_per_s": _round(self.probe.tokens_per_s),
                "output_tokens": self.probe.output_tokens,
                "tokens_estimated": self.probe.tokens_estimated,
                "error": self.probe.error,
            }
            for key in ("server_ttft_ms", "server_tokens_per_s", "load_ms"):
                value = getattr(self.probe, key)
                if value is not None:
                    probe[key] = _round(value)
        return {
            "name": self.name,
            "provider": self.provider,
            "url": self.url,
            "status": self.status,
            "status_reason": self.status_reason,
            "circuit": self.circuit,
            "admin": self.admin,
            "latency_ms": _round(self.latency_ms),
            "models": list(self.models),
            "missing_models": list(self.missing_models),
            "alerts": list(self.alerts),
            "metrics": {k: _round(v, 4) for k, v in self.metrics.common().items()} if self.metrics else {},
            "probe": probe,
            "error": self.error,
        }


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    name: str
    used_memory_mib: float | None


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

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["processes"] = [asdict(p) for p in self.processes]
        return data


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

    def counts(self) -> dict[str, int]:
        counts = {s: 0 for s in STATUSES}
        counts["draining"] = 0
        counts["disabled"] = 0
        for b in self.backends:
            if b.admin != "active":
                counts[b.admin] += 1
            else:
                counts[b.status] += 1
        return counts

    def backend(self, name: str) -> BackendSnapshot | None:
        return next((b for b in self.backends if b.name == name), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "backends": [b.to_json() for b in self.backends],
            "gpus": [g.to_json() for g in self.gpu.gpus],
        }


def _round(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)
