"""Probe policy per backend and the token budget, against the simulator over 127.0.0.1, on a fake clock (no sleeps)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from llmtop.config import (
    BackendConfig,
    BreakerSettings,
    BudgetSettings,
    Config,
    ConfigError,
    EnvValue,
    PolicyKeys,
    Settings,
    SkipRule,
    load_config,
    loads_config,
)
from llmtop.engine import Engine
from llmtop.simulator import SimBackend, Simulator
from llmtop.state import StateStore

PROMPT_TOKENS = 10  # the simulator's count for llmtop's prompt: 40 characters, four a token


class FakeClock:
    """Monotonic and wall clocks the test steps; everything the engine schedules follows it."""

    def __init__(self) -> None:
        self.t = 1000.0

    def mono(self) -> float:
        return self.t

    def wall(self) -> float:
        return 1_750_000_000.0 + self.t


def config_for(sim: Simulator, backends, policies=None, budget=None, **settings) -> Config:
    s = dict(timeout_s=5.0, probe_max_tokens=8)
    s.update(settings)
    return Config(
        settings=Settings(**s),
        breaker=BreakerSettings(),
        backends=tuple(
            BackendConfig(
                name=sb.name,
                provider=sb.provider,
                url=sim.url(sb.name),
                models=tuple(sb.models),
                policy=(policies or {}).get(sb.name, PolicyKeys()),
            )
            for sb in backends
        ),
        budget=BudgetSettings(budget),
    )


async def run_for(engine: Engine, clock: FakeClock, seconds: float, step: float, each=None) -> None:
    """Step the fake clock and run what is due at each step, as the live loop would."""
    end = clock.t + seconds
    while clock.t < end:
        await engine.run_due()
        if each is not None:
            each()
        clock.t += step


@pytest.fixture
def state(tmp_path):
    return StateStore(tmp_path / "state.json")


# -- config: each key, one line ----------------------------------------------------------------

BACKEND = '[[backend]]\nname = "a"\nprovider = "vllm"\nurl = "http://x:1"\n'


@pytest.mark.parametrize(
    "snippet, expected",
    [
        ('[settings]\nprobe = "helth"', "settings.probe: 'helth' is not a probe mode; did you mean 'health'? choose one of completion, health, off"),
        (BACKEND + 'probe = "none"', "backend 'a'.probe: 'none' is not a probe mode"),
        (BACKEND + "probe_interval_s = 0.5", "backend 'a'.probe_interval_s: must be at least 1, got 0.5; write it like probe_interval_s = 1"),
        (BACKEND + 'probe_max_tokens = "8"', "backend 'a'.probe_max_tokens: expected an integer, got str '8'; write it without quotes"),
        (BACKEND + "health_interval_s = 0", "backend 'a'.health_interval_s: must be at least 0.1"),
        (BACKEND + "timeout_s = 601", "backend 'a'.timeout_s: must be at most 600"),
        (BACKEND + 'headers = { Authorization = "Bearer sk-live-123456" }', "backend 'a'.headers.Authorization: looks like a credential; put it in an environment variable"),
        (BACKEND + 'headers = { "X-Org" = { env = "sk-live-1234567890abcdefghij" } }', "backend 'a'.headers.X-Org.env: must be the NAME of an environment variable"),
        (BACKEND + 'headers = { "X-Org" = { value = "ORG" } }', 'backend \'a\'.headers.X-Org: write a value from the environment as { env = "NAME" }'),
        (BACKEND + 'headers = { "X Org" = "1" }', "backend 'a'.headers.X Org: is not an HTTP header name"),
        (BACKEND + 'headers = { Host = "evil" }', "backend 'a'.headers.Host: is a header HTTP or llmtop sets itself"),
        (BACKEND + 'headers = { "X-Org" = 5 }', "backend 'a'.headers.X-Org: expected a string or { env = \"NAME\" }, got int"),
        (BACKEND + 'health_path = "healthz"', "backend 'a'.health_path: must be a path on the backend's URL, starting with /"),
        (BACKEND + "health_status = 204", "backend 'a'.health_status: applies to a health_path of your own; set health_path too"),
        (BACKEND + 'health_path = "/h"\nhealth_status = 42', "backend 'a'.health_status: must be at least 100"),
        (BACKEND + 'probe_prompt = "  "', "backend 'a'.probe_prompt: must not be empty"),
        (BACKEND + 'probe_prompt = "hi"\nprobe_messages = [{ role = "user", content = "hi" }]', "set either probe_prompt or probe_messages, not both"),
        (BACKEND + 'probe_messages = [{ role = "system", content = "be brief" }]', "backend 'a'.probe_messages[0].role: the last message must be the user's"),
        (BACKEND + 'probe_messages = [{ role = "robot", content = "x" }]', "backend 'a'.probe_messages[0].role: 'robot' is not one of system, user, assistant"),
        (BACKEND + 'probe_messages = [{ role = "user" }]', "backend 'a'.probe_messages[0]: missing required key 'content'"),
        (BACKEND + 'skip_probe_when = { metric = "requests_waiting" }', "backend 'a'.skip_probe_when: missing required key 'above'"),
        (BACKEND + 'skip_probe_when = { metric = "q", abov = 3 }', "backend 'a'.skip_probe_when.abov: unknown key (did you mean 'above'?)"),
        (BACKEND + "probe_tokens_per_hour = 0", "backend 'a'.probe_tokens_per_hour: must be at least 1"),
        (BACKEND + "price_per_1k_output_tokens = -1", "backend 'a'.price_per_1k_output_tokens: must be at least 0"),
        ("[budget]\ntokens_per_hour = 0", "budget.tokens_per_hour: must be at least 1"),
        ("[budget]\ntokens_per_houre = 10", "budget.tokens_per_houre: unknown key (did you mean 'tokens_per_hour'?)"),
        ('[settings]\nprob = "off"', "settings.prob: unknown key (did you mean 'probe'?)"),
    ],
)
def test_each_policy_key_fails_in_one_line_with_file_key_and_fix(tmp_path, snippet, expected):
    path = tmp_path / "config.toml"
    path.write_text(snippet)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and expected in message and "\n" not in message
    assert "sk-live" not in message  # a pasted secret is never echoed back


def test_a_backend_key_wins_over_settings_and_headers_merge_by_name():
    config = loads_config(
        '[settings]\nprobe = "health"\nprobe_interval_s = 30\nheaders = { "X-Team" = "ml", "X-Org" = "a" }\n'
        'skip_probe_when = { metric = "requests_waiting", above = 20 }\n[budget]\ntokens_per_hour = 5000\n'
        + BACKEND
        + 'probe = "completion"\nprobe_interval_s = 120\nheaders = { "X-Org" = { env = "ORG_ID" } }\n'
        '[[backend]]\nname = "b"\nprovider = "vllm"\nurl = "http://y:1"\n'
    )
    a, b = (config.policy(x) for x in config.backends)
    assert (a.probe, a.probe_interval_s, b.probe, b.probe_interval_s) == ("completion", 120.0, "health", 30.0)
    assert dict(a.headers) == {"X-Team": "ml", "X-Org": EnvValue("ORG_ID")} and dict(b.headers) == {"X-Team": "ml", "X-Org": "a"}
    assert a.skip_probe_when == b.skip_probe_when == SkipRule("requests_waiting", 20.0)
    assert config.budget.tokens_per_hour == 5000.0


def test_the_sample_config_sets_every_policy_key():
    from pathlib import Path

    from llmtop.config import _POLICY_KEYS

    text = (Path(__file__).parent.parent / "sample-config.toml").read_text()
    for key in [*_POLICY_KEYS, "tokens_per_hour"]:
        assert f"\n# {key} = " in text or f"\n{key} = " in text, f"sample-config.toml does not show {key}"


# -- probe = off | health | completion ---------------------------------------------------------


async def test_probe_off_sends_nothing_and_says_so(state):
    sb = SimBackend("quiet")
    clock = FakeClock()
    async with Simulator([sb]) as sim:
        config = config_for(sim, [sb], {"quiet": PolicyKeys(probe="off")})
        async with Engine(config, state, clock=clock.mono, wall=clock.wall) as engine:
            await engine.run_round()
            await run_for(engine, clock, 120, 1.0)
            b = engine.snapshot().backends[0]
    assert sum(sb.requests.values()) == 0
    assert b.status == "unknown" and "probe = \"off\"" in b.status_reason and "not yet probed" not in b.status_reason
    assert b.probe_note.startswith("not monitored") and b.probe_mode == "off" and b.probe_tokens_per_hour == 0
    doc = b.to_json(b.last_health_at or 0)
    assert doc["probe_mode"] == "off" and doc["probe_interval_s"] is None


async def test_probe_health_polls_and_never_probes(state):
    sb = SimBackend("cheap")
    clock = FakeClock()
    async with Simulator([sb]) as sim:
        config = config_for(sim, [sb], {"cheap": PolicyKeys(probe="health", health_interval_s=10)})
        async with Engine(config, state, clock=clock.mono, wall=clock.wall) as engine:
            await engine.run_round()
            await run_for(engine, clock, 100, 1.0)
            b = engine.snapshot().backends[0]
    assert sb.requests["/v1/chat/completions"] == 0 and sb.requests["/health"] >= 10
    assert b.status == "healthy" and b.status_reason is None
    assert b.probe_note == 'health checks only: no completion probes (probe = "health")'
    assert b.probe_tokens_per_hour == 0 and b.probe_interval_s is None and b.counters.probes == 0


async def test_per_backend_intervals_hold_within_jitter(state):
    # One token per probe: a single chunk is never read late with another, so no probe is
    # retried as untimed and every gap between probes is the scheduler's own.
    fast, slow, polled = (SimBackend(n, output_tokens=1) for n in ("fast", "slow", "polled"))
    policies = {
        "fast": PolicyKeys(probe_interval_s=20, health_interval_s=3),
        "slow": PolicyKeys(probe_interval_s=90, health_interval_s=7),
        "polled": PolicyKeys(probe="health", health_interval_s=2),
    }
    clock = FakeClock()
    seen: dict[str, list[tuple[str, float]]] = {n: [] for n in policies}
    counts: dict[str, tuple[int, int]] = {}
    step = 0.25

    def record() -> None:
        for sb in (fast, slow, polled):
            now = (sb.requests["/health"], sb.requests["/v1/chat/completions"])
            before = counts.get(sb.name, (0, 0))
            if now[0] > before[0]:
                seen[sb.name].append(("poll", clock.t))
            if now[1] > before[1]:
                seen[sb.name].append(("probe", clock.t))
            counts[sb.name] = now

    async with Simulator([fast, slow, polled]) as sim:
        async with Engine(config_for(sim, [fast, slow, polled], policies), state, clock=clock.mono, wall=clock.wall) as engine:
            await run_for(engine, clock, 600, step, record)
            snaps = {b.name: b for b in engine.snapshot().backends}

    def gaps(name, kind):
        times = [t for k, t in seen[name] if k == kind]
        return [b - a for a, b in zip(times, times[1:])]

    for name, interval in (("fast", 20), ("slow", 90)):
        probe_gaps = gaps(name, "probe")
        assert len(probe_gaps) >= 600 // (interval * 1.1) - 1
        assert all(0.9 * interval - step <= g <= 1.1 * interval + step for g in probe_gaps), (name, probe_gaps)
        assert snaps[name].probe_interval_s == interval and snaps[name].probe_note is None
    poll_gaps = gaps("polled", "poll")
    assert all(0.9 * 2 - step <= g <= 1.1 * 2 + step for g in poll_gaps), poll_gaps
    assert not gaps("polled", "probe") and polled.requests["/v1/chat/completions"] == 0
    # A poll goes before each probe, so a probe may bring its poll forward: never more than one interval apart.
    assert all(g <= 1.1 * 3 + step for g in gaps("fast", "poll"))


# -- skip when saturated -----------------------------------------------------------------------


async def test_a_saturated_backend_is_not_probed_and_that_is_not_a_failure(state):
    sb = SimBackend("busy", waiting=37)
    clock = FakeClock()
    async with Simulator([sb]) as sim:
        policy = PolicyKeys(skip_probe_when=SkipRule("requests_waiting", 20), probe_interval_s=30)
        async with Engine(config_for(sim, [sb], {"busy": policy}), state, clock=clock.mono, wall=clock.wall) as engine:
            await run_for(engine, clock, 60, 1.0)
            b = engine.snapshot().backends[0]
            assert sb.requests["/v1/chat/completions"] == 0 and b.probe is None
            assert b.probe_note == "probe skipped: requests_waiting 37 > 20"
            assert b.status == "healthy" and b.circuit == "closed" and b.error_rate in (None, 0.0)
            assert b.counters.probes_skipped >= 2 and b.counters.probe_failures == 0
            assert b.to_json(b.last_health_at)["spent"]["probes_skipped"] == b.counters.probes_skipped
            sb.waiting = 3  # the queue drains: the next due probe goes
            await run_for(engine, clock, 40, 1.0)
            b = engine.snapshot().backends[0]
    assert sb.requests["/v1/chat/completions"] >= 1 and b.probe.error is None and b.probe_note is None


async def test_a_skip_rule_on_an_engine_series_names_that_series(state):
    sb = SimBackend("busy", waiting=25)
    async with Simulator([sb]) as sim:
        policy = PolicyKeys(skip_probe_when=SkipRule("vllm:num_requests_waiting", 20))
        async with Engine(config_for(sim, [sb], {"busy": policy}), state) as engine:
            await engine.run_round()  # llmtop check honours it too
            b = engine.snapshot().backends[0]
    assert b.probe_note == "probe skipped: vllm:num_requests_waiting 25 > 20" and sb.requests["/v1/chat/completions"] == 0


# -- reasoning models --------------------------------------------------------------------------


@pytest.mark.parametrize("provider", ["vllm", "ollama", "anthropic"])
async def test_a_probe_that_was_all_reasoning_says_so_and_is_timed(provider, state):
    model = "qwq" if provider == "ollama" else "r1"
    sb = SimBackend("think", provider=provider, models=[model], reasoning="all", ttft_ms=30, gap_ms=20)
    async with Simulator([sb]) as sim:
        async with Engine(config_for(sim, [sb]), state) as engine:
            for _ in range(4):  # a loaded core may read a probe late (untimed): the first timed one counts
                await engine.run_round()
                b = engine.snapshot().backends[0]
                if not b.probe.untimed:
                    break
    p = b.probe
    assert p.error is None and p.reasoning_only and p.output_tokens == 8
    assert p.ttft_ms is not None and p.ttft_ms >= 30 and b.status == "healthy"
    assert p.to_json(p.at)["reasoning_only"] is True


async def test_hidden_reasoning_that_ends_on_max_tokens_is_not_a_failure(state):
    sb = SimBackend("o-series", provider="openai", models=["o4-mini"], reasoning="hidden")
    async with Simulator([sb]) as sim:
        async with Engine(config_for(sim, [sb]), state) as engine:
            await engine.run_round()
            b = engine.snapshot().backends[0]
    p = b.probe
    assert p.error is None and p.ttft_ms is None and p.reasoning_only and p.output_tokens == 8
    assert "max_tokens reached before any text" in p.note
    assert b.status == "healthy" and b.counters.probe_failures == 0 and b.circuit == "closed"


async def test_a_stream_that_ends_without_text_or_limit_is_still_a_failure(state):
    sb = SimBackend("empty", provider="openai", models=["m"], reasoning="hidden", output_tokens=3)  # a natural stop
    async with Simulator([sb]) as sim:
        async with Engine(config_for(sim, [sb]), state) as engine:
            await engine.run_round()
            b = engine.snapshot().backends[0]
    assert "without any generated text" in b.probe.error and not b.probe.reasoning_only


# -- headers, health route, prompts ------------------------------------------------------------


async def test_headers_and_env_values_reach_the_server_and_never_the_output(state, monkeypatch):
    org = "org-secret-7f3a9c2e1b"
    monkeypatch.setenv("SIM_ORG_ID", org)
    ok = SimBackend("gw", provider="litellm", models=["m"])
    refused = SimBackend("refusing", models=["m"], fault="5xx", echo_headers=True)
    headers = (("X-Team", "ml-infra"), ("X-Org", EnvValue("SIM_ORG_ID")))
    clock = FakeClock()
    async with Simulator([ok, refused]) as sim:
        policies = {n: PolicyKeys(headers=headers) for n in ("gw", "refusing")}
        async with Engine(config_for(sim, [ok, refused], policies), state, clock=clock.mono, wall=clock.wall) as engine:
            await engine.run_round()
            await run_for(engine, clock, 30, 1.0)
            fleet = engine.snapshot()
            events = [e.message for e in engine.events]
    sent = ok.headers_seen + refused.headers_seen
    assert sent and all(h.get("x-org") == org and h.get("x-team") == "ml-infra" for h in sent)
    by = {b.name: b for b in fleet.backends}
    assert by["gw"].status == "healthy"
    assert any("you sent" in m for _, m in by["refusing"].recent_errors)  # the server echoed them back
    shown = json.dumps(fleet.to_json()) + repr(fleet) + "".join(events)
    assert org not in shown and org[:12] not in shown and "ml-infra" not in json.dumps(fleet.to_json()["backends"][0]["probe"])


async def test_a_header_whose_env_var_is_empty_fails_that_backend_in_one_line(state, monkeypatch):
    monkeypatch.delenv("SIM_MISSING_ORG", raising=False)
    sb = SimBackend("gw", models=["m"])
    async with Simulator([sb]) as sim:
        policy = PolicyKeys(headers=(("X-Org", EnvValue("SIM_MISSING_ORG")),))
        async with Engine(config_for(sim, [sb], {"gw": policy}), state) as engine:
            await engine.run_round()
            b = engine.snapshot().backends[0]
    assert sum(sb.requests.values()) == 0  # nothing is sent with the header missing
    assert b.error == "header X-Org: $SIM_MISSING_ORG is empty or unset; export it, or remove the header from the config"
    assert b.status in ("degraded", "down")


async def test_a_health_route_of_its_own_is_asked_and_judged_by_its_status(state):
    sb = SimBackend("proxied", health_route=("/healthz", 204))
    other = SimBackend("wrong-status", health_route=("/healthz", 503))
    async with Simulator([sb, other]) as sim:
        policy = PolicyKeys(health_path="/healthz", health_status=204)
        config = config_for(sim, [sb, other], {"proxied": policy, "wrong-status": policy})
        async with Engine(config, state) as engine:
            await engine.run_round()
            by = {b.name: b for b in engine.snapshot().backends}
    assert sb.requests["/healthz"] == 1 and sb.requests["/health"] == 0 and by["proxied"].status == "healthy"
    assert by["wrong-status"].status == "down" and "/healthz: HTTP 503" in by["wrong-status"].error


@pytest.mark.parametrize("provider", ["vllm", "ollama", "anthropic"])
async def test_probe_messages_and_prompt_reach_the_server(provider, state):
    model = "llama3.2" if provider == "ollama" else "m"
    a = SimBackend("messages", provider=provider, models=[model])
    b = SimBackend("prompt", provider=provider, models=[model])
    messages = (("system", "You are terse."), ("user", "Say OK."))
    async with Simulator([a, b]) as sim:
        policies = {"messages": PolicyKeys(probe_messages=messages), "prompt": PolicyKeys(probe_prompt="Reply with one word.")}
        async with Engine(config_for(sim, [a, b], policies), state) as engine:
            await engine.run_round()
    if provider == "anthropic":
        assert a.bodies[-1]["system"] == "You are terse." and a.bodies[-1]["messages"] == [{"role": "user", "content": "Say OK."}]
    else:
        assert a.bodies[-1]["messages"] == [{"role": r, "content": c} for r, c in messages]
    assert b.bodies[-1]["messages"] == [{"role": "user", "content": "Reply with one word."}]


async def test_per_backend_max_tokens_and_timeout_are_used(state):
    sb = SimBackend("slow", fault="slow_headers", fault_arg=1.0)
    fine = SimBackend("big")
    async with Simulator([sb, fine]) as sim:
        policies = {"slow": PolicyKeys(timeout_s=0.3), "big": PolicyKeys(probe_max_tokens=3)}
        async with Engine(config_for(sim, [sb, fine], policies), state) as engine:
            await engine.run_round()
            by = {b.name: b for b in engine.snapshot().backends}
    assert "within 0.3s" in by["slow"].error
    assert fine.bodies[-1]["max_tokens"] == 3 and by["big"].probe.output_tokens == 3


# -- tokens, prices and the budget -------------------------------------------------------------


async def test_input_tokens_and_prices_are_counted_and_exported(state):
    sb = SimBackend("paid", provider="openai", models=["gpt"], gap_ms=40)  # read one by one on a loaded core: no untimed retry
    async with Simulator([sb]) as sim:
        policy = PolicyKeys(price_per_1k_output_tokens=0.6, price_per_1k_input_tokens=0.15, probe_interval_s=60)
        async with Engine(config_for(sim, [sb], {"paid": policy}), state) as engine:
            await engine.run_round()
            await engine.run_round()
            fleet = engine.snapshot()
    b = fleet.backends[0]
    per_probe = (8 * 0.6 + PROMPT_TOKENS * 0.15) / 1000
    assert b.counters.probe_input_tokens == 2 * PROMPT_TOKENS and b.counters.probe_tokens == 16
    assert b.counters.probe_cost == pytest.approx(2 * per_probe)
    assert b.probe_cost_per_hour == pytest.approx(60 * per_probe) and b.probe_input_tokens_per_hour == 60 * PROMPT_TOKENS
    doc = fleet.to_json()
    assert doc["backends"][0]["spent"]["cost"] == pytest.approx(2 * per_probe)
    assert doc["probe_spend"]["tokens_per_hour"] == 60 * (8 + PROMPT_TOKENS)
    assert doc["probe_spend"]["cost_per_hour"] == pytest.approx(60 * per_probe)

    from llmtop.serve.exporter import Exposition

    text = Exposition(lambda: fleet, lambda: ("healthy", "degraded")).render(False).decode()
    assert 'llmtop_probe_input_tokens_total{backend="paid",provider="openai"} 20.0' in text
    assert f'llmtop_probe_cost_total{{backend="paid",provider="openai"}} {2 * per_probe!r}' in text
    assert 'llmtop_probe_interval_seconds{backend="paid",provider="openai"} 60.0' in text


async def test_a_backends_own_budget_stretches_its_interval_and_holds(state):
    sb = SimBackend("metered", output_tokens=1)
    clock = FakeClock()
    tokens_per_probe = 1 + PROMPT_TOKENS
    async with Simulator([sb]) as sim:
        policy = PolicyKeys(probe_interval_s=10, health_interval_s=30, probe_tokens_per_hour=10 * tokens_per_probe)
        async with Engine(config_for(sim, [sb], {"metered": policy}), state, clock=clock.mono, wall=clock.wall) as engine:
            await run_for(engine, clock, 3600, 1.0)
            b = engine.snapshot().backends[0]
    spent = b.counters.probe_tokens + b.counters.probe_input_tokens
    assert spent <= 10 * tokens_per_probe + tokens_per_probe  # the hour's budget, and the probe at its very start
    assert spent >= 9 * tokens_per_probe
    assert b.probe_interval_s == 360 and b.probe_note == "interval stretched to 360 s by its probe_tokens_per_hour (110)"


async def test_the_fleet_budget_holds_over_an_hour_of_fifty_backends_spread_not_bursts(state):
    fleet = [SimBackend(f"b{i:02d}", ttft_ms=1, gap_ms=1) for i in range(50)]
    tokens_per_probe = 8 + PROMPT_TOKENS
    budget = 6_000  # against 50 backends * 60 probes/h * 18 tokens = 54,000 wanted
    clock = FakeClock()
    spent_at: list[tuple[float, int]] = []

    def total() -> int:
        return sum(sb.requests["/v1/chat/completions"] for sb in fleet) * tokens_per_probe

    async with Simulator(fleet) as sim:
        # Polls rarely (they do not pace probes: a booked probe wakes its backend), in steps of 4 s.
        config = config_for(sim, fleet, budget=budget, probe_interval_s=60, health_interval_s=600)
        async with Engine(config, state, clock=clock.mono, wall=clock.wall) as engine:
            await run_for(engine, clock, 3600, 4.0, lambda: spent_at.append((clock.t, total())))
            snap = engine.snapshot()
    spent = sum(b.counters.probe_tokens + b.counters.probe_input_tokens for b in snap.backends)
    assert spent == total()
    assert budget * 0.98 <= spent <= budget + tokens_per_probe, spent
    # Spread: no ten minutes take much more than their share (the first, with every backend new, included).
    for (t0, s0), (t1, s1) in zip(spent_at, spent_at[150:]):
        assert s1 - s0 <= budget / 6 * 1.15 + tokens_per_probe, (t0, s1 - s0)
    stretched = 60 * 54_000 / budget
    assert all(b.probe_interval_s == pytest.approx(stretched, rel=0.01) for b in snap.backends)
    assert snap.backends[0].probe_note == f"interval stretched to {stretched:.0f} s by the fleet budget (6000 tokens/h)"
    assert snap.spend()["tokens_per_hour"] == pytest.approx(budget, rel=0.01)
    assert snap.to_json()["probe_spend"]["budget_tokens_per_hour"] == budget


async def test_an_operators_probe_is_never_held_back_by_the_budget_but_is_counted(state):
    sb = SimBackend("b", output_tokens=1)
    clock = FakeClock()
    async with Simulator([sb]) as sim:
        config = config_for(sim, [sb], budget=20, probe_interval_s=60)  # under two probes an hour
        async with Engine(config, state, clock=clock.mono, wall=clock.wall) as engine:
            await run_for(engine, clock, 5, 1.0)
            assert sb.requests["/v1/chat/completions"] == 1
            engine.force_probe(["b"])
            await run_for(engine, clock, 2, 1.0)
            assert sb.requests["/v1/chat/completions"] == 2
            await run_for(engine, clock, 1800, 5.0)  # the forced one is paid back before the next
            assert sb.requests["/v1/chat/completions"] == 2
            b = engine.snapshot().backends[0]
    assert b.counters.probes == 2 and dataclasses.asdict(b.counters)["probe_input_tokens"] == 2 * PROMPT_TOKENS


async def test_the_table_says_why_a_policy_left_no_figure_and_marks_reasoning(state):
    from llmtop.tui.format import ttft_cell

    off, health, busy = SimBackend("off"), SimBackend("health"), SimBackend("busy", waiting=50)
    think = SimBackend("think", reasoning="all", output_tokens=1)
    hidden = SimBackend("hidden", provider="openai", models=["o4"], reasoning="hidden")
    fleet = [off, health, busy, think, hidden]
    policies = {
        "off": PolicyKeys(probe="off"),
        "health": PolicyKeys(probe="health"),
        "busy": PolicyKeys(skip_probe_when=SkipRule("requests_waiting", 20)),
    }
    async with Simulator(fleet) as sim:
        async with Engine(config_for(sim, fleet, policies), state) as engine:
            await engine.run_round()
            snap = engine.snapshot()
    cells = {b.name: ttft_cell(b, 5000, snap.at).text for b in snap.backends}
    assert cells["off"] == "off" and cells["health"] == "health only" and cells["busy"] == "skipped"
    assert cells["think"].endswith("ʳ") and cells["hidden"] == "thinking"


async def test_check_passes_a_fleet_whose_unwatched_backend_is_off_by_choice(state):
    from llmtop.check import exit_code

    up, quiet = SimBackend("up"), SimBackend("quiet")
    async with Simulator([up, quiet]) as sim:
        async with Engine(config_for(sim, [up, quiet], {"quiet": PolicyKeys(probe="off")}), state) as engine:
            await engine.run_round()
            snap = engine.snapshot()
    assert [b.status for b in snap.backends] == ["healthy", "unknown"] and exit_code(snap) == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_a_checks_planned_spend_never_reads_above_the_fleet_budget(state, workers):
    """A one-shot check reports the plans the live loop would have: a plan made before another
    backend's first probe priced the fleet was left stretched too little (1,580 tokens/h planned
    against a budget of 1,000), and each worker process planned against the whole budget."""
    from llmtop.check import check_fleet

    fleet = [SimBackend(n) for n in ("a", "b", "c", "d")]
    sim = Simulator(fleet).start_in_thread()
    try:
        skip = PolicyKeys(skip_probe_when=SkipRule("requests_waiting", -1.0))  # never probed, still planned
        config = config_for(sim, fleet, {"c": skip}, budget=1000, probe_interval_s=60)
        spend = check_fleet(config, state, workers=workers).spend()
    finally:
        sim.stop_thread()
    assert spend["budget_tokens_per_hour"] == 1000
    assert 900 <= spend["tokens_per_hour"] <= 1000 * 1.01, spend
