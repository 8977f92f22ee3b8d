"""The engine against the real simulator over 127.0.0.1: every protocol, every fault, the breaker and admin states."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import pytest

from llmtop.config import BackendConfig, BreakerSettings, Config, Settings, AlertRule
from llmtop.engine import Engine
from llmtop.simulator import SimBackend, Simulator
from llmtop.state import StateStore
from served import WAY_IN_AND_OUT_MS, served_mean_tokens_per_s, served_rates, served_ttft_ms, true_rate

PROVIDERS = ["vllm", "sglang", "tgi", "llamacpp", "lmstudio", "litellm", "openai", "ollama", "anthropic"]
COMPLETION_PATH = {"ollama": "/api/chat", "anthropic": "/v1/messages"}


def make_config(sim: Simulator, backends, expected=None, alerts=None, key_env=None, **settings) -> Config:
    s = dict(timeout_s=2.0, probe_max_tokens=8)
    s.update({k: v for k, v in settings.items() if k in Settings.__dataclass_fields__})
    b = {k: v for k, v in settings.items() if k in BreakerSettings.__dataclass_fields__}
    return Config(
        settings=Settings(**s),
        breaker=BreakerSettings(**b),
        backends=tuple(
            BackendConfig(
                name=sb.name,
                provider=sb.provider,
                url=sim.url(sb.name),
                models=tuple((expected or {}).get(sb.name, sb.models)),
                alerts=tuple((alerts or {}).get(sb.name, ())),
                api_key_env=(key_env or {}).get(sb.name),
            )
            for sb in backends
        ),
    )


@pytest.fixture
def state(tmp_path):
    return StateStore(tmp_path / "state.json")


async def eventually(condition, what: str, timeout: float = 30) -> None:
    """Wait until condition() holds; the timeout is only the outer bound for a broken build."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        await asyncio.sleep(0.01)


async def one_round(sim, backends, state, **kw):
    async with Engine(make_config(sim, backends, **kw), state) as engine:
        await engine.run_round()
        return engine.snapshot()


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_every_protocol_healthy_with_true_numbers(provider, state):
    model = "llama3.2" if provider == "ollama" else "test-model"
    sb = SimBackend(f"b-{provider}", provider=provider, models=[model], ttft_ms=60, gap_ms=30)
    async with Simulator([sb]) as sim:
        async with Engine(make_config(sim, [sb]), state) as engine:
            # A loaded core may read a probe late, and then it is honestly untimed (and retried):
            # the true numbers asked for here come from the first probe that was timed.
            for _ in range(4):
                await engine.run_round()
                snap = engine.snapshot()
                if not snap.backends[0].probe.untimed:
                    break
    b = snap.backends[0]
    assert b.status == "healthy", (b.status_reason, b.error)
    assert b.circuit == "closed" and b.missing_models == () and b.error is None
    assert b.models in ((model,), (f"{model}:latest",))
    p = b.probe
    assert p.error is None and p.output_tokens == 8 and not p.tokens_estimated
    # True to what the server did (served.py), which on a loaded core is later than its 60/15 ms.
    # A TTFT stamped on a role chunk would be short; one stamped on a later token makes the
    # decode rate wrong, and a rate counting n tokens or the TTFT would be off by 14% or more.
    ttft = served_ttft_ms(sb, last=True)
    assert ttft - 1 <= p.ttft_ms < ttft + WAY_IN_AND_OUT_MS, (p.ttft_ms, ttft)
    assert true_rate(p.tokens_per_s, sb), (p.tokens_per_s, served_rates(sb))
    assert sb.requests[COMPLETION_PATH.get(provider, "/v1/chat/completions")] == b.counters.probes  # none unaccounted for
    if provider in ("vllm", "sglang", "llamacpp", "tgi"):
        assert b.metrics.requests_running is not None and b.metrics.requests_waiting is not None
    if provider in ("vllm", "sglang", "llamacpp"):
        assert b.metrics.kv_cache_usage == pytest.approx(0.3)
    if provider == "litellm":
        assert b.metrics.requests_running is not None  # found at /metrics/ after the redirect
    if provider in ("ollama", "llamacpp"):
        assert p.server_tokens_per_s is not None  # the server's own figure beside ours


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_a_last_token_read_late_with_the_end_marker_leaves_the_decode_rate_true(provider, state):
    # The server stalls 60 ms after its last token before the end marker, and so does llmtop
    # (one process): the last token is read with the end marker and carries its later stamp.
    # Ran to that stamp, the rate would be 7 / (7 x 30 + 60) ms = 26 tok/s, 22% under the truth.
    model = "llama3.2" if provider == "ollama" else "test-model"
    sb = SimBackend(f"e-{provider}", provider=provider, models=[model], ttft_ms=20, gap_ms=30, fault="stalled_end", fault_arg=60)
    async with Simulator([sb]) as sim:
        async with Engine(make_config(sim, [sb]), state) as engine:
            for _ in range(4):
                await engine.run_round()
                p = engine.snapshot().backends[0].probe
                if not p.untimed:
                    break
    assert p.error is None and p.output_tokens == 8 and p.tokens_per_s is not None, p
    assert true_rate(p.tokens_per_s, sb), (p.tokens_per_s, served_rates(sb))


