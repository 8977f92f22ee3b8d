"""One backend's state: poll and probe results in (masked, bounded and checked once, here), status and snapshot out."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import httpx

from llmtop.budget import Pacer, Plan
from llmtop.config import BackendConfig, Policy
from llmtop.health import OPEN, CircuitBreaker, StatusInputs, derive_status, missing_models, tripped_alerts
from llmtop.metrics import alert_values
from llmtop.probe import HealthResult, ModelsResult, ProbeResult
from llmtop.providers import adapter_class
from llmtop.providers.base import Adapter, PollResult, ProbeChoice
from llmtop.redact import Redactor
from llmtop.sanitize import clip
import bisect
import dataclasses

from llmtop.snapshot import TPS_BUCKETS, TTFT_BUCKETS_S, BackendSnapshot, Counters, Event, Metrics, ProbeSummary

if TYPE_CHECKING:
    from llmtop.engine import Engine

# What is kept of a backend's own words: a model list of any length keeps this many ids (and its
# total), and any text this many characters. A backend that answers with a million ids or a
# megabyte of error costs the same as one that does not.
MODELS_KEPT = 500
TEXT_KEPT = 300
MODEL_ID_KEPT = 256
# A 429 without a Retry-After still pauses the backend: this long.
DEFAULT_RETRY_AFTER_S = 30.0
MODE_NOTES = {
    "health": 'health checks only: no completion probes (probe = "health")',
    "off": 'not monitored: no polls or probes, only the admin state (probe = "off")',
}


def uses_tls(url: str) -> bool:
    return urlsplit(url).scheme.lower() == "https"  # the config accepts HTTPS:// too


class BackendTracker:
    """Everything known about one backend, fed by poll and probe results; one per configured backend.

    Every text that arrives from the backend passes `_keep` (secrets masked first, then cut to
    length) before it is stored, so nothing downstream (snapshot, events, screens, JSON) can
    hold a key or an unbounded string.
    """

    def __init__(self, engine: "Engine", config: BackendConfig):
        self.engine = engine
        self.config = config
        settings = engine.config.settings
        self.breaker = CircuitBreaker(engine.config.breaker, engine.clock)
        self.adapter: Adapter | None = None
        self.client: httpx.AsyncClient | None = None
        self._redact = Redactor()
        self.health: HealthResult | None = None
        self.models: tuple[str, ...] | None = None  # at most MODELS_KEPT; None while unknown
        self.models_total: int | None = None
        self.models_error: str | None = None  # why the list is unknown
        self.loaded: tuple[str, ...] | None = None  # Ollama: models in memory now (/api/ps)
        self.version: str | None = None
        self.metrics: Metrics | None = None
        self.metrics_error: str | None = None
        self.probe: ProbeSummary | None = None  # the last attempt
        self.last_ok_probe: ProbeSummary | None = None  # the last one that measured something
        self.probe_note: str | None = None  # why no probe can be sent ("not probed: ...")
        self.last_health_at: float | None = None
        self.trouble_at: float | None = None  # wall time a poll or probe last failed
        self.retry_after_until: float | None = None  # monotonic
        self.next_probe_at: float = 0.0  # monotonic; 0 = as soon as allowed
        self.next_poll_at: float = 0.0  # monotonic: when the live loop's next poll is due
        self.next_round_at: float = 0.0  # monotonic: its next round, a poll or a probe that falls due first
        self.charged = 0.0  # tokens the budgets were charged for the probe in flight
        self.forced = False  # the operator asked for a probe now: no budget holds it back
        self.plan = Plan(self.policy.probe_interval_s)  # the probe interval a budget leaves (engine._plan)
        self.skip_note: str | None = None  # "probe skipped: ..." until a probe is sent again
        self.pacer: Pacer | None = None  # probe_tokens_per_hour's hard pace
        self._pacer_for: float | None = None
        self.status, self.status_reason = "unknown", "not yet probed"
        self.missing: tuple[str, ...] = ()  # as last announced
        self._missing_read: tuple[str, ...] = ()  # as the latest model list says
        self.alerts: tuple[str, ...] = ()
        self.alerts_unknown: str | None = None
        n = settings.history
        self.ttft_history: deque = deque(maxlen=n)
        self.tps_history: deque = deque(maxlen=n)
        self.latency_history: deque = deque(maxlen=n)
        self.queue_history: deque = deque(maxlen=n)
        self.recent_errors: deque = deque(maxlen=20)
        self.counters = Counters()
        self._transitions_seen = 0
        self.seq = 0
        self._snapshot: BackendSnapshot | None = None
        self._snapshot_seq = -1
        self.snapshot_circuit = "closed"  # the breaker state the cached snapshot shows
        self.wake = asyncio.Event()
        self.busy = False

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def policy(self) -> Policy:
        """This backend's resolved probe policy, made again only when the config changed."""
        key = (self.engine.config, self.config)
        cached = getattr(self, "_policy", None)
        if cached is None or cached[0][0] is not key[0] or cached[0][1] is not key[1]:
            cached = (key, self.engine.config.policy(self.config))
            self._policy = cached
        return cached[1]

    def own_pacer(self) -> Pacer | None:
        budget = self.policy.probe_tokens_per_hour
        if budget != self._pacer_for:
            self.pacer, self._pacer_for = (Pacer(budget) if budget else None), budget
        return self.pacer

    def probe_cost(self) -> tuple[float, float]:
        """(output, input) tokens one probe is expected to cost: the last probe's, where the server
        said, else max_tokens and about four characters a token of the prompt."""
        policy = self.policy
        p = self.probe
        out = p.output_tokens if p is not None and p.output_tokens else policy.probe_max_tokens
        if p is not None and p.input_tokens is not None:
            return float(out), float(p.input_tokens)
        adapter = self.get_adapter()
        chars = sum(len(m["content"]) for m in adapter.probe_messages())
        return float(out), float(max(1, chars // 4))

    def price(self, output_tokens: int, input_tokens: int) -> float:
        policy = self.policy
        return (
            output_tokens * (policy.price_per_1k_output_tokens or 0.0) + input_tokens * (policy.price_per_1k_input_tokens or 0.0)
        ) / 1000.0

    @property
    def admin(self) -> str:
        if not self.config.enabled:
            return "disabled"
        return self.engine.state.admin(self.name)

    def get_adapter(self) -> Adapter:
        if self.adapter is None:
            policy = self.policy
            cls = adapter_class(self.config.provider)
            if self.client is None:
                self.client = self.engine.new_client(tls=uses_tls(self.config.url), timeout_s=policy.timeout_s)
            self.adapter = cls(self.config, self.client, policy.timeout_s, policy.probe_max_tokens, policy=policy)
            self._redact = Redactor(self.adapter.secrets())
        return self.adapter

    # -- what may be sent -------------------------------------------------------------------

    def probe_target(self) -> ProbeChoice:
        """The model a completion probe asks, or why none can be probed."""
        return self.get_adapter().probe_model(self.models, self.loaded)

    def may_probe(self) -> bool:
        """Whether a completion probe may be sent now: active, circuit not open, no Retry-After
        pending, and a model to ask."""
        return (
            self.admin == "active"
            and self.policy.probe == "completion"
            and self.breaker.allows_probe()
            and not self.rate_limited()
            and self.probe_target().model is not None
        )

    def can_complete(self) -> bool:
        return self.admin == "active" and self.policy.probe == "completion" and self.probe_target().model is not None

    def rate_limited(self) -> bool:
        return self.retry_after_until is not None and self.engine.clock() < self.retry_after_until

    def _note_rate_limit(self, status_code: int | None, seconds: float | None) -> None:
        if status_code == 429 and seconds is None:
            seconds = DEFAULT_RETRY_AFTER_S
        if seconds is not None:  # already clamped where it entered (inbound.retry_after_s)
            self.retry_after_until = self.engine.clock() + seconds

    # -- text in ----------------------------------------------------------------------------

    def _keep(self, text: str | None, limit: int = TEXT_KEPT) -> str | None:
        """A backend's text as it may be kept: secrets masked, then cut to length (in that order,
        so a key is never cut into a piece the mask would miss)."""
        if text is None:
            return None
        return clip(self._redact(text), limit)

    def _error(self, message: str) -> None:
        """Keep an error once, at the time it was last seen: a note repeated every poll must not
        push the one real error out of the list."""
        for i, (_, seen) in enumerate(self.recent_errors):
            if seen == message:
                del self.recent_errors[i]
                break
        self.recent_errors.append((self.engine.wall(), message))

    def _take_notes(self) -> None:
        """What the adapter read as absent (NaN, Infinity in JSON), recorded as the reason a figure is missing."""
        if self.adapter is not None:
            for note in self.adapter.take_notes():
                self._error(self._keep(note))

    # -- results in -------------------------------------------------------------------------

    def apply_poll(self, result: PollResult) -> None:
        wall = self.engine.wall()
        health = result.health
        health.error = self._keep(health.error)
        health.version = self._keep(health.version, 64)
        self.health = health
        self.last_health_at = wall
        self._note_rate_limit(health.status_code, health.retry_after_s)
        if health.ok and health.latency_ms is not None:
            self.latency_history.append((wall, health.latency_ms))
        if health.error:
            self._error(health.error)
        if not health.ok and not health.rate_limited:
            self.trouble_at = wall
        if self._poll_counts():
            self.breaker.record(health.ok, health.error or "")
        if result.models is not None:
            self._apply_models(result.models, health)
        self.metrics = result.metrics  # None when not read this time: old gauges are not shown as current
        if result.metrics is not None:
            if result.metrics.requests_waiting is not None:
                self.queue_history.append((wall, result.metrics.requests_waiting))
            for note in result.metrics.ignored:
                self._error(self._keep(note))
        self.metrics_error = self._keep(result.metrics_error)
        if self.metrics_error:
            self._error(self.metrics_error)
        self._take_notes()
        self.update()

    def _apply_models(self, result: ModelsResult, health: HealthResult) -> None:
        if result.models is None:
            # Not read: unknown, never "all served" from an older list.
            self.models, self.models_total, self.loaded = None, None, None
            self.models_error = self._keep(result.error) or "not read"
            if self.models_error != health.error:
                self._error(self.models_error)
            return
        served = result.models
        # Missing models are judged against the whole list, before it is cut to MODELS_KEPT.
        self._missing_read = missing_models(self.config.models, served, self.get_adapter().ollama_names)
        self.models_total = len(served)
        self.models = tuple(self._keep(m, MODEL_ID_KEPT) for m in served[:MODELS_KEPT])
        self.models_error = None
        loaded = result.extra.get("loaded")
        self.loaded = None if loaded is None else tuple(self._keep(m, MODEL_ID_KEPT) for m in loaded[:MODELS_KEPT])
        version = result.extra.get("version")
        self.version = self._keep(version, 64) if isinstance(version, str) else None

    def reconfigure(self, config: BackendConfig) -> None:
        """A reloaded config for this backend: its expected models are judged again against the
        list already read (or called unknown when only part of a long list was kept), not left
        as the old config's verdict until the next poll (which a disabled backend never gets)."""
        self.config = config
        self.adapter = None  # headers, probe model or key env may have changed
        if self.models is not None:
            if self.models_total == len(self.models):
                self._missing_read = missing_models(config.models, self.models, adapter_class(config.provider).ollama_names)
            else:
                self.models, self.models_total = None, None
                self.models_error = "expected models changed; the list is read again at the next poll"

    def _poll_counts(self) -> bool:
        """Polls feed the breaker while closed. Once it opened, only completion probes are trials,
        unless this backend cannot be probed (no model, or draining): then polls are its trials.
        A model still loading is neither a success nor a failure, nor is a 429: a rate limit is
        the backend protecting itself, not failing."""
        if self.health is not None and (self.health.loading or self.health.rate_limited):
            return False
        state = self.breaker.state
        if state == "half_open":
            # No probe goes to a server that does not answer its poll, so that poll is the trial.
            return not self.can_complete() or bool(self.health and self.health.unreachable)
        return state == "closed"

    def apply_probe(self, result: ProbeResult) -> None:
        wall = self.engine.wall()
        self._note_rate_limit(result.status_code, result.retry_after_s)
        phases = result.phases
        summary = ProbeSummary(
            model=self._keep(result.model, MODEL_ID_KEPT),
            ttft_ms=result.ttft_ms,
            tokens_per_s=result.tokens_per_s,
            output_tokens=result.output_tokens,
            tokens_estimated=result.tokens_estimated,
            error=self._keep(result.error),
            at=wall,
            server_ttft_ms=result.server_ttft_ms,
            server_tokens_per_s=result.server_tokens_per_s,
            load_ms=result.load_ms,
            connect_ms=phases.connect_ms,
            tls_ms=phases.tls_ms,
            ttfb_ms=phases.ttfb_ms,
            untimed=result.untimed,
            rate_limited=result.rate_limited,
            input_tokens=result.input_tokens,
            reasoning_only=result.reasoning_only,
            note=self._keep(result.note),
        )
        self.probe = summary
        self.skip_note = None
        self._count(result, wall)
        if result.ok:
            if result.ttft_ms is not None:
                self.ttft_history.append((wall, result.ttft_ms))
            if result.tokens_per_s is not None:
                self.tps_history.append((wall, result.tokens_per_s))
            if result.ttft_ms is not None:
                self.last_ok_probe = summary
        else:
            self._error(summary.error or "probe failed")
            if not result.rate_limited:
                self.trouble_at = wall
        if not result.rate_limited:
            self.breaker.record(result.ok, summary.error or "")
        self._take_notes()
        self.update()

    def _count(self, result: ProbeResult, wall: float) -> None:
        c = self.counters
        changes: dict = {
            "probes": c.probes + 1,
            "probe_failures": c.probe_failures + (not result.ok),
            "probe_tokens": c.probe_tokens + (result.output_tokens or 0),
            "probe_input_tokens": c.probe_input_tokens + (result.input_tokens or 0),
            "probe_cost": c.probe_cost + self.price(result.output_tokens or 0, result.input_tokens or 0),
        }
        if result.ttft_ms is not None and result.ok:
            buckets = list(c.ttft_buckets)
            buckets[bisect.bisect_left(TTFT_BUCKETS_S, result.ttft_ms / 1000.0)] += 1
            changes.update(ttft_buckets=tuple(buckets), ttft_sum_s=c.ttft_sum_s + result.ttft_ms / 1000.0, last_success_at=wall)
        if result.tokens_per_s is not None and result.ok:
            buckets = list(c.tps_buckets)
            buckets[bisect.bisect_left(TPS_BUCKETS, result.tokens_per_s)] += 1
            changes.update(tps_buckets=tuple(buckets), tps_sum=c.tps_sum + result.tokens_per_s)
        self.counters = dataclasses.replace(c, **changes)

    def skipped(self, note: str) -> None:
        """A due probe not sent because the backend is saturated: said, counted, not a failure."""
        self.skip_note = note
        self.counters = dataclasses.replace(self.counters, probes_skipped=self.counters.probes_skipped + 1)
        self.update()

    # -- status -----------------------------------------------------------------------------

    def update(self) -> None:
        """Recompute status, missing models and alerts, and turn changes into events."""
        self.seq += 1
        engine = self.engine
        self.breaker.advance()
        new = min(self.breaker.transition_count - self._transitions_seen, len(self.breaker.transitions))
        for t in self.breaker.transitions[len(self.breaker.transitions) - new :]:
            level = "error" if t.to_state == OPEN else "warning" if t.to_state == "half_open" else "info"
            engine.emit(
                Event(engine.to_wall(t.at), self.name, "breaker", f"circuit {t.from_state} -> {t.to_state}: {t.reason}", level)
            )
        self._transitions_seen = self.breaker.transition_count

        if self.models is not None:  # while unknown, the last judgement stands and nothing is announced
            missing = self._missing_read
            if missing != self.missing:
                added = [m for m in missing if m not in self.missing]
                back = [m for m in self.missing if m not in missing]
                if added:
                    engine.emit(Event(engine.wall(), self.name, "model", f"missing model: {', '.join(added)}", "warning"))
                if back:
                    engine.emit(Event(engine.wall(), self.name, "model", f"model served again: {', '.join(back)}"))
                self.missing = missing

        self._update_alerts()
        mode = self.policy.probe
        choice = self.probe_target() if self.admin == "active" and mode == "completion" else None
        self.probe_note = (
            MODE_NOTES.get(mode) or (choice.why_not if choice is not None else None) or self.skip_note or self.plan.why
        )

        health = self.health
        probe = self.probe
        rate_limited = self.rate_limited()
        models_unknown = None
        if self.models is None and self.models_error and health is not None and health.ok:
            models_unknown = self.models_error
        status, reason = derive_status(
            StatusInputs(
                probed=health is not None or probe is not None,
                circuit=self.breaker.state,
                reachable=None if health is None else (health.ok or health.loading or health.rate_limited),
                loading=bool(health and health.loading),
                health_error=health.error if health else None,
                probe_error=probe.error if probe and not probe.rate_limited else None,
                missing=self.missing if self.models is not None else (),
                models_unknown=models_unknown,
                alerts=self.alerts,
                alerts_unknown=self.alerts_unknown,
                not_probed=choice.why_not if choice is not None and not choice.idle else None,
                error_rate=self.breaker.window.error_rate(),
                degraded_error_rate=engine.config.settings.degraded_error_rate,
                ttft_ms=probe.ttft_ms if probe else None,
                slow_ttft_ms=engine.config.settings.slow_ttft_ms,
                rate_limited=rate_limited,
                not_monitored=MODE_NOTES["off"] if mode == "off" else None,
            )
        )
        # A first healthy reading is not news; every other change of status is.
        if status != self.status and not (self.status == "unknown" and status == "healthy"):
            level = {"down": "error", "degraded": "warning"}.get(status, "info")
            suffix = f": {reason}" if reason else ""
            engine.emit(Event(engine.wall(), self.name, "status", f"{self.status} -> {status}{suffix}", level))
        self.status, self.status_reason = status, reason
        engine.backend_changed(self)

    def _update_alerts(self) -> None:
        """Alert rules over the last scrape; a rule that could not be judged is said so, not passed."""
        engine = self.engine
        rules = self.config.alerts
        unknown = None
        if not rules:
            alerts = ()
        elif self.metrics is None:
            alerts = ()
            if self.health is not None and self.health.ok:
                unknown = f"alert rules not checked: {self.metrics_error or 'no metrics read'}"
        else:
            values = alert_values(self.metrics)
            alerts = tripped_alerts(rules, values)
            absent = [r.metric for r in rules if r.metric not in values]
            if absent:
                unknown = f"alert rules not checked: {', '.join(absent)} not exposed"
        old_rules = {a.split(" (now")[0] for a in self.alerts}
        new_rules = {a.split(" (now")[0] for a in alerts}
        for a in alerts:
            if a.split(" (now")[0] not in old_rules:
                engine.emit(Event(engine.wall(), self.name, "alert", f"alert tripped: {a}", "warning"))
        for rule in old_rules - new_rules:
            engine.emit(Event(engine.wall(), self.name, "alert", f"alert cleared: {rule}"))
        self.alerts, self.alerts_unknown = alerts, unknown

    # -- snapshot out -----------------------------------------------------------------------

    def _counters(self) -> Counters:
        """The counters with the breaker's transitions in, the same object until one of them
        changes: the exporter keeps a backend's counter lines while it is (serve/exporter.py)."""
        if self.counters.breaker_transitions != self.breaker.transition_count:
            self.counters = dataclasses.replace(self.counters, breaker_transitions=self.breaker.transition_count)
        return self.counters

    def snapshot(self) -> BackendSnapshot:
        if self._snapshot is not None and self._snapshot_seq == self.seq:
            return self._snapshot
        engine = self.engine
        policy = self.policy
        probing = self.can_complete()
        out_tokens, in_tokens = self.probe_cost() if probing else (0.0, 0.0)
        interval = self.plan.interval_s
        per_hour = 3600.0 / interval if probing else 0.0
        retry_at = self.breaker.retry_at()
        health = self.health
        error = None
        if health is not None and not health.ok:
            error = health.error
        elif self.probe is not None and self.probe.error:
            error = self.probe.error
        elif self.models_error:
            error = self.models_error
        extra = {}
        if self.loaded is not None:
            extra["loaded_models"] = self.loaded
        if self.metrics_error:
            extra["metrics_error"] = self.metrics_error
        if retry_at is not None:
            extra["circuit_retry_at"] = engine.to_wall(retry_at)
        # While nothing polls it (disabled, or waiting out a Retry-After), what the last poll
        # read is not what the backend does now: not shown as current.
        paused = self.admin == "disabled" or self.rate_limited()
        up = None if health is None or self.admin == "disabled" else bool(health.ok or health.loading or health.rate_limited)
        snap = BackendSnapshot(
            name=self.name,
            provider=self.config.provider,
            url=self.config.url,
            status=self.status,
            status_reason=self.status_reason,
            circuit=self.breaker.state,
            admin=self.admin,
            enabled=self.config.enabled,
            latency_ms=health.latency_ms if health and health.ok and not paused else None,
            models=self.models,
            models_total=self.models_total,
            models_error=self.models_error,
            expected_models=self.config.models,
            missing_models=self.missing if self.models is not None else (),
            alerts=self.alerts,
            alerts_unknown=self.alerts_unknown,
            metrics=None if paused else self.metrics,
            probe=self.probe,
            last_ok_probe=self.last_ok_probe,
            probe_note=self.probe_note,
            error=error,
            error_rate=self.breaker.window.error_rate(),
            last_health_at=self.last_health_at,
            retry_after_at=engine.to_wall(self.retry_after_until) if self.rate_limited() else None,
            probe_tokens_per_hour=per_hour * out_tokens,
            probe_input_tokens_per_hour=per_hour * in_tokens,
            probe_cost_per_hour=per_hour * self.price(out_tokens, in_tokens) if policy.priced else None,
            probe_mode=policy.probe,
            probe_interval_s=interval if probing else None,
            # Figures older than this are shown as old: two missed probe rounds and a timeout.
            stale_after_s=2 * interval + policy.timeout_s,
            counters=self._counters(),
            labels=self.config.labels,
            alert_rules=tuple((rule.describe(), rule.metric) for rule in self.config.alerts),
            up=up,
            trouble_at=self.trouble_at,
            version=(health.version if health else None) or self.version,
            extra=extra,
            ttft_history=tuple(self.ttft_history),
            tps_history=tuple(self.tps_history),
            latency_history=tuple(self.latency_history),
            queue_history=tuple(self.queue_history),
            breaker_history=tuple((engine.to_wall(t.at), t.from_state, t.to_state) for t in self.breaker.transitions),
            recent_errors=tuple(self.recent_errors),
            in_flight=self.busy,
            seq=self.seq,
        )
        self._snapshot, self._snapshot_seq = snap, self.seq
        self.snapshot_circuit = snap.circuit
        return snap
