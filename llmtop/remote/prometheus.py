"""A Prometheus query API as a source of backends: what any number of `llmtop serve` agents export, read back read-only.

Prometheus, Thanos, Mimir and VictoriaMetrics all answer the same two calls, /api/v1/query and
/api/v1/query_range, so this speaks only those. One refresh is a fixed set of
instant queries, sent together, whatever the size of the fleet (Queries):
- `timestamp(llmtop_backend_ready{sel})`: which backends there are, their labels and when each
  was last scraped (the series is exported for every backend, always);
- one per family the table shows (the plain gauges, the three state sets' series that are 1,
  the per-model and per-rule gauges), each aggregated `max by` the identity so that duplicates
  (two jobs scraping one agent) are one row and the answer carries no label it does not need;
- the sparklines (TTFT, tokens/s, latency, queue, HISTORY_POINTS points over `history_window_s`)
  gain the values each refresh reads, at their scrape's time. After a gap (the first refresh,
  refreshes that failed) their earlier points are fetched with one `query_range` each, once the
  rows are shown, as far back as `backfill_points` allows across the fleet (at 3,000 backends,
  20 points of the 120), so no refresh costs more than about two; `history()` gives one backend's whole window for a detail
  chart, in milliseconds.

Rows are keyed (agent, backend): the agent is the series' `agent` label, else its `instance`
(the agent's address as Prometheus scrapes it), so the same backend name on two agents is two
rows. Everything in an answer is data from outside: a value that is not a finite number, a label
that is not a string, a body past MAX_BODY, a document of the wrong shape all read as absent,
bounded, or one PrometheusError, which the source catches and turns into its standing.

Truth at the edges (DESIGN.md):
- a family the answer lacks is unknown, never its good value: no `model_list_known` is an unknown
  model list (models None), no last-probe gauge is no current probe figure (never zero);
- a backend whose latest sample is older than `stale_after_s` is `stale_since` that sample's
  time (Prometheus' clock: ages are taken against the evaluation time of the same answer);
- a backend that vanishes while other backends of its agent are still scraped was removed from
  that agent's config: its row goes. When every backend of an agent vanishes at once the agent
  is lost (Prometheus writes staleness markers for a target that stops answering): its rows stay,
  stale since their last sample, never shown as down;
- when the query API fails, every row stays as last seen, marked stale, and the standing says why.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import os
import random
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import httpx

from llmtop.inbound import count, finite
from llmtop.redact import Redactor
from llmtop.remote import ActionRefused, SourceState, stop_following
from llmtop.snapshot import ADMIN_STATES, CIRCUITS, STATUSES, BackendSnapshot, Counters, Event, GpuStatus, Metrics, ProbeSummary
from llmtop.transport import shared_ssl_context

MAX_BODY = 64 * 1024 * 1024  # one answer; past it the selector must be narrowed
ERROR_BODY = 64 * 1024  # what is read of an error answer, for its message
NAME_MAX = 256  # a label value is cut to this
LABELS_MAX = 64  # labels kept of one series
MODELS_MAX = 500  # expected models of one backend (as wire.MODELS_MAX)
ALERTS_MAX = 64
ROWS_MAX = 50_000  # backends of one source; more are not shown, and the standing says so
VALUE_MAX = 64  # characters of a sample value ("1.5e+300" is 8)
LATEST = 253402300799.0  # 9999-12-31T23:59:59Z: a later time is not a time
HISTORY_POINTS = 120  # per series, as the engine's [settings] history
GAP_REFRESHES = 3  # refreshes missed (or slower than a sparkline step) before the sparklines are fetched again
DETAIL_MAX = 300
EVENTS_KEPT = 100
IDENTITY = "agent, instance, backend"
OWN_LABELS = {"__name__", "agent", "instance", "job", "backend", "provider"}  # not a backend's own labels
ALWAYS = ("llmtop_backend_status", "llmtop_backend_circuit", "llmtop_backend_admin")  # exported for every backend, as is model_list_known

STATESETS = {"llmtop_backend_status": STATUSES, "llmtop_backend_circuit": CIRCUITS, "llmtop_backend_admin": ADMIN_STATES}
GAUGES = (
    "llmtop_backend_up",
    "llmtop_backend_health_latency_seconds",
    "llmtop_backend_model_list_known",
    "llmtop_backend_models_served",
    "llmtop_backend_requests_running",
    "llmtop_backend_requests_waiting",
    "llmtop_backend_kv_cache_usage_ratio",
    "llmtop_backend_server_ttft_seconds",
    "llmtop_probe_last_ttft_seconds",
    "llmtop_probe_last_decode_tokens_per_second",
    "llmtop_probe_last_success_timestamp_seconds",
)
LISTS = {"llmtop_backend_model_missing": "model", "llmtop_backend_alert_tripped": "rule"}
# The sparklines: which family each is, and the factor to the unit BackendSnapshot keeps it in.
HISTORIES = {
    "ttft": ("llmtop_probe_last_ttft_seconds", 1000.0),
    "tps": ("llmtop_probe_last_decode_tokens_per_second", 1.0),
    "latency": ("llmtop_backend_health_latency_seconds", 1000.0),
    "queue": ("llmtop_backend_requests_waiting", 1.0),
}
READ_ONLY = "read-only: the Prometheus source cannot act; drain or probe on the agent itself (llmtop --connect, or its admin API)"


class PrometheusError(Exception):
    """A query API answer this source cannot use; str() is one line, with no secret in it.
    `standing` is what the source's state becomes: "error", or "unauthorized"."""

    def __init__(self, message: str, standing: str = "error"):
        super().__init__(message)
        self.standing = standing