async def test_estimated_tokens_when_server_sends_no_usage(state):
    sb = SimBackend("nousage", usage=False, ttft_ms=20, gap_ms=10)
    async with Simulator([sb]) as sim:
        b = (await one_round(sim, [sb], state)).backends[0]
    assert b.probe.tokens_estimated and b.probe.output_tokens == 8
    assert true_rate(b.probe.tokens_per_s, sb), (b.probe.tokens_per_s, served_rates(sb))


async def test_vllm_server_ttft_histogram_reaches_metrics(state):
    sb = SimBackend("v", ttft_ms=30, gap_ms=100, output_tokens=2)  # read one by one on a loaded core: no untimed retry
    async with Simulator([sb]) as sim:
        async with Engine(make_config(sim, [sb]), state) as engine:
            await engine.run_round()
            await engine.run_round(probe=False)  # the next scrape sees the probe's TTFT
            b = engine.snapshot().backends[0]
    # The server's own figure, exactly: the mean of its histogram since the scrape before the probe
    # (which saw none). Of two generations when a probe read too late to time was retried.
    served = sb.ttft_histogram.sum / sb.ttft_histogram.count * 1000
    assert sb.ttft_histogram.count in (1, 2) and b.metrics.server_ttft_ms == pytest.approx(served, rel=1e-6)


# -- faults: each is shown as what it is, and never delays the others ------------------------------


@pytest.mark.parametrize(
    "fault, arg, status, words",
    [
        ("5xx", None, "down", "HTTP 500"),
        ("hang", None, "down", "timeout"),
        ("reset", None, "down", "reset"),
        ("slow_headers", 5, "down", "timeout"),
        ("bad_json", None, "down", "bad JSON"),
    ],
)
async def test_fault_is_reported_and_others_unaffected(fault, arg, status, words, state):
    bad = SimBackend("bad", provider="openai", fault=fault, fault_arg=arg)
    good = SimBackend("good", ttft_ms=50, gap_ms=100, output_tokens=2)  # its first token read alone even on a loaded core
    async with Simulator([bad, good]) as sim:
        start = time.perf_counter()
        snap = await one_round(sim, [bad, good], state, timeout_s=0.6)
        elapsed = time.perf_counter() - start
    b, g = snap.backends
    assert b.status == status and words in (b.error or ""), b.error
    assert g.status == "healthy"
    ttft = served_ttft_ms(good)
    assert ttft - 1 <= g.probe.ttft_ms < ttft + WAY_IN_AND_OUT_MS, (g.probe.ttft_ms, ttft)
    assert ttft < 50 + 400  # a hang next door that held the good one up would add 600 ms; a loaded core, tens
    assert elapsed < 0.6 + 0.5  # bounded by timeout_s, not by the sum of requests


async def test_bad_json_in_models_of_vllm_degrades_with_clear_error(state):
    sb = SimBackend("v", fault="bad_json")
    async with Simulator([sb]) as sim:
        b = (await one_round(sim, [sb], state)).backends[0]
    assert "bad JSON" in (b.error or "")
    assert b.status in ("degraded", "down")


