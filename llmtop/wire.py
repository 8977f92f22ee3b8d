"""The fleet document read back: another llmtop's JSON (/api/v1/fleet, its event stream) turned into snapshots, every field checked.

An agent is another machine: its answers are data from outside like a backend's. Every field is
checked for its type and range here (a string where a number belongs, a NaN, a list of a million
models, a timestamp past the year 9999 all read as absent or bounded), so what the faces get from
a remote agent is exactly as safe as what they get from this process's own engine. Texts stay
exact here; faces make them safe to print (sanitize.py) as they do for local backends.
"""

from __future__ import annotations

from typing import Any

from llmtop.inbound import count, finite
from llmtop.snapshot import (
    ADMIN_STATES,
    CIRCUITS,
    STATUSES,
    PROBE_MODES,
    BackendSnapshot,
    Counters,
    Event,
    GpuProcess,
    GpuSnapshot,
    GpuStatus,
    Metrics,
    MigInstance,
    ProbeSummary,
)

SCHEMA = 1  # the version of the document this reads (serve/http.py SCHEMA)
TEXT_MAX = 4000  # longer texts are cut: nothing llmtop writes is longer
NAME_MAX = 256
MODELS_MAX = 500  # as tracker.MODELS_KEPT: an agent keeps no more, and a hostile one is not believed
LIST_MAX = 64  # alerts, labels, errors, GPUs, processes
LATEST = 253402300799.0  # 9999-12-31T23:59:59Z: a later time is not a time


class WireError(ValueError):
    """The document is not a fleet document this version of llmtop can read."""


def _text(value: Any, limit: int = TEXT_MAX) -> str | None:
    return value[:limit] if isinstance(value, str) else None


def _when(value: Any) -> float | None:
    number = finite(value)
    return number if number is not None and 0.0 <= number <= LATEST else None


def _nonneg(value: Any) -> float | None:
    number = finite(value)
    return number if number is not None and number >= 0.0 else None


def _texts(value: Any, limit: int = LIST_MAX, size: int = NAME_MAX) -> tuple[str, ...]:
    if not isinstance(value, list):
        return ()
    return tuple(v[:size] for v in value[:limit] if isinstance(v, str))


def _choice(value: Any, allowed: tuple[str, ...], default: str) -> str:
    return value if isinstance(value, str) and value in allowed else default


def _ttft(shown: Any, precise: Any) -> float | None:
    """The phases keep one more digit than the top-level figure (which is rounded from it)."""
    precise = _nonneg(precise)
    return precise if precise is not None else _nonneg(shown)


def _probe(data: Any) -> ProbeSummary | None:
    if not isinstance(data, dict):
        return None
    at = _when(data.get("at"))
    if at is None:
        return None
    phases = data.get("phases") if isinstance(data.get("phases"), dict) else {}
    return ProbeSummary(
        model=_text(data.get("model"), NAME_MAX),
        ttft_ms=_ttft(data.get("ttft_ms"), phases.get("ttft_ms")),
        tokens_per_s=_nonneg(data.get("tokens_per_s")),
        output_tokens=count(data.get("output_tokens")),
        tokens_estimated=data.get("tokens_estimated") is True,
        error=_text(data.get("error")),
        at=at,
        server_ttft_ms=_nonneg(data.get("server_ttft_ms")),
        server_tokens_per_s=_nonneg(data.get("server_tokens_per_s")),
        load_ms=_nonneg(data.get("load_ms")),
        connect_ms=_nonneg(phases.get("connect_ms")),
        tls_ms=_nonneg(phases.get("tls_ms")),
        ttfb_ms=_nonneg(phases.get("ttfb_ms")),
        untimed=_text(data.get("untimed"), 200),
        input_tokens=count(data.get("input_tokens")),
        reasoning_only=data.get("reasoning_only") is True,
        note=_text(data.get("note"), 400),
    )


def _metrics(data: Any) -> Metrics | None:
    if not isinstance(data, dict) or not data:
        return None
    fields = ("requests_running", "requests_waiting", "kv_cache_usage", "server_ttft_ms", "server_tokens_per_s")
    return Metrics(**{k: _nonneg(data.get(k)) for k in fields})