# -- reading answers ---------------------------------------------------------------------------------


def _label(labels: dict, name: str) -> str | None:
    """One label of a series as it came (a JSON object: keys are strings, values anything): a
    string cut to NAME_MAX, or None. Labels are read one by one, only those needed, since a
    refresh reads tens of thousands of series."""
    value = labels.get(name)
    return value[:NAME_MAX] if type(value) is str else None


def _own_labels(labels: dict) -> tuple[tuple[str, str], ...]:
    """A backend's own labels (its config's, and the target's besides job and instance): at most LABELS_MAX, each cut."""
    return tuple(sorted(
        (k[:NAME_MAX], v[:NAME_MAX]) for k, v in itertools.islice(labels.items(), LABELS_MAX) if type(v) is str and k not in OWN_LABELS
    ))


def _when(value: Any) -> float | None:
    number = finite(value)
    return number if number is not None and 0.0 <= number <= LATEST else None


def _value(value: Any) -> float | None:
    """A sample value as the API writes it (a string: "1.5", "NaN", "+Inf"); a finite float or None."""
    if isinstance(value, str):
        if len(value) > VALUE_MAX:
            return None
        try:
            number = float(value)
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    return finite(value)  # some implementations write numbers; a bool or anything else is not one


def _sample(pair: Any) -> tuple[float, float | None] | None:
    """(time, value) of one `[time, "value"]`; None when the time is not one. The common case
    (a float time, a short string value) comes first: a refresh reads tens of thousands."""
    if type(pair) is not list or len(pair) != 2:
        return None
    at, value = pair
    if type(at) is not float or not 0.0 <= at <= LATEST:
        at = _when(at)
        if at is None:
            return None
    if type(value) is str and len(value) <= VALUE_MAX:
        try:
            number = float(value)
        except ValueError:
            return at, None
        return at, (number if math.isfinite(number) else None)
    return at, _value(value)


def parse_answer(body: bytes | str, result_type: str) -> list:
    """The series of one query answer: for "vector", [(labels, time, value or None)]; for
    "matrix", [(labels, ((time, value), ...))] with only finite values, the last HISTORY_POINTS.
    `labels` is the series' JSON object as it came: read it with _label. PrometheusError when
    the document is not a successful answer of that type; a series of the wrong shape is skipped."""
    try:
        doc = json.loads(body, parse_constant=lambda _token: None)
    except (ValueError, RecursionError, UnicodeDecodeError) as exc:
        raise PrometheusError(f"the query API's answer is not JSON ({type(exc).__name__})") from None
    if not isinstance(doc, dict):
        raise PrometheusError("the query API's answer is not a JSON object")
    if doc.get("status") != "success":
        raise PrometheusError(_api_error(doc))
    data = doc.get("data")
    if not isinstance(data, dict) or data.get("resultType") != result_type or not isinstance(data.get("result"), list):
        got = data.get("resultType") if isinstance(data, dict) else None
        raise PrometheusError(f"the query API answered a {_short(got) if isinstance(got, str) else 'document'} where a {result_type} was asked for")
    out: list = []
    for item in data["result"]:
        if type(item) is not dict or type(labels := item.get("metric")) is not dict:
            continue
        if result_type == "vector":
            sample = _sample(item.get("value"))
            if sample is not None:
                out.append((labels, sample[0], sample[1]))
        else:
            values = item.get("values")
            if not isinstance(values, list):
                continue
            points = []
            for pair in values[-HISTORY_POINTS:]:
                sample = _sample(pair)
                if sample is not None and sample[1] is not None:
                    points.append(sample)
            out.append((labels, tuple(points)))
    return out


def _api_error(doc: Any) -> str:
    if isinstance(doc, dict) and isinstance(doc.get("error"), str):
        kind = doc.get("errorType") if isinstance(doc.get("errorType"), str) else "error"
        return f"the query API refused the query ({_short(kind, 40)}): {_short(doc['error'])}"
    return "the query API's answer is not a success"


def _short(text: str, limit: int = 200) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


# -- turning answers into rows -------------------------------------------------------------------------

Key = tuple[str, str]  # (agent, backend)


