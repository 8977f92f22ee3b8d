"""Breaker transitions, windows and status rules, driven by a fake clock (no sleeps)."""

from llmtop.config import AlertRule, BreakerSettings
from llmtop.health import CircuitBreaker, OutcomeWindow, StatusInputs, derive_status, missing_models, tripped_alerts


class FakeClock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t

    def advance(self, s):
        self.t += s


def breaker(**kw):
    clock = FakeClock()
    return CircuitBreaker(BreakerSettings(**kw), clock), clock


def test_consecutive_failures_open_then_cooldown_half_open_then_close():
    b, clock = breaker(consecutive_failures=3, consecutive_successes=2, cooldown_s=30)
    assert b.state == "closed"
    assert b.record(False) is None
    b.record(False)
    t = b.record(False, "HTTP 500")
    assert t is not None and t.to_state == "open" and "3 consecutive failures (HTTP 500)" in t.reason
    assert not b.allows_probe()
    clock.advance(29.9)
    assert b.state == "open"
    assert b.record(True) is None and b.state == "open"  # outcomes while open do not move it
    clock.advance(0.1)
    assert b.state == "half_open" and b.allows_probe()
    assert b.transitions[-1].at == 1030.0  # stamped when the cooldown ended, not when read
    b.record(True)
    assert b.state == "half_open"
    t = b.record(True)
    assert t.to_state == "closed" and b.state == "closed"


def test_half_open_failure_reopens_with_growing_cooldown():
    b, clock = breaker(consecutive_failures=1, cooldown_s=10, max_cooldown_s=25)
    b.record(False)
    clock.advance(10)
    assert b.state == "half_open"
    b.record(False)
    assert b.state == "open" and b.cooldown_s == 20
    clock.advance(19)
    assert b.state == "open"
    clock.advance(1)
    b.record(False)
    assert b.cooldown_s == 25  # capped
    clock.advance(25)
    b.record(True)
    b.record(True)
    assert b.state == "closed" and b.cooldown_s == 10  # reset after recovery


def test_error_rate_opens_only_with_min_requests():
    b, clock = breaker(consecutive_failures=100, min_requests=4, error_rate=0.5, window_s=60)
    b.record(False)
    b.record(True)
    b.record(False)
    assert b.state == "closed"  # 3 outcomes < min_requests
    t = b.record(True)
    assert b.state == "closed"  # a success never opens it
    t = b.record(False)
    assert t.to_state == "open" and "error rate 60% over 5 requests" in t.reason


def test_window_expires_old_outcomes():
    clock = FakeClock()
    w = OutcomeWindow(60, clock)
    w.record(False)
    clock.advance(30)
    w.record(True)
    assert w.error_rate() == 0.5
    clock.advance(31)
    assert w.error_rate() == 0.0 and len(w) == 1
    clock.advance(60)
    assert w.error_rate() is None


def test_missing_models_exact_with_ollama_latest():
    assert missing_models(["llama3.2"], ["llama3.2:latest"], ollama=True) == ()
    assert missing_models(["llama3.2:latest"], ["llama3.2"], ollama=True) == ()
    assert missing_models(["llama3.2"], ["llama3.2:latest"], ollama=False) == ("llama3.2",)
    # No prefix matching: a 70B is not an 8B.
    assert missing_models(["meta-llama/Llama-3.1-8B"], ["meta-llama/Llama-3.1-8B-Instruct"]) == ("meta-llama/Llama-3.1-8B",)
    assert missing_models(["qwen2.5"], ["qwen2.5:7b"], ollama=True) == ("qwen2.5",)


def test_alert_rules():
    rules = [AlertRule("vllm:num_requests_waiting", above=10), AlertRule("kv_cache_usage", below=0.01), AlertRule("absent", above=1)]
    assert tripped_alerts(rules, {"vllm:num_requests_waiting": 12, "kv_cache_usage": 0.5}) == (
        "vllm:num_requests_waiting > 10 (now 12)",
    )
    assert tripped_alerts(rules, {"vllm:num_requests_waiting": 10, "kv_cache_usage": 0.0}) == ("kv_cache_usage < 0.01 (now 0)",)


def inputs(**kw):
    base = dict(
        probed=True, circuit="closed", reachable=True, loading=False, health_error=None, probe_error=None,
        missing=(), alerts=(), error_rate=0.0, degraded_error_rate=0.2, ttft_ms=100.0, slow_ttft_ms=5000.0,
        rate_limited=False,
    )
    base.update(kw)
    return StatusInputs(**base)


def test_status_rules():
    assert derive_status(inputs(probed=False))[0] == "unknown"
    assert derive_status(inputs()) == ("healthy", None)
    assert derive_status(inputs(circuit="open", health_error="x: timeout")) == ("down", "circuit open: x: timeout")
    assert derive_status(inputs(reachable=False, health_error="refused"))[0] == "down"
    assert derive_status(inputs(reachable=False, loading=True))[0] == "loading"
    assert derive_status(inputs(missing=("m",))) == ("degraded", "missing m")
    assert derive_status(inputs(ttft_ms=6000.0)) == ("degraded", "slow TTFT 6000 ms")
    assert derive_status(inputs(error_rate=0.25))[0] == "degraded"
    assert derive_status(inputs(rate_limited=True))[1] == "rate limited (429)"
    assert derive_status(inputs(circuit="half_open"))[0] == "degraded"


async def test_a_snapshot_shows_a_breaker_that_time_alone_moved_to_half_open(tmp_path):
    """The cooldown passing is no event of the backend's own: the next snapshot must say half-open
    without waiting for the backend's next poll (a readiness answer depends on it)."""
    from llmtop.config import BackendConfig, BreakerSettings, Config
    from llmtop.engine import Engine
    from llmtop.probe import HealthResult, ModelsResult
    from llmtop.providers.base import PollResult
    from llmtop.state import StateStore

    now = [100.0]
    config = Config(breaker=BreakerSettings(consecutive_failures=1, cooldown_s=30), backends=(BackendConfig("b", "vllm", "http://h:1", ("m",)),))
    engine = Engine(config, StateStore(tmp_path / "s.json"), clock=lambda: now[0], wall=lambda: now[0])
    failed = PollResult(HealthResult(ok=False, error="refused", unreachable=True), ModelsResult(None, error="refused"), None)
    engine.trackers["b"].apply_poll(failed)
    assert engine.snapshot().backends[0].circuit == "open"
    now[0] += 31
    assert engine.snapshot().backends[0].circuit == "half_open"