async def test_truncated_stream_is_a_failed_probe_with_partial_ttft(state):
    sb = SimBackend("t", fault="truncated", fault_arg=2, ttft_ms=30)
    async with Simulator([sb]) as sim:
        b = (await one_round(sim, [sb], state)).backends[0]
    assert b.probe.error and "truncated" in b.probe.error
    assert b.status == "degraded"
    if b.probe.ttft_ms is None:  # its tokens shared one read on a loaded core: a failed probe with no figure, never a wrong one
        assert b.probe.tokens_per_s is None
        return
    ttft = served_ttft_ms(sb)
    assert ttft - 1 <= b.probe.ttft_ms < ttft + WAY_IN_AND_OUT_MS, (b.probe.ttft_ms, ttft)


async def test_huge_body_is_refused_not_buffered(state):
    sb = SimBackend("huge", provider="lmstudio", fault="huge_body", fault_arg=64)
    async with Simulator([sb]) as sim:
        b = (await one_round(sim, [sb], state, timeout_s=5)).backends[0]
    assert b.status == "down" and "over 8 MiB" in b.error


async def test_llamacpp_loading_is_loading_not_down(state):
    sb = SimBackend("l", provider="llamacpp", fault="loading")
    async with Simulator([sb]) as sim:
        async with Engine(make_config(sim, [sb], consecutive_failures=1), state) as engine:
            await engine.run_round()
            await engine.run_round()
            b = engine.snapshot().backends[0]
            assert b.status == "loading" and b.circuit == "closed" and b.error_rate is None
            assert sb.requests["/v1/chat/completions"] == 0  # a loading server is not sent probes
            sb.fault = None
            await engine.run_round()
            assert engine.snapshot().backends[0].status == "healthy"


async def test_sglang_503_at_start_is_loading(state):
    sb = SimBackend("s", provider="sglang", fault="loading")
    async with Simulator([sb]) as sim:
        b = (await one_round(sim, [sb], state)).backends[0]
    assert b.status == "loading"


async def test_429_honours_retry_after(state):
    sb = SimBackend("cloud", provider="openai", fault="429", fault_arg=30)
    async with Simulator([sb]) as sim:
        async with Engine(make_config(sim, [sb]), state) as engine:
            await engine.run_round()
            b = engine.snapshot().backends[0]
            assert b.probe.error and "429" in b.probe.error and "retry after 30s" in b.probe.error
            assert b.retry_after_at is not None and b.retry_after_at - time.time() == pytest.approx(30, abs=2)
            assert b.status == "degraded" and "rate limited" in b.status_reason
            sent = sum(sb.requests.values())
            await engine.run_round()
            await engine.run_round()
            assert sum(sb.requests.values()) == sent  # nothing until Retry-After has passed


async def test_flapping_backend_goes_down_and_comes_back(state):
    # The simulator's flapping follows a clock this test steps (sleeping through the phases made
    # the rounds land wherever a loaded machine let them).
    sb = SimBackend("flap", fault="flapping", fault_arg=0.4)
    now = [0.0]
    async with Simulator([sb], clock=lambda: now[0]) as sim:
        async with Engine(make_config(sim, [sb], consecutive_failures=10), state) as engine:
            seen = []
            for at in (0.0, 0.2, 0.4, 0.6, 0.8):
                now[0] = at
                await engine.run_round(probe=False)
                seen.append(engine.snapshot().backends[0].status)
            reason = engine.snapshot().backends[0].status_reason
    # Back up, and still marked by the two failures in its window.
    assert seen == ["healthy", "healthy", "down", "down", "degraded"] and "error rate" in reason, reason


async def test_connection_refused(state):
    config = Config(
        settings=Settings(timeout_s=1),
        backends=(BackendConfig(name="gone", provider="vllm", url="http://127.0.0.1:9"),),
    )
    async with Engine(config, state) as engine:
        await engine.run_round()
        b = engine.snapshot().backends[0]
    assert b.status == "down" and "cannot connect" in b.error and b.probe is None


# -- the breaker, end to end ----------------------------------------------------------------------