def _key(labels: dict) -> tuple[Key, str] | None:
    """(agent, backend) and the label the agent was read from; None without a backend name."""
    backend = _label(labels, "backend")
    if not backend:
        return None
    agent = _label(labels, "agent")
    if agent:
        return (agent, backend), "agent"
    return (_label(labels, "instance") or "", backend), "instance"


@dataclass
class Seen:
    """One backend as the latest answers describe it (built by `assemble`)."""

    key: Key
    agent_label: str  # "agent" or "instance": which label names the agent (for history queries)
    labels: tuple[tuple[str, str], ...]
    provider: str
    sample_at: float  # the time of its latest scrape
    age_s: float  # how old that was when the query was evaluated
    gauges: dict[str, float | None] = field(default_factory=dict)
    states: dict[str, str] = field(default_factory=dict)
    conflicting: set[str] = field(default_factory=set)  # state sets with more than one state on
    missing: dict[str, float | None] = field(default_factory=dict)  # model -> 1 missing, 0 served
    tripped: dict[str, float | None] = field(default_factory=dict)  # rule -> 1 tripped, 0 not

    def torn(self) -> bool:
        """A family every backend exports is missing: the queries were answered on either side of
        a scrape that added or removed this backend (or its exporter is not llmtop's)."""
        return "llmtop_backend_model_list_known" not in self.gauges or any(
            f not in self.states and f not in self.conflicting for f in ALWAYS
        )


def assemble(seen: list, families: dict[str, list]) -> dict[Key, Seen]:
    """The backends of one refresh from parse_answer's vectors: `seen`'s, and each family's
    (by name: a gauge, a state set, or a per-model or per-rule gauge). A series of a backend not
    in `seen` is ignored: `seen` says which backends exist."""
    rows: dict[Key, Seen] = {}
    for labels, at, value in seen:
        found = _key(labels)
        sample_at = _when(value)
        if found is None or sample_at is None or found[0] in rows:
            continue
        if len(rows) >= ROWS_MAX:
            break
        key, agent_label = found
        rows[key] = Seen(
            key=key,
            agent_label=agent_label,
            labels=_own_labels(labels),
            provider=_label(labels, "provider") or "?",
            sample_at=sample_at,
            age_s=max(0.0, at - sample_at),
        )
    for family, series in families.items():
        allowed = STATESETS.get(family)
        extra = LISTS.get(family)
        for labels, _at, value in series:
            found = _key(labels)
            row = None if found is None else rows.get(found[0])
            if row is None:
                continue
            if allowed is not None:
                state = _label(labels, family)
                if value != 1.0 or state is None:
                    continue
                if state in allowed and family not in row.states:
                    row.states[family] = state
                elif state != row.states.get(family):
                    row.conflicting.add(family)
            elif extra is not None:
                own_label = _label(labels, extra)
                held = row.missing if extra == "model" else row.tripped
                if own_label is not None and len(held) < (MODELS_MAX if extra == "model" else ALERTS_MAX):
                    held[own_label] = value
            elif family in GAUGES:
                row.gauges[family] = value
    return rows


def _nonneg(value: float | None, scale: float = 1.0) -> float | None:
    if value is None or value < 0:
        return None
    scaled = value * scale
    return scaled if math.isfinite(scaled) else None