def backend(data: Any, agent: str | None, history: dict[str, tuple] | None = None) -> BackendSnapshot:
    """One backend of an agent's document. WireError when it has no usable name."""
    if not isinstance(data, dict):
        raise WireError("a backend is not a JSON object")
    name = _text(data.get("name"), NAME_MAX)
    if not name:
        raise WireError("a backend has no name")
    probe = _probe(data.get("probe"))
    last_ok = _probe(data.get("last_ok_probe"))
    if last_ok is None and probe is not None and probe.ttft_ms is not None:
        last_ok = probe  # the document leaves it out when it is the last probe itself
    models = None if data.get("models") is None else _texts(data.get("models"), MODELS_MAX)
    missing = () if models is None else _texts(data.get("missing_models"))
    labels = data.get("labels") if isinstance(data.get("labels"), dict) else {}
    errors = data.get("recent_errors") if isinstance(data.get("recent_errors"), list) else []
    stale_after = _nonneg(data.get("stale_after_s"))
    spent = data.get("spent") if isinstance(data.get("spent"), dict) else {}
    history = history or {}
    return BackendSnapshot(
        name=name,
        provider=_text(data.get("provider"), 64) or "?",
        url=_text(data.get("url"), 2000) or "",
        status=_choice(data.get("status"), STATUSES, "unknown"),
        status_reason=_text(data.get("status_reason")),
        circuit=_choice(data.get("circuit"), CIRCUITS, "closed"),
        admin=_choice(data.get("admin"), ADMIN_STATES, "active"),
        enabled=data.get("enabled") is not False,
        latency_ms=_nonneg(data.get("latency_ms")),
        models=models,
        expected_models=_texts(data.get("expected_models")),
        missing_models=missing,
        alerts=_texts(data.get("alerts"), size=TEXT_MAX),
        metrics=_metrics(data.get("metrics")),
        probe=last_ok if last_ok is not None and probe is not None and probe == last_ok else probe,
        error=_text(data.get("error")),
        error_rate=_nonneg(data.get("error_rate")),
        last_health_at=_when(data.get("last_health_at")),
        retry_after_at=_when(data.get("rate_limited_until")),
        probe_tokens_per_hour=_nonneg(data.get("probe_tokens_per_hour")) or 0.0,
        models_total=count(data.get("models_total")),
        models_error=_text(data.get("models_error")),
        alerts_unknown=_text(data.get("alerts_unknown")),
        last_ok_probe=last_ok,
        probe_note=_text(data.get("probe_note")),
        stale_after_s=float("inf") if stale_after is None else stale_after,
        labels=tuple((k[:NAME_MAX], v[:NAME_MAX]) for k, v in list(labels.items())[:LIST_MAX] if isinstance(v, str)),
        up=data.get("up") if isinstance(data.get("up"), bool) else None,
        trouble_at=_when(data.get("trouble_at")),
        version=_text(data.get("version"), 200),
        recent_errors=tuple(
            (at, e[1][:TEXT_MAX])
            for e in errors[:LIST_MAX]
            if isinstance(e, list) and len(e) == 2 and isinstance(e[1], str) and (at := _when(e[0])) is not None
        ),
        # An agent that itself reads other agents passes on whose rows they are; else the agent's own name.
        agent=agent if agent is not None else _text(data.get("agent"), NAME_MAX),
        stale_since=_when(data.get("stale_since")),
        probe_mode=_choice(data.get("probe_mode"), PROBE_MODES, "completion"),
        probe_interval_s=_nonneg(data.get("probe_interval_s")),
        probe_input_tokens_per_hour=_nonneg(data.get("probe_input_tokens_per_hour")) or 0.0,
        probe_cost_per_hour=_nonneg(data.get("probe_cost_per_hour")),
        counters=Counters(
            probes=count(spent.get("probes")) or 0,
            probes_skipped=count(spent.get("probes_skipped")) or 0,
            probe_tokens=count(spent.get("output_tokens")) or 0,
            probe_input_tokens=count(spent.get("input_tokens")) or 0,
            probe_cost=_nonneg(spent.get("cost")) or 0.0,
        ),
        ttft_history=history.get("ttft", ()),
        tps_history=history.get("tps", ()),
        latency_history=history.get("latency", ()),
        queue_history=history.get("queue", ()),
    )