async def test_breaker_opens_stops_probes_then_recovers_through_half_open(state):
    sb = SimBackend("flaky", fault="5xx")
    now = [1000.0]  # the breaker's clock: the cooldown passes when the test says, not after a sleep
    async with Simulator([sb]) as sim:
        config = make_config(sim, [sb], consecutive_failures=2, consecutive_successes=2, cooldown_s=0.5)
        async with Engine(config, state, clock=lambda: now[0]) as engine:
            await engine.run_round()  # health fails -> no probe this round
            await engine.run_round()
            b = engine.snapshot().backends[0]
            assert b.circuit == "open" and b.status == "down"
            probes = sb.requests["/v1/chat/completions"]
            await engine.run_round()
            assert sb.requests["/v1/chat/completions"] == probes  # no probes while open
            sb.fault = None
            now[0] += 0.25
            assert engine.trackers["flaky"].breaker.state == "open"  # half the cooldown
            now[0] += 0.3
            assert engine.snapshot().backends[0].circuit == "half_open"
            await engine.run_round()  # trial 1 (probe) succeeds
            await engine.run_round()  # trial 2
            b = engine.snapshot().backends[0]
            assert b.circuit == "closed" and b.status == "healthy"
            kinds = [(f, t) for _, f, t in b.breaker_history]
            assert kinds == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]
            messages = [e.message for e in engine.events if e.kind == "breaker"]
            assert any("closed -> open" in m for m in messages)


# -- models, alerts, admin ------------------------------------------------------------------------


async def test_missing_model_named_and_ollama_latest_understood(state):
    v = SimBackend("v", models=["m1"])
    o = SimBackend("o", provider="ollama", models=["llama3.2"])
    async with Simulator([v, o]) as sim:
        snap = await one_round(sim, [v, o], state, expected={"v": ["m1", "m-70b"], "o": ["llama3.2", "llama3.2:latest"]})
    vb, ob = snap.backends
    assert vb.missing_models == ("m-70b",) and vb.status == "degraded" and "missing m-70b" in vb.status_reason
    assert ob.missing_models == () and ob.status == "healthy"


async def test_metric_alert_rule_trips(state):
    sb = SimBackend("v", waiting=25)
    async with Simulator([sb]) as sim:
        snap = await one_round(
            sim, [sb], state, alerts={"v": [AlertRule("vllm:num_requests_waiting", above=10), AlertRule("kv_cache_usage", above=0.9)]}
        )
    b = snap.backends[0]
    assert b.alerts == ("vllm:num_requests_waiting > 10 (now 25)",)
    assert b.status == "degraded"


async def test_draining_gets_polls_but_no_probes_disabled_gets_nothing(tmp_path):
    state = StateStore(tmp_path / "s.json")
    state.set_admin("drained", "draining")
    state.set_admin("off", "disabled")
    d, off = SimBackend("drained"), SimBackend("off")
    async with Simulator([d, off]) as sim:
        snap = await one_round(sim, [d, off], state)
    assert d.requests["/health"] == 1 and d.requests["/v1/chat/completions"] == 0
    assert sum(off.requests.values()) == 0
    assert [b.admin for b in snap.backends] == ["draining", "disabled"]
    assert StateStore(tmp_path / "s.json").admin("drained") == "draining"  # survives a restart


async def test_api_key_sent_and_never_shown(state, monkeypatch):
    secret = "sk-test-abcdef123456"
    monkeypatch.setenv("SIM_KEY", secret)
    ok = SimBackend("ok", provider="openai", api_key=secret)
    wrong = SimBackend("wrong", provider="litellm", api_key="another-key")
    anth = SimBackend("anth", provider="anthropic", api_key=secret)
    async with Simulator([ok, wrong, anth]) as sim:
        snap = await one_round(sim, [ok, wrong, anth], state, key_env={"ok": "SIM_KEY", "wrong": "SIM_KEY", "anth": "SIM_KEY"})
    by = {b.name: b for b in snap.backends}
    assert by["ok"].status == "healthy" and by["anth"].status == "healthy"
    assert by["wrong"].status == "degraded"  # up, but it refuses our key
    assert "HTTP 401" in by["wrong"].probe.error or "HTTP 500" in by["wrong"].probe.error
    assert "API key" in by["wrong"].status_reason
    dumped = json.dumps(snap.to_json()) + repr(snap)
    assert secret not in dumped