def snapshot_of(row: Seen, stale_since: float | None, history: dict[str, tuple] | None = None, seq: int = 0) -> BackendSnapshot:
    """A row as the faces read it. What Prometheus does not carry (the backend's URL, its recent
    errors, the reason for its status) is absent, never made up."""
    g = row.gauges
    agent, name = row.key
    status = row.states.get("llmtop_backend_status", "unknown")
    status_reason = None
    if "llmtop_backend_status" in row.conflicting:
        status, status_reason = "unknown", "the exported status is not one state"
    elif "llmtop_backend_status" not in row.states:
        status_reason = "no status in Prometheus"
    admin = row.states.get("llmtop_backend_admin", "active")
    known = g.get("llmtop_backend_model_list_known")
    expected = tuple(sorted(row.missing))
    if known == 1.0:
        missing = tuple(m for m in expected if row.missing[m] != 0.0)  # a value that is not 0 is not "served"
        models: tuple[str, ...] | None = tuple(m for m in expected if row.missing[m] == 0.0)
        served = g.get("llmtop_backend_models_served")
        models_total = count(int(served)) if served is not None and served.is_integer() else None
        models_error = None
        if not expected and models_total is None:  # an agent from before the count was exported
            models, models_error = None, "the agent exports no model count"
    else:
        missing, models, models_total = (), None, None
        models_error = "the agent could not read the model list" if known == 0.0 else "no model list in Prometheus"
    metrics_fields = {
        "requests_running": _nonneg(g.get("llmtop_backend_requests_running")),
        "requests_waiting": _nonneg(g.get("llmtop_backend_requests_waiting")),
        "kv_cache_usage": _nonneg(g.get("llmtop_backend_kv_cache_usage_ratio")),
        "server_ttft_ms": _nonneg(g.get("llmtop_backend_server_ttft_seconds"), 1000.0),
    }
    metrics = Metrics(**metrics_fields) if any(v is not None for v in metrics_fields.values()) else None
    last_success = _when(g.get("llmtop_probe_last_success_timestamp_seconds"))
    ttft = _nonneg(g.get("llmtop_probe_last_ttft_seconds"), 1000.0)
    tps = _nonneg(g.get("llmtop_probe_last_decode_tokens_per_second"))
    probe = None
    if ttft is not None or tps is not None:  # exported only while current: absent is no current figure
        probe = ProbeSummary(
            model=None, ttft_ms=ttft, tokens_per_s=tps, output_tokens=None, tokens_estimated=False, error=None,
            at=last_success if last_success is not None else row.sample_at,
        )
    up = g.get("llmtop_backend_up")
    history = history or {}
    return BackendSnapshot(
        name=name,
        provider=row.provider,
        url="",
        status=status,
        status_reason=status_reason,
        circuit=row.states.get("llmtop_backend_circuit", "closed"),
        admin=admin,
        enabled=admin != "disabled",
        latency_ms=_nonneg(g.get("llmtop_backend_health_latency_seconds"), 1000.0),
        models=models,
        expected_models=expected,
        missing_models=missing,
        alerts=tuple(sorted(rule for rule, v in row.tripped.items() if v == 1.0)),
        metrics=metrics,
        probe=probe,
        error=None,
        error_rate=None,
        last_health_at=None,
        retry_after_at=None,
        probe_tokens_per_hour=0.0,
        models_total=models_total,
        models_error=models_error,
        last_ok_probe=probe if ttft is not None else None,
        counters=Counters(last_success_at=last_success),
        labels=row.labels,
        up=True if up == 1.0 else False if up == 0.0 else None,
        agent=agent,
        stale_since=stale_since,
        ttft_history=history.get("ttft", ()),
        tps_history=history.get("tps", ()),
        latency_history=history.get("latency", ()),
        queue_history=history.get("queue", ()),
        seq=seq,
    )


# -- queries ---------------------------------------------------------------------------------------------


def matchers(selector: str | None) -> str:
    """The label matchers inside a selector such as '{job="llmtop"}' (braces optional)."""
    text = (selector or "").strip()
    if len(text) > 4096:
        raise ValueError("the selector is longer than 4096 characters")
    if text.startswith("{"):
        if not text.endswith("}"):
            raise ValueError(f"the selector {text[:60]!r} has no closing brace: write label matchers, e.g. {{job=\"llmtop\"}}")
        text = text[1:-1].strip()
    elif "{" in text or (text and not text[0].isalpha()):
        raise ValueError(f"the selector {text[:60]!r} is not label matchers: write e.g. {{job=\"llmtop\"}}")
    elif text and "=" not in text:
        raise ValueError(f"the selector {text[:60]!r} names no label: write label matchers, e.g. {{job=\"llmtop\"}}")
    return text.rstrip(",").strip()


def _promql_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _select(inner: str, *more: str) -> str:
    parts = [p for p in (*more, inner) if p]
    return "{" + ", ".join(parts) + "}" if parts else ""


@dataclass(frozen=True)
class Queries:
    """The queries of one refresh, one per family: a query per family costs Prometheus far less
    than one over a `__name__` regex (25 ms against 750 ms for the gauges of 3,000 backends) or
    than the same queries joined with `or` (1.8 s: its cost grows with the square of the parts),
    and its answer carries no `__name__`, a third of each series' bytes. Separate queries may
    each see a different scrape; the source mends the one tear that matters (see _merge)."""

    instant: dict[str, str]  # "seen", then each family -> its instant query
    history: dict[str, str]  # sparkline -> its range query

    @classmethod
    def over(cls, inner: str, extra: tuple[str, ...] = ()) -> "Queries":
        """The queries over the selector's matchers (and `extra` matchers)."""
        sel = _select(inner, *extra)
        instant = {"seen": f"timestamp(llmtop_backend_ready{sel})"}
        instant.update({family: f"max by ({IDENTITY}) ({family}{sel})" for family in GAUGES})
        instant.update({family: f"max by ({IDENTITY}, {family}) ({family}{sel} == 1)" for family in STATESETS})
        instant.update({family: f"max by ({IDENTITY}, {label}) ({family}{sel})" for family, label in LISTS.items()})
        history = {kind: f"max by ({IDENTITY}) ({family}{sel})" for kind, (family, _scale) in HISTORIES.items()}
        return cls(instant=instant, history=history)


def _histories(answers: dict[str, list]) -> dict[Key, dict[str, tuple]]:
    """parse_answer's matrices of the history queries (by sparkline), per backend, in the faces' units."""
    out: dict[Key, dict[str, tuple]] = {}
    for kind, series in answers.items():
        scale = HISTORIES[kind][1]
        for labels, points in series:
            found = _key(labels)
            if found is not None:
                out.setdefault(found[0], {})[kind] = tuple((t, v * scale) for t, v in points if v >= 0 and math.isfinite(v * scale))
    return out