def _gpu_processes(data: Any) -> tuple[GpuProcess, ...]:
    procs = data.get("processes") if isinstance(data.get("processes"), list) else []
    return tuple(
        GpuProcess(
            pid=count(p.get("pid")) or 0,
            name=_text(p.get("name"), 200) or "?",
            used_memory_mib=_nonneg(p.get("used_memory_mib")),
            name_note=_text(p.get("name_note"), 200),
            backend=_text(p.get("backend"), 200),
        )
        for p in procs[:LIST_MAX]
        if isinstance(p, dict)
    )


def _mig(data: Any) -> MigInstance | None:
    if not isinstance(data, dict):
        return None
    return MigInstance(
        gpu_instance_id=count(data.get("gpu_instance_id")),
        compute_instance_id=count(data.get("compute_instance_id")),
        name=_text(data.get("name"), 200) or "?",
        memory_used_mib=_nonneg(data.get("memory_used_mib")),
        memory_total_mib=_nonneg(data.get("memory_total_mib")),
        processes=_gpu_processes(data),
    )


def _gpu(data: Any) -> GpuSnapshot | None:
    if not isinstance(data, dict) or count(data.get("index")) is None:
        return None
    unavailable = data.get("unavailable") if isinstance(data.get("unavailable"), dict) else {}
    mig = data.get("mig") if isinstance(data.get("mig"), list) else []
    return GpuSnapshot(
        index=count(data.get("index")),
        name=_text(data.get("name"), 200) or "?",
        utilization_pct=_nonneg(data.get("utilization_pct")),
        memory_used_mib=_nonneg(data.get("memory_used_mib")),
        memory_total_mib=_nonneg(data.get("memory_total_mib")),
        temperature_c=finite(data.get("temperature_c")),
        power_w=_nonneg(data.get("power_w")),
        power_limit_w=_nonneg(data.get("power_limit_w")),
        processes=_gpu_processes(data),
        problem=_text(data.get("problem"), 200),
        unavailable={
            _text(k, 40): _text(v, 200) for k, v in list(unavailable.items())[:LIST_MAX] if isinstance(k, str) and isinstance(v, str)
        },
        mig=tuple(m for m in (_mig(d) for d in mig[:LIST_MAX]) if m is not None),
    )


def gpus(data: Any) -> GpuStatus:
    """The `gpus` list and `gpu_message` of a document (or of a `gpus` event)."""
    if not isinstance(data, dict):
        return GpuStatus(message="the agent sent no GPU list")
    raw = data.get("gpus") if isinstance(data.get("gpus"), list) else []
    found = tuple(g for g in (_gpu(d) for d in raw[:LIST_MAX]) if g is not None)
    return GpuStatus(gpus=found, message=_text(data.get("gpu_message"), 400))


def event(data: Any, agent: str) -> Event | None:
    if not isinstance(data, dict):
        return None
    at, message = _when(data.get("at")), _text(data.get("message"))
    if at is None or message is None:
        return None
    level = _choice(data.get("level"), ("info", "warning", "error"), "info")
    return Event(at=at, backend=_text(data.get("backend"), NAME_MAX), kind=_text(data.get("kind"), 32) or "agent", message=message, level=level)


def fleet(doc: Any, agent: str | None) -> tuple[float, tuple[BackendSnapshot, ...], GpuStatus]:
    """(the agent's time, its backends, its GPUs) from a whole fleet document."""
    if not isinstance(doc, dict):
        raise WireError("not a fleet document (a JSON object was expected)")
    if doc.get("schema") != SCHEMA:
        raise WireError(f"fleet document schema {str(doc.get('schema'))[:20]!r}; this llmtop reads schema {SCHEMA}: upgrade the older side")
    at = _when(doc.get("at"))
    if at is None:
        raise WireError("the fleet document has no time")
    raw = doc.get("backends")
    if not isinstance(raw, list):
        raise WireError("the fleet document has no backend list")
    seen: dict[str, BackendSnapshot] = {}
    for item in raw:
        try:
            b = backend(item, agent)
        except WireError:
            continue
        seen.setdefault(b.name, b)  # a name twice is the agent's bug: the first one stands
    return at, tuple(seen.values()), gpus(doc)