async def test_reload_keeps_history_of_unchanged_backends(state):
    a, b = SimBackend("a"), SimBackend("b")
    async with Simulator([a, b]) as sim:
        async with Engine(make_config(sim, [a]), state) as engine:
            await engine.run_round()
            tracker = engine.trackers["a"]
            engine.reload(make_config(sim, [a, b]))
            assert engine.trackers["a"] is tracker and len(tracker.ttft_history) == 1
            await engine.run_round()
            assert [x.status for x in engine.snapshot().backends] == ["healthy", "healthy"]


async def test_live_loop_polls_probes_and_force_probe(state):
    sb = SimBackend("live", ttft_ms=10, gap_ms=20)  # tokens far enough apart to be read one by one (else: untimed, retried)
    async with Simulator([sb]) as sim:
        config = make_config(sim, [sb], health_interval_s=0.2, probe_interval_s=60)
        async with Engine(config, state) as engine:
            engine.start()
            # The second poll comes after the first round (poll, then probe) has finished.
            await eventually(lambda: sb.requests["/health"] >= 2, "two polls")
            # The first round probes; the next probe waits its 60 s. (A probe read too late to time,
            # its tokens merged on a loaded core, is tried once more at the next poll, and then
            # the interval holds whatever came of it.)
            tracker = engine.trackers["live"]
            await eventually(lambda: not tracker.busy and tracker.next_probe_at - engine.clock() > 50, "the next probe planned 60 s out")
            polls = sb.requests["/health"]
            await eventually(lambda: sb.requests["/health"] >= polls + 3, "three more polls")
            probes = sb.requests["/v1/chat/completions"]
            assert probes in (1, 2)  # not one per poll
            engine.force_probe(["live"])
            await eventually(lambda: sb.requests["/v1/chat/completions"] == probes + 1, "the forced probe")
            await engine.stop()


async def test_a_probe_asked_for_while_one_is_in_flight_still_goes_out(state):
    # `p` pressed while a probe is on its way (the first one, or an untimed one's retry) asks for a
    # probe from now: the one in flight started before. Its end used to plan the next probe an
    # interval out over the request, and the press was lost (seen in test_tui on a loaded machine).
    sb = SimBackend("live", ttft_ms=1, gap_ms=1)
    sb.hold = asyncio.Event()
    async with Simulator([sb]) as sim:
        config = make_config(sim, [sb], health_interval_s=0.2, probe_interval_s=3600)
        async with Engine(config, state) as engine:
            engine.start()
            await eventually(lambda: sb.requests["/v1/chat/completions"] == 1, "the first probe on its way")
            engine.force_probe(["live"])
            sb.hold.set()
            await eventually(lambda: sb.requests["/v1/chat/completions"] == 2, "the probe asked for")
            await engine.stop()


# -- regressions found in review ------------------------------------------------------------------


async def test_half_open_backend_that_stays_unreachable_reopens_with_a_longer_cooldown(state):
    sb = SimBackend("dead", fault="reset")
    now = [1000.0]  # the breaker's clock, stepped past the cooldown instead of sleeping through it
    async with Simulator([sb]) as sim:
        config = make_config(sim, [sb], consecutive_failures=1, cooldown_s=0.3)
        async with Engine(config, state, clock=lambda: now[0]) as engine:
            await engine.run_round()
            tracker = engine.trackers["dead"]
            assert tracker.breaker.state == "open"
            now[0] += 0.35
            assert tracker.breaker.state == "half_open"
            await engine.run_round()  # the poll is the trial: no probe goes to a server that resets
            assert tracker.breaker.state == "open" and tracker.breaker.cooldown_s == pytest.approx(0.6)
            assert sb.requests["/v1/chat/completions"] == 0


def test_breaker_events_keep_coming_after_fifty_transitions(tmp_path):
    from llmtop.health import CircuitBreaker

    clock = [0.0]
    config = Config(breaker=BreakerSettings(consecutive_failures=1, cooldown_s=1, max_cooldown_s=1),
                    backends=(BackendConfig("b", "vllm", "http://127.0.0.1:9"),))
    engine = Engine(config, StateStore(tmp_path / "s.json"), clock=lambda: clock[0], wall=lambda: clock[0])
    tracker = engine.trackers["b"]
    for _ in range(40):  # closed -> open -> half_open -> open ... 80 transitions
        tracker.breaker.record(False)
        tracker.update()
        clock[0] += 1
        tracker.update()
    events = [e for e in engine.events if e.kind == "breaker"]
    assert tracker.breaker.transition_count == 80 and len(events) == 80
    assert isinstance(tracker.breaker, CircuitBreaker)