# -- the source ----------------------------------------------------------------------------------------


class PrometheusSource:
    """The backends that `llmtop serve` agents export to one Prometheus-compatible query API,
    refreshed every `refresh_s`; read-only. Credentials come only from the environment variables
    named (read at each refresh, so a rotated token is picked up), never from the URL."""

    def __init__(
        self,
        url: str,
        selector: str | None = None,
        *,
        bearer_token_env: str | None = None,
        basic_user_env: str | None = None,
        basic_password_env: str | None = None,
        refresh_s: float = 5.0,
        stale_after_s: float = 60.0,
        history_window_s: float = 600.0,
        backfill_points: int = 250_000,
        timeout_s: float = 10.0,
        max_body: int = MAX_BODY,
        clock: Callable[[], float] = time.time,
        sparklines: bool = True,
    ):
        parsed = httpx.URL(url)
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ValueError(f"the Prometheus URL must be http:// or https:// with a host, e.g. http://prometheus:9090 (got {_short(url.split('@')[-1], 80)!r})")
        if parsed.userinfo:
            raise ValueError("the Prometheus URL carries credentials: put them in environment variables (bearer_token_env, basic_user_env and basic_password_env) instead")
        if (basic_user_env is None) != (basic_password_env is None):
            raise ValueError("basic auth needs both basic_user_env and basic_password_env")
        if not 0.1 <= refresh_s <= 86400 or not 1 <= history_window_s <= 7 * 86400 or stale_after_s <= 0:
            raise ValueError("refresh_s must be 0.1 to 86400 s, history_window_s 1 s to 7 days, stale_after_s above 0")
        self.url = str(parsed).rstrip("/")
        self.selector = selector
        self._inner = matchers(selector)
        self._queries = Queries.over(self._inner)
        self._bearer_env = bearer_token_env
        self._user_env = basic_user_env
        self._password_env = basic_password_env
        self.refresh_s = refresh_s
        self.stale_after_s = stale_after_s
        self.history_window_s = history_window_s
        self.history_step_s = history_window_s / HISTORY_POINTS
        self.backfill_points = backfill_points
        self.sparklines = sparklines  # False: no history kept nor fetched (`check`); history() still answers
        self._timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 5.0))
        self._deadline_s = 2 * timeout_s  # a whole refresh, however the answers trickle in
        self._max_body = max_body
        self._clock = clock
        self._client: httpx.AsyncClient | None = None
        self._task: asyncio.Task | None = None
        self._lock = asyncio.Lock()
        self._rows: dict[Key, BackendSnapshot] = {}
        self._sample_at: dict[Key, float] = {}  # each row's latest scrape, for its stale_since once it is lost
        self._agent_label: dict[Key, str] = {}
        self._history: dict[Key, dict[str, deque]] = {}
        self._history_version: dict[Key, int] = {}  # bumped when a row's sparklines gain points
        self._inputs: dict[Key, tuple] = {}  # what each row was made from
        self._torn: set[Key] = set()  # rows kept as they were in the last refresh, their answers torn
        self._history_end: float | None = None  # the last step the sparklines hold
        self._standing = "connecting"
        self._since = clock()
        self._detail: str | None = None
        self._events: deque[Event] = deque(maxlen=EVENTS_KEPT)
        self.last_refresh_s: float | None = None  # how long the last refresh took (for check and benchmarks)
        self.last_table_s: float | None = None  # how long until its rows were shown (a backfill comes after)

    def __repr__(self) -> str:
        return f"PrometheusSource({self.url!r}, selector={self.selector!r})"

    # -- the Source protocol -------------------------------------------------------------------------

    def state(self) -> SourceState:
        return SourceState(
            name="prometheus", url=self.url, standing=self._standing, since=self._since, detail=self._detail,
            can_act=False, backends=len(self._rows),
        )

    def backends(self) -> tuple[BackendSnapshot, ...]:
        return tuple(self._rows.values())

    def gpus(self) -> GpuStatus:
        return GpuStatus(message="GPUs are not read from Prometheus: see each agent (llmtop --connect)")

    def events(self) -> tuple[Event, ...]:
        return tuple(self._events)

    async def act(self, backend: str, action: str) -> str:
        raise ActionRefused(READ_ONLY)

    async def probe_all(self) -> str:
        raise ActionRefused(READ_ONLY)

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="llmtop:prometheus")

    async def stop(self) -> None:
        task, client, self._task, self._client = self._task, self._client, None, None
        await stop_following(task, client)

    async def _run(self) -> None:
        failures = 0
        while True:
            state = await self.refresh()
            failures = 0 if state.standing == "connected" else failures + 1
            # After a failure, back off (to a minute at most) with jitter, so many TUIs that lost
            # one Prometheus do not come back to it in step.
            delay = self.refresh_s if not failures else min(60.0, self.refresh_s * 2 ** min(failures, 8))
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))

    # -- one refresh ---------------------------------------------------------------------------------

    async def refresh(self) -> SourceState:
        """One full refresh; the standing after it (a failure is in the standing, never raised)."""
        async with self._lock:
            started = time.perf_counter()
            history_at = None
            try:
                history_at = await asyncio.wait_for(self._refresh(started), self._deadline_s)
            except Exception as exc:  # noqa: BLE001 - a monitor keeps watching, and says so, whatever went wrong
                self._lost(*self._failure(exc, self._deadline_s))
            if history_at is not None:
                await self._backfill_from(history_at)
                # Gaps are measured from here: a backfill that took long is not a gap of its own.
                self._history_end = max(self._history_end or 0.0, self._clock())
            self.last_refresh_s = time.perf_counter() - started
            return self.state()

    async def _refresh(self, started: float) -> tuple[float, float, float] | None:
        """The rows, from the instant queries; the range of sparkline points to backfill after them, if any."""
        q = self._queries
        now = self._clock()
        answers = await asyncio.gather(*(self._query(expr) for expr in q.instant.values()), return_exceptions=True)
        for answer in answers:  # the first failure is the one to report; the others are the same cause
            if isinstance(answer, BaseException):
                raise answer
        instant = dict(zip(q.instant, answers))
        rows = assemble(instant.pop("seen"), instant)
        # The sparklines: each refresh adds the values it just read, at their scrape's time, for
        # nothing. After a gap (the first refresh, or refreshes that failed) their earlier points
        # come from query_range, as far back as `backfill_points` allows across the fleet, once
        # the table is shown: at 3,000 backends they took as long again as the table.
        history_at = self._history_range(now, len(rows)) if self.sparklines else None
        if self.sparklines:
            self._add_latest(rows)
        self._merge(rows)
        note = f"more than {ROWS_MAX} backends: the first {ROWS_MAX} are shown; narrow the selector" if len(rows) >= ROWS_MAX else None
        self._set_standing("connected", note)
        self.last_table_s = time.perf_counter() - started
        self._history_end = now
        return history_at

    def _failure(self, exc: BaseException, deadline: float) -> tuple[str, str]:
        """(standing, one line) for what ended a refresh or a backfill, alike for both."""
        if isinstance(exc, asyncio.TimeoutError):
            return "error", f"the query API at {self.url} took longer than {deadline:g} s to answer"
        if isinstance(exc, PrometheusError):
            return exc.standing, str(exc)
        if isinstance(exc, (httpx.HTTPError, OSError)):
            return "error", f"the query API at {self.url} did not answer: {_short(str(exc) or type(exc).__name__, 160)}"
        return "error", f"unexpected {type(exc).__name__} reading the query API (a bug in llmtop: please report it)"

    async def _backfill_from(self, history_at: tuple[float, float, float]) -> None:
        """The sparklines' earlier points, after the rows are shown, within a deadline of their
        own (two refresh intervals, at least a second: the table's next refresh waits for it).
        Failing, the rows stand as they are (the table was read), the sparklines start from now,
        and the events log says why; it is not tried again until the next gap."""
        q = self._queries
        deadline = min(self._deadline_s, max(1.0, 2 * self.refresh_s))
        try:
            fetched = await asyncio.wait_for(
                asyncio.gather(*(self._query_range(expr, *history_at) for expr in q.history.values()), return_exceptions=True),
                deadline,
            )
            for answer in fetched:  # all have ended; the first failure says why
                if isinstance(answer, BaseException):
                    raise answer
        except Exception as exc:  # noqa: BLE001 - as refresh(): keep watching, and say so
            why = self._failure(exc, deadline)[1]
        else:
            self._backfill(_histories(dict(zip(q.history, fetched))))
            return
        message = _short(self._redactor()(f"prometheus {self.url}: the sparklines' earlier points were not read: {why}"), DETAIL_MAX)
        self._events.append(Event(at=self._clock(), backend=None, kind="source", message=message, level="warning"))

    def _merge(self, rows: dict[Key, Seen]) -> None:
        live_agents = {key[0] for key, row in rows.items() if row.age_s <= self.stale_after_s}
        merged: dict[Key, BackendSnapshot] = {}
        torn: set[Key] = set()
        for key, row in rows.items():
            stale = row.sample_at if row.age_s > self.stale_after_s else None
            # A row whose inputs are as they were is the same snapshot (faces redraw by seq), and
            # costs nothing to make: at 3,000 backends most of them, between sparkline steps.
            g = row.gauges
            probe_at = None if g.get("llmtop_probe_last_success_timestamp_seconds") is not None else row.sample_at
            inputs = (row.provider, row.labels, tuple(g.items()), tuple(row.states.items()), tuple(sorted(row.conflicting)),
                      tuple(row.missing.items()), tuple(row.tripped.items()), stale, probe_at, self._history_version.get(key, 0))
            old = self._rows.get(key)
            if old is not None and row.torn() and key not in self._torn:
                merged[key] = old  # half of a scrape that came or went: the row as it was, for this refresh
                torn.add(key)
                continue
            if old is not None and self._inputs.get(key) == inputs:
                merged[key] = old
            else:
                merged[key] = snapshot_of(row, stale, self._history_of(key), seq=0 if old is None else old.seq + 1)
            self._inputs[key] = inputs
            self._sample_at[key] = row.sample_at
            self._agent_label[key] = row.agent_label
        for key, old in self._rows.items():
            if key in merged or key[0] in live_agents:
                continue  # still there, or removed from a live agent's config
            since = old.stale_since if old.stale_since is not None else self._sample_at.get(key)
            merged[key] = old if since == old.stale_since else replace(old, stale_since=since, seq=old.seq + 1)
            self._inputs.pop(key, None)  # made again in full when its agent is back
        for held in (self._sample_at, self._agent_label, self._history, self._history_version, self._inputs):
            for key in [k for k in held if k not in merged]:
                del held[key]
        self._rows = dict(sorted(merged.items()))
        self._torn = torn  # a row torn twice running is what its exporter sends: shown as it is
    def _lost(self, standing: str, detail: str) -> None:
        """The query API failed: every row stays as last seen, stale since its last sample."""
        self._inputs.clear()  # every row is made again in full when the API is back
        for key, old in list(self._rows.items()):
            if old.stale_since is None:
                self._rows[key] = replace(old, stale_since=self._sample_at.get(key, self._clock()), seq=old.seq + 1)
        if standing == "error" and self._rows:
            standing = "stale"
        self._set_standing(standing, detail)

    def _set_standing(self, standing: str, detail: str | None) -> None:
        detail = None if detail is None else _short(self._redactor()(detail), DETAIL_MAX)
        if standing != self._standing:
            self._since = self._clock()
            level = "info" if standing == "connected" else "warning" if standing == "stale" else "error"
            message = f"prometheus {self.url}: {standing}" + (f": {detail}" if detail else "")
            self._events.append(Event(at=self._since, backend=None, kind="source", message=message, level=level))
        self._standing, self._detail = standing, detail

    # -- history -------------------------------------------------------------------------------------

    def _history_range(self, now: float, rows: int) -> tuple[float, float, float] | None:
        """(start, end, step) of the sparkline points to fetch: None while refreshes follow each
        other closely; after a gap (or at first) the points since the last good refresh, as far
        back as `backfill_points` allows across `rows` backends."""
        step = self.history_step_s
        if self._history_end is not None and now - self._history_end <= GAP_REFRESHES * max(step, self.refresh_s):
            return None
        end = math.floor(now / step) * step
        per_series = max(1, min(HISTORY_POINTS, self.backfill_points // (len(HISTORIES) * max(1, rows))))
        start = end - (per_series - 1) * step
        if self._history_end is not None:
            start = max(start, math.floor(self._history_end / step) * step + step)
        return None if start > end else (start, end, step)

    def _backfill(self, fetched: dict[Key, dict[str, tuple]]) -> None:
        """The sparklines' earlier points, fetched after the rows were shown: merged in by time
        with what the rows hold (the latest values the table read), and the rows that gained
        points made again with them."""
        for key, kinds in fetched.items():
            if key not in self._rows:
                continue  # gone meanwhile, or beyond ROWS_MAX
            held = self._history.setdefault(key, {kind: deque(maxlen=HISTORY_POINTS) for kind in HISTORIES})
            # A range's last step re-reads the scrape the table just read, under the step's time:
            # what is as new as that scrape is already held, at its own time.
            latest = self._sample_at.get(key, math.inf)
            gained = False
            for kind, points in kinds.items():
                have = held[kind]
                times = {t for t, _ in have}
                new = [p for p in points if p[0] not in times and p[0] < latest]
                if new:
                    held[kind] = deque(sorted([*have, *new])[-HISTORY_POINTS:], maxlen=HISTORY_POINTS)
                    gained = True
            if gained:
                version = self._history_version[key] = self._history_version.get(key, 0) + 1
                old = self._rows[key]
                h = self._history_of(key)
                self._rows[key] = replace(
                    old, ttft_history=h["ttft"], tps_history=h["tps"], latency_history=h["latency"], queue_history=h["queue"], seq=old.seq + 1,
                )
                inputs = self._inputs.get(key)
                if inputs is not None:  # as made now: the next refresh need not make it again
                    self._inputs[key] = inputs[:-1] + (version,)

    def _add_latest(self, rows: dict[Key, Seen]) -> None:
        """Each row's sparklines gain the values just read, at the time of their scrape (once a scrape)."""
        for key, row in rows.items():
            held = None
            for kind, (family, scale) in HISTORIES.items():
                value = row.gauges.get(family)
                if value is None or value < 0 or not math.isfinite(value * scale):
                    continue
                if held is None:
                    held = self._history.setdefault(key, {k: deque(maxlen=HISTORY_POINTS) for k in HISTORIES})
                points = held[kind]
                if not points or points[-1][0] < row.sample_at:
                    points.append((row.sample_at, value * scale))
                    self._history_version[key] = self._history_version.get(key, 0) + 1

    def _history_of(self, key: Key) -> dict[str, tuple] | None:
        held = self._history.get(key)
        return None if held is None else {kind: tuple(points) for kind, points in held.items()}

    async def history(self, agent: str, backend: str, seconds: float) -> dict[str, tuple[tuple[float, float], ...]]:
        """One backend's sparklines over the last `seconds` (at most HISTORY_POINTS points each, in
        the faces' units: ms, tokens/s, ms, requests), for a detail chart. PrometheusError when
        the query API fails."""
        seconds = min(max(float(seconds), 1.0), 7 * 86400.0) if math.isfinite(seconds) else 600.0
        label = self._agent_label.get((agent, backend), "instance")
        extra = (f"backend={_promql_string(backend[:NAME_MAX])}", f"{label}={_promql_string(agent[:NAME_MAX])}")
        step = max(1.0, seconds / HISTORY_POINTS)
        end = self._clock()
        queries = Queries.over(self._inner, extra).history
        try:
            answers = await asyncio.gather(*(self._query_range(expr, end - seconds, end, step) for expr in queries.values()))
        except PrometheusError as exc:
            raise PrometheusError(self._redactor()(str(exc)), exc.standing) from None
        except (httpx.HTTPError, OSError) as exc:
            detail = self._redactor()(_short(str(exc) or type(exc).__name__, 160))
            raise PrometheusError(f"the query API at {self.url} did not answer: {detail}") from None
        found = _histories(dict(zip(queries, answers))).get((agent, backend), {})
        return {kind: found.get(kind, ()) for kind in HISTORIES}

    # -- HTTP ----------------------------------------------------------------------------------------

    def _redactor(self) -> Redactor:
        secrets = [os.environ.get(env, "") for env in (self._bearer_env, self._password_env) if env]
        return Redactor(tuple(s.strip() for s in secrets if s.strip()))

    def _auth(self) -> tuple[dict[str, str], httpx.Auth | None]:
        envs = [e for e in (self._bearer_env, self._user_env, self._password_env) if e]
        unset = [e for e in envs if not os.environ.get(e)]
        if unset:
            raise PrometheusError(f"set {' and '.join(unset)} for the query API's credentials", "unauthorized")
        values = {e: os.environ[e].strip() for e in envs}  # a credential read from a file often ends in a newline
        if self._bearer_env and not all("!" <= ch <= "~" for ch in values[self._bearer_env]):
            raise PrometheusError(f"{self._bearer_env} holds a space or a character an HTTP header cannot carry: set it to the token alone", "unauthorized")
        headers = {"Authorization": f"Bearer {values[self._bearer_env]}"} if self._bearer_env else {}
        auth = httpx.BasicAuth(values[self._user_env], values[self._password_env]) if self._user_env else None
        return headers, auth

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                trust_env=False, verify=shared_ssl_context(), follow_redirects=False, timeout=self._timeout,
                limits=httpx.Limits(max_connections=24, max_keepalive_connections=24),  # a refresh's queries, all at once
                headers={"Accept": "application/json", "User-Agent": "llmtop"},
            )
        return self._client

    async def _query(self, expr: str) -> list:
        return parse_answer(await self._get("/api/v1/query", {"query": expr}), "vector")

    async def _query_range(self, expr: str, start: float, end: float, step: float) -> list:
        params = {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:.3f}"}
        return parse_answer(await self._get("/api/v1/query_range", params), "matrix")

    async def _get(self, path: str, params: dict[str, str]) -> bytes:
        headers, auth = self._auth()
        request = self._http().build_request("GET", self.url + path, params=params, headers=headers)
        response = await self._http().send(request, auth=auth, stream=True)
        try:
            if response.status_code in (401, 403):
                envs = " and ".join(e for e in (self._bearer_env, self._user_env, self._password_env) if e)
                fix = f"check {envs}" if envs else "set a bearer token (bearer_token_env) or basic auth (basic_user_env, basic_password_env)"
                raise PrometheusError(f"the query API answered {response.status_code}: {fix}", "unauthorized")
            if response.is_redirect:
                where = _short(response.headers.get("location", "?"), 120)
                raise PrometheusError(f"the query API at {self.url} redirects to {where}: use the final address")
            limit = self._max_body if response.status_code == 200 else ERROR_BODY
            chunks, size = [], 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > limit:
                    if response.status_code != 200:
                        break
                    raise PrometheusError(f"the query API answered more than {limit // (1024 * 1024)} MiB for one query: narrow the selector")
                chunks.append(chunk)
            body = b"".join(chunks)
        finally:
            await response.aclose()
        if response.status_code != 200:
            try:
                detail = _api_error(json.loads(body[:ERROR_BODY]))
            except (ValueError, RecursionError, UnicodeDecodeError):
                detail = "no error message"
            raise PrometheusError(f"the query API answered HTTP {response.status_code}: {detail}")
        return body