async def test_reload_applies_a_new_timeout_to_requests(state):
    sb = SimBackend("slow", fault="slow_headers", fault_arg=1.0)
    async with Simulator([sb]) as sim:
        async with Engine(make_config(sim, [sb], timeout_s=0.4), state) as engine:
            await engine.run_round(probe=False)
            assert "within 0.4s" in engine.snapshot().backends[0].error
            engine.reload(make_config(sim, [sb], timeout_s=3))
            await engine.run_round(probe=False)
            b = engine.snapshot().backends[0]
            assert b.error is None and b.latency_ms > 900  # waited for the slow answer this time


async def test_a_backends_probe_goes_out_without_waiting_for_another_backends_hung_poll(state):
    # A round polls and probes each backend on its own: a server that never answers its poll
    # holds its own probe (there is nothing to probe), never the fleet's, for up to timeout_s.
    hung, ok = SimBackend("hung", fault="hang"), SimBackend("ok", ttft_ms=10, gap_ms=20)
    async with Simulator([hung, ok]) as sim:
        async with Engine(make_config(sim, [hung, ok], timeout_s=60), state) as engine:
            round_ = asyncio.create_task(engine.run_round())
            await eventually(lambda: engine.trackers["ok"].probe is not None, "the answering backend's probe")
            assert engine.trackers["hung"].health is None  # its poll is still waiting
            assert engine.trackers["ok"].probe.error is None
            round_.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await round_


async def test_a_round_sends_a_probe_read_too_late_to_time_once_more_and_no_more(state):
    # Behind slow headers every token arrives in one burst: the probe cannot be timed, however
    # punctual this process is. A check sends it again at once (the first might have been read
    # late by a busy loop), then reports it untimed, with why, rather than spend a third.
    sb = SimBackend("burst", fault="slow_headers", fault_arg=0.05)
    async with Simulator([sb]) as sim:
        async with Engine(make_config(sim, [sb], timeout_s=10), state) as engine:
            await engine.run_round()
            b = engine.snapshot().backends[0]
    assert sb.requests["/v1/chat/completions"] == 2
    assert b.probe.untimed and b.probe.untimed.startswith("not timed: ")
    assert b.probe.ttft_ms is None and b.probe.tokens_per_s is None


def test_two_processes_draining_at_once_lose_nothing(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "state.json"
    code = "import sys; from llmtop.state import StateStore; StateStore(sys.argv[1]).set_admin(sys.argv[2], 'draining')"
    for round_ in range(5):
        procs = [subprocess.Popen([sys.executable, "-c", code, str(path), f"b{round_}-{i}"]) for i in range(6)]
        assert all(p.wait(timeout=30) == 0 for p in procs)
    assert len(StateStore(path)._admin) == 30


@pytest.mark.parametrize("provider", ["tgi", "vllm"])
async def test_server_side_decode_rate_beside_the_probes(provider, state):
    sb = SimBackend("s", provider=provider, gap_ms=20)
    async with Simulator([sb]) as sim:
        async with Engine(make_config(sim, [sb]), state) as engine:
            await engine.run_round()
            await engine.run_round(probe=False)  # the next scrape sees the probe's tokens
            b = engine.snapshot().backends[0]
    # The server's figure is what it did (its own stamps), so it matches exactly; ours, within 10%.
    # Over every generation since the first scrape: an untimed probe's retry makes a second.
    served = served_mean_tokens_per_s(sb)
    assert b.metrics.server_tokens_per_s == pytest.approx(served, rel=1e-6)
    assert true_rate(b.probe.tokens_per_s, sb), (b.probe.tokens_per_s, served_rates(sb))
    assert b.to_json(b.last_health_at)["metrics"]["server_tokens_per_s"] == pytest.approx(served, rel=0.01)
