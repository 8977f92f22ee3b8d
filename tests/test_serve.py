"""llmtop serve's endpoints over real HTTP on 127.0.0.1, against an engine watching the simulator."""

from __future__ import annotations

import asyncio
import json
import subprocess
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import loopback
from real import needs
from prometheus_client.parser import text_string_to_metric_families

from llmtop.config import BackendConfig, Config, ServeSettings, Settings
from llmtop.engine import Engine
from llmtop.serve.agent import AgentServer
from llmtop.serve.http import ServeSite, fleet_document, fleet_json
from llmtop.serve.log import format_event
from llmtop.serve.readiness import agent_reply, readiness
from llmtop.simulator import SimBackend, Simulator
from llmtop.snapshot import Event
from llmtop.state import StateStore

TOKEN_ENV = "LLMTOP_TEST_TOKEN"


def fleet() -> list[SimBackend]:
    return [
        SimBackend("ok", "vllm"),
        SimBackend("dead", "vllm", fault="reset"),
        SimBackend("partial", "vllm"),  # the config expects a model it does not serve
    ]


def config(sim: Simulator, backends, serve: ServeSettings | None = None) -> Config:
    expected = {"partial": ("meta-llama/Llama-3.1-8B-Instruct", "not-served")}
    return Config(
        settings=Settings(timeout_s=2.0, health_interval_s=0.3, probe_interval_s=3600),
        backends=tuple(
            BackendConfig(b.name, b.provider, sim.url(b.name), expected.get(b.name, tuple(b.models)), labels=(("team", "ml"),))
            for b in backends
        ),
        serve=serve or ServeSettings(admin_token_env=TOKEN_ENV),
    )


@asynccontextmanager
async def serving(tmp_path: Path, serve: ServeSettings | None = None, backends=None, live=True):
    backends = backends or fleet()
    async with Simulator(backends) as sim:
        engine = Engine(config(sim, backends, serve), StateStore(tmp_path / "state.json"))
        await engine.open()
        if live:
            engine.start()
        site = ServeSite(engine, "127.0.0.1:0")
        agent = AgentServer(engine, "127.0.0.1:0")
        await site.start()
        await agent.start()
        try:
            async with loopback.AsyncClient(base_url=f"http://127.0.0.1:{site.port}", trust_env=False, timeout=10) as client:
                yield engine, client, agent, sim
        finally:
            await site.stop()
            await agent.stop()
            await engine.close()


async def until(condition, what: str, timeout: float = 20.0):
    """Poll a condition the engine will reach (an outer bound only; it returns as soon as true)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = await condition()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def _timed(engine: Engine, name: str) -> bool:
    return engine.snapshot().backend(name).last_ok_probe is not None


async def first_round(engine: Engine):
    await until(lambda: _ready(engine), "the first round")


async def _ready(engine: Engine) -> bool:
    return engine.first_round_pending() == 0 and all(
        t.probe is not None or t.health is None or not t.health.ok for t in engine.trackers.values()
    )


# -- readiness ------------------------------------------------------------------------------------


async def test_livez_and_readyz(tmp_path):
    async with serving(tmp_path) as (engine, client, _agent, _sim):
        assert (await client.get("/livez")).status_code == 200
        await first_round(engine)
        r = await client.get("/readyz")
        assert r.status_code == 200 and r.text == "ready\n"


async def test_readyz_waits_for_the_first_round(tmp_path):
    async with serving(tmp_path, live=False) as (engine, client, _agent, _sim):
        r = await client.get("/readyz")
        assert r.status_code == 503 and "3 backends not polled" in r.text
        assert (await client.get("/livez")).status_code == 503  # no live loop: not live either


async def test_backend_readiness_follows_health_and_the_operator(tmp_path):
    async with serving(tmp_path) as (engine, client, _agent, _sim):
        await first_round(engine)
        ok = await client.get("/backends/ok/ready")
        assert (ok.status_code, ok.text) == (200, "ready\n")
        dead = await client.get("/backends/dead/ready")
        assert dead.status_code == 503 and dead.text.startswith("down")
        partial = await client.get("/backends/partial/ready")  # degraded takes traffic by default
        assert partial.status_code == 200
        assert (await client.get("/backends/nope/ready")).status_code == 404
        StateStore(engine.state.path).set_admin("ok", "draining")  # `llmtop drain ok` in another shell
        await engine.refresh_state()
        drained = await client.get("/backends/ok/ready")
        assert (drained.status_code, drained.text) == (503, "draining\n")


async def test_readiness_is_answered_while_the_engines_loop_is_busy_and_a_drain_shows_at_once(tmp_path):
    """A balancer's question never waits on the engine's loop: here the loop is held by this very
    test (a blocking client called from a coroutine on it) while the HTTP endpoint and the agent
    answer. And a drain is in the answers as soon as the engine acknowledged it, before the loop
    has run anything else."""
    import socket

    async with serving(tmp_path) as (engine, client, agent, _sim):
        await first_round(engine)
        url = f"http://127.0.0.1:{client.base_url.port}"

        def ask_now(path: str) -> tuple[int, str]:  # the engine's loop waits for this
            with loopback.Client(base_url=url, trust_env=False, timeout=10) as blocking:
                r = blocking.get(path)
            return r.status_code, r.text

        def agent_now(name: str) -> bytes:
            with socket.create_connection(("127.0.0.1", agent.port), timeout=10) as sock:
                sock.sendall(name.encode() + b"\n")
                return sock.recv(1024)

        assert ask_now("/backends/ok/ready") == (200, "ready\n")
        assert ask_now("/readyz") == (200, "ready\n")
        assert agent_now("ok") == b"ready up\n"
        await engine.set_admin("ok", "draining", by="test")
        assert ask_now("/backends/ok/ready") == (503, "draining\n")
        assert agent_now("ok") == b"drain up # draining\n"
        status, metrics = ask_now("/metrics")  # from the published snapshots, as current
        assert status == 200 and 'llmtop_backend_admin{backend="ok",provider="vllm",team="ml",llmtop_backend_admin="draining"} 1.0' in metrics
        dead = ask_now("/backends/dead/ready")
        assert dead[0] == 503 and dead[1] == readiness(engine.backend_snapshot("dead"), ("healthy", "degraded")).reason + "\n"
        assert ask_now("/backends/nope/ready")[0] == 404


async def test_a_breaker_that_time_alone_moved_is_answered_as_the_engine_says_now(tmp_path):
    """The published answer of an open breaker holds until its cooldown ends; past it, the
    answer is the engine's own (which moves the breaker to half-open), not the published one.
    The same for /metrics."""
    from llmtop.config import BreakerSettings

    now = [1000.0]
    sims = [SimBackend("flaky", "vllm", fault="5xx"), SimBackend("flaky2", "vllm", fault="5xx")]
    async with Simulator(sims) as sim:
        cfg = Config(
            settings=Settings(timeout_s=2.0),
            breaker=BreakerSettings(consecutive_failures=2, cooldown_s=30.0),
            backends=tuple(BackendConfig(sb.name, "vllm", sim.url(sb.name), tuple(sb.models)) for sb in sims),
        )
        async with Engine(cfg, StateStore(tmp_path / "state.json"), clock=lambda: now[0]) as engine:
            site = ServeSite(engine, "127.0.0.1:0")
            await site.start()
            try:
                async with loopback.AsyncClient(base_url=f"http://127.0.0.1:{site.port}", trust_env=False, timeout=10) as client:
                    await engine.run_round()
                    await engine.run_round()
                    assert engine.trackers["flaky"].breaker.state == "open"
                    r = await client.get("/backends/flaky/ready")
                    assert r.status_code == 503 and r.text.startswith("circuit open")
                    now[0] += 29.0
                    assert (await client.get("/backends/flaky/ready")).text.startswith("circuit open")
                    now[0] += 1.0  # the cooldown has passed; nothing on the engine's loop has run since
                    r = await client.get("/backends/flaky/ready")
                    assert engine.trackers["flaky"].breaker._state == "half_open"  # asking moved it, as before
                    assert not r.text.startswith("circuit open")
                    assert r.text == readiness(engine.backend_snapshot("flaky"), ("healthy", "degraded")).reason + "\n"
                    assert engine.trackers["flaky2"].breaker._state == "open"  # not asked yet
                    metrics = (await client.get("/metrics")).text
                    assert 'llmtop_backend_circuit{backend="flaky2",provider="vllm",llmtop_backend_circuit="half_open"} 1.0' in metrics
            finally:
                await site.stop()


async def test_ready_when_can_exclude_degraded(tmp_path):
    async with serving(tmp_path, ServeSettings(ready_when=("healthy",))) as (engine, client, _agent, _sim):
        await first_round(engine)
        r = await client.get("/backends/partial/ready")
        assert r.status_code == 503 and "missing not-served" in r.text


# -- the HAProxy agent ------------------------------------------------------------------------------


async def ask_agent(agent: AgentServer, line: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", agent.port)
    writer.write(line)
    await writer.drain()
    reply = await reader.read(1024)
    writer.close()
    return reply


async def test_the_agent_answers_in_haproxys_grammar(tmp_path):
    async with serving(tmp_path) as (engine, _client, agent, _sim):
        await first_round(engine)
        assert await ask_agent(agent, b"ok\n") == b"ready up\n"
        assert (await ask_agent(agent, b"dead\n")).startswith(b"ready down # down")
        await engine.set_admin("ok", "draining")
        assert await ask_agent(agent, b"ok\n") == b"drain up # draining\n"
        await engine.set_admin("ok", "disabled")
        assert await ask_agent(agent, b"ok\n") == b"maint # disabled\n"
        # Unknown names say nothing (HAProxy keeps its state) and are logged.
        assert await ask_agent(agent, b"nobody\n") == b""
        assert any(e.kind == "agent" and "nobody" in e.message for e in engine.events)
        assert await ask_agent(agent, b"x" * 5000) == b""  # not a name: let go


def test_readiness_rules_are_one_table():
    from llmtop.snapshot import BackendSnapshot

    def b(**kw):
        base = dict(name="x", provider="vllm", url="http://h", status="healthy", status_reason=None, circuit="closed",
                    admin="active", enabled=True, latency_ms=1.0, models=(), expected_models=(), missing_models=(),
                    alerts=(), metrics=None, probe=None, error=None, error_rate=None, last_health_at=1.0,
                    retry_after_at=None, probe_tokens_per_hour=0.0)
        return BackendSnapshot(**{**base, **kw})

    both = ("healthy", "degraded")
    cases = [
        (b(), True, "ready up\n"),
        (b(status="degraded", status_reason="missing m"), True, "ready up\n"),
        (b(admin="draining"), False, "drain up # draining\n"),
        (b(admin="draining", status="down", status_reason="unreachable"), False, "drain down # draining\n"),
        (b(admin="disabled"), False, "maint # disabled\n"),
        (b(status="down", status_reason="refused"), False, "ready down # down: refused\n"),
        (b(status="loading", status_reason="loading model"), False, "ready down # loading: loading model\n"),
        (b(circuit="open", status="down", status_reason="circuit open"), False, "ready down # circuit open\n"),
        (b(status="degraded", retry_after_at=5.0), False, "drain up # rate limited (429)\n"),
    ]
    for snap, ready, reply in cases:
        assert readiness(snap, both).ready is ready, snap
        assert agent_reply(snap, both) == reply
    assert agent_reply(b(status="unknown", last_health_at=None), both) is None  # nothing to tell yet
    assert readiness(b(status="degraded", status_reason="missing m"), ("healthy",)).ready is False
    assert agent_reply(b(status="down", status_reason="a # b\nc"), both) == "ready down # down: a b c\n"  # one line, no second '#'


# -- metrics -----------------------------------------------------------------------------------------


def samples(text: str) -> dict:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_metrics_tell_the_truth_about_each_backend(tmp_path):
    async with serving(tmp_path) as (engine, client, _agent, _sim):
        await first_round(engine)
        # A probe read too late on a loaded core is untimed, and retried: wait for one that timed.
        await until(lambda: _timed(engine, "ok"), "a timed probe of ok")
        r = await client.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        got = samples(r.text)
    lab = lambda name, **kw: tuple(sorted({"backend": name, "provider": "vllm", "team": "ml", **kw}.items()))  # noqa: E731
    assert got[("llmtop_backend_up", lab("ok"))] == 1 and got[("llmtop_backend_up", lab("dead"))] == 0
    assert got[("llmtop_backend_ready", lab("dead"))] == 0
    assert got[("llmtop_backend_status", lab("dead", llmtop_backend_status="down"))] == 1
    assert got[("llmtop_backend_status", lab("dead", llmtop_backend_status="healthy"))] == 0
    assert got[("llmtop_backend_model_missing", lab("partial", model="not-served"))] == 1
    assert got[("llmtop_backend_model_missing", lab("partial", model="meta-llama/Llama-3.1-8B-Instruct"))] == 0
    probes = got[("llmtop_probes_total", lab("ok"))]
    assert probes in (1, 2)  # 2: the first was read too late to time, and retried
    assert got[("llmtop_probe_output_tokens_total", lab("ok"))] == 8 * probes
    assert got[("llmtop_probe_ttft_seconds_count", lab("ok"))] == 1
    assert 0 < got[("llmtop_probe_last_ttft_seconds", lab("ok"))] < 1
    assert ("llmtop_build_info", (("version", __import__("llmtop").__version__),)) in got


async def test_metrics_speak_openmetrics_when_asked(tmp_path):
    async with serving(tmp_path) as (engine, client, _agent, _sim):
        await first_round(engine)
        r = await client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert r.headers["content-type"].startswith("application/openmetrics-text")
    assert "# TYPE llmtop_backend_status stateset" in r.text and r.text.rstrip().endswith("# EOF")


@needs("promtool")
async def test_metrics_pass_promtools_lint(tmp_path):
    async with serving(tmp_path) as (engine, client, _agent, _sim):
        await first_round(engine)
        text = (await client.get("/metrics")).text
    lint = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert lint.returncode == 0, lint.stdout + lint.stderr


# -- the fleet and its events -------------------------------------------------------------------------


async def test_the_fleet_document_is_checks_json_with_a_schema(tmp_path):
    async with serving(tmp_path) as (engine, client, _agent, _sim):
        await first_round(engine)
        doc = (await client.get("/api/v1/fleet")).json()
    assert doc["schema"] == 1 and {b["name"] for b in doc["backends"]} == {"ok", "dead", "partial"}
    fleet = engine.snapshot()
    assert fleet_json(fleet) == json.dumps(fleet_document(fleet), allow_nan=False)  # written in pieces, the same bytes
    assert set(doc) >= {"at", "time", "backends", "gpus", "gpu_message"}


async def test_the_event_stream_sends_the_fleet_then_what_changes(tmp_path):
    async with serving(tmp_path) as (engine, client, _agent, _sim):
        await first_round(engine)
        seen: list[tuple[str, dict]] = []
        async with client.stream("GET", "/api/v1/events") as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            lines = stream.aiter_lines()
            kind = None
            async for line in lines:
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    seen.append((kind, json.loads(line[6:])))
                    if kind == "fleet":
                        await engine.set_admin("ok", "draining", by="test")
                    if kind == "backend" and seen[-1][1]["name"] == "ok" and seen[-1][1]["admin"] == "draining":
                        break
    kinds = [k for k, _ in seen]
    assert kinds[0] == "fleet" and seen[0][1]["schema"] == 1
    assert any(k == "event" and d["kind"] == "admin" and "draining" in d["message"] for k, d in seen)


# -- admin ------------------------------------------------------------------------------------------------


async def test_admin_needs_a_configured_token_and_the_right_one(tmp_path, monkeypatch):
    async with serving(tmp_path, ServeSettings()) as (engine, client, _agent, _sim):
        r = await client.post("/api/v1/backends/ok/drain")
        assert r.status_code == 403 and "admin_token_env" in r.text
    monkeypatch.setenv(TOKEN_ENV, "s3cret-admin-token")
    async with serving(tmp_path) as (engine, client, _agent, _sim):
        assert (await client.post("/api/v1/backends/ok/drain")).status_code == 401
        wrong = await client.post("/api/v1/backends/ok/drain", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and "s3cret" not in wrong.text
        auth = {"Authorization": "Bearer s3cret-admin-token"}
        r = await client.post("/api/v1/backends/ok/drain", headers=auth)
        assert (r.status_code, r.text) == (200, "active -> draining\n")
        assert StateStore(engine.state.path).admin("ok") == "draining"  # the same file the CLI and the TUI use
        assert any(e.kind == "admin" and "127.0.0.1" in e.message for e in engine.events)  # who did it
        await client.post("/api/v1/backends/ok/disable", headers=auth)
        r = await client.post("/api/v1/backends/ok/undrain", headers=auth)  # the same rule as `llmtop undrain`
        assert r.status_code == 409 and "enable lifts it" in r.text and StateStore(engine.state.path).admin("ok") == "disabled"
        assert (await client.post("/api/v1/backends/ok/explode", headers=auth)).status_code == 404
        assert (await client.post("/api/v1/backends/nope/drain", headers=auth)).status_code == 404
        big = await client.post("/api/v1/backends/ok/probe", headers=auth, content=b"x" * 200_000)
        assert big.status_code == 413  # bounded request sizes


# -- the event log ------------------------------------------------------------------------------------------


def test_log_lines_are_one_line_each_and_safe():
    event = Event(1_800_000_000.5, "gpu1", "status", "healthy -> down: \x1b]0;x\x07evil\nFORGED", "error")
    text = format_event(event, "text")
    assert text.startswith("2027-01-15T08:00:00.500Z error   gpu1 status: healthy -> down:") and "\n" not in text
    assert "\x1b" not in text and "FORGED" in text
    data = json.loads(format_event(event, "json"))
    assert data["message"] == event.message and "\x1b" not in format_event(event, "json")


async def test_the_fast_exposition_says_exactly_what_prometheus_client_says(tmp_path):
    """/metrics is written by llmtop itself, for speed; prometheus_client, given the same series
    through FleetCollector, is the oracle: both formats must parse to the same samples."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics

    from llmtop.serve.exporter import Exposition, FleetCollector

    async with serving(tmp_path) as (engine, client, _agent, _sim):
        await first_round(engine)
        await engine.set_admin("partial", "draining")
        fleet = engine.snapshot()
        frozen = lambda: fleet  # noqa: E731 - one instant for both writers
        ready_when = lambda: ("healthy", "degraded")  # noqa: E731
        ours = Exposition(frozen, ready_when)
        registry = CollectorRegistry()
        registry.register(FleetCollector(frozen, ready_when))

        def parsed(text: str, parse) -> dict:
            return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in parse(text) for s in f.samples if not s.name.endswith("_created")}

        assert parsed(ours.render(False).decode(), text_string_to_metric_families) == parsed(generate_latest(registry).decode(), text_string_to_metric_families)
        assert parsed(ours.render(True).decode(), parse_openmetrics) == parsed(openmetrics_latest(registry).decode(), parse_openmetrics)
        assert ours.render(True) == ours.render(True)  # from the cache, the same bytes
        # The lines kept while a backend's counters stay the same are FAMILIES' tail: each
        # function's families must lie on its side of FIRST_COUNT.
        from llmtop.serve.exporter import FAMILIES, FIRST_COUNT, health_series, probe_count_series

        for b in fleet.backends:
            assert set(health_series(b, fleet.at, ready_when())) <= {f.name for f in FAMILIES[:FIRST_COUNT]}
            assert set(probe_count_series(b)) <= {f.name for f in FAMILIES[FIRST_COUNT:]}


async def test_the_exposition_cache_never_answers_with_lines_of_an_old_snapshot(tmp_path):
    """Each backend's lines are kept until its snapshot changes: a drain, a later `now` that
    makes the last probe's figures old, and a backend a reload removed all show at once."""
    import dataclasses

    from prometheus_client import CollectorRegistry, generate_latest

    from llmtop.serve.exporter import Exposition, FleetCollector

    async with serving(tmp_path) as (engine, client, _agent, _sim):
        await first_round(engine)
        await until(lambda: _timed(engine, "ok"), "a timed probe of ok")
        fleet = engine.snapshot()
        ready_when = lambda: ("healthy", "degraded")  # noqa: E731
        ours = Exposition(lambda: fleet, ready_when)

        def same_as_prometheus_client(at) -> str:
            text = ours.render(False).decode()
            registry = CollectorRegistry()
            registry.register(FleetCollector(lambda: at, ready_when))
            assert parsed(text) == parsed(generate_latest(registry).decode())
            return text

        def parsed(text: str) -> dict:
            return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.name.endswith("_created")}

        before = same_as_prometheus_client(fleet)
        assert 'llmtop_backend_admin{backend="ok",provider="vllm",team="ml",llmtop_backend_admin="active"} 1.0' in before
        assert 'llmtop_probe_last_ttft_seconds{backend="ok"' in before
        await engine.set_admin("ok", "draining")
        fleet = engine.snapshot()
        drained = same_as_prometheus_client(fleet)
        assert 'llmtop_backend_admin{backend="ok",provider="vllm",team="ml",llmtop_backend_admin="draining"} 1.0' in drained
        assert 'llmtop_backend_ready{backend="ok",provider="vllm",team="ml"} 0.0' in drained
        fleet = dataclasses.replace(fleet, at=fleet.at + 10**6)  # the same snapshots, read much later
        later = same_as_prometheus_client(fleet)
        assert "llmtop_probe_last_ttft_seconds{" not in later  # old figures are not current
        fleet = dataclasses.replace(fleet, backends=tuple(b for b in fleet.backends if b.name != "dead"))
        assert 'backend="dead"' not in same_as_prometheus_client(fleet)

        def changed(**fields):  # a new snapshot of "ok", the rest as they were
            return dataclasses.replace(fleet, backends=tuple(dataclasses.replace(b, **fields) if b.name == "ok" else b for b in fleet.backends))

        fleet = changed(latency_ms=1234.5)  # a health poll: the counters' lines kept, the rest written again
        assert 'llmtop_backend_health_latency_seconds{backend="ok",provider="vllm",team="ml"} 1.2345' in same_as_prometheus_client(fleet)
        ok = next(b for b in fleet.backends if b.name == "ok")
        fleet = changed(counters=dataclasses.replace(ok.counters, probes=ok.counters.probes + 5))  # a probe went out
        assert f'llmtop_probes_total{{backend="ok",provider="vllm",team="ml"}} {float(ok.counters.probes + 5)}' in same_as_prometheus_client(fleet)
        fleet = changed(probe_interval_s=123.0)  # a budget stretched its interval: the same counters, a new line
        assert 'llmtop_probe_interval_seconds{backend="ok",provider="vllm",team="ml"} 123.0' in same_as_prometheus_client(fleet)
        fleet = changed(labels=(("team", "infra"),))  # a reload relabels it: the same label names, a new value
        relabeled = same_as_prometheus_client(fleet)
        assert 'backend="ok",provider="vllm",team="infra"' in relabeled and 'backend="ok",provider="vllm",team="ml"' not in relabeled


async def test_between_scrapes_the_metrics_lines_are_brought_up_to_date(tmp_path, monkeypatch):
    """A scrape every 15-60 s would meet every backend changed: once scrapes come, serve writes
    each changed backend's lines as it goes, and the next scrape joins them."""
    from llmtop.serve import http

    monkeypatch.setattr(http, "WARM_EVERY_S", 0.05)
    backends = fleet()
    async with Simulator(backends) as sim:
        engine = Engine(config(sim, backends), StateStore(tmp_path / "state.json"))
        await engine.open()
        engine.start()
        site = ServeSite(engine, "127.0.0.1:0")
        await site.start()
        try:
            async with loopback.AsyncClient(base_url=f"http://127.0.0.1:{site.port}", trust_env=False, timeout=10) as client:
                await first_round(engine)

                async def written(admin: str) -> bool:
                    kept = site._exposition._cache[False].get("ok")
                    return kept is not None and kept[0].admin == admin

                await asyncio.sleep(0.2)  # several warming periods: with no scrape yet, nothing is written
                assert site._exposition._cache[False] == {}
                assert (await client.get("/metrics")).status_code == 200  # a first scrape
                assert await written("active")
                await engine.set_admin("ok", "draining")
                await until(lambda: written("draining"), "the drained backend's lines written before the next scrape")
                text = (await client.get("/metrics")).text
                assert 'llmtop_backend_admin{backend="ok",provider="vllm",team="ml",llmtop_backend_admin="draining"} 1.0' in text
        finally:
            await site.stop()
            await engine.close()


async def test_a_bad_byte_in_the_state_file_is_said_and_following_goes_on(tmp_path):
    from llmtop.follow import Follower

    path = tmp_path / "state.json"
    engine = Engine(Config(backends=(BackendConfig("b", "vllm", "http://127.0.0.1:9"),)), StateStore(path))
    follower = asyncio.create_task(Follower(engine, None).run())
    try:
        path.write_bytes(b'{"admin": {"b": "draining\xff"}}')  # a bad editor save
        await until(lambda: _said(engine, "not UTF-8"), "the error to be said")
        path.write_text(json.dumps({"admin": {"b": "draining"}}))  # fixed: `llmtop drain b` from another shell
        await until(lambda: _admin(engine, "draining"), "the follower to read the fixed file")
        assert not follower.done()
    finally:
        follower.cancel()


async def _said(engine: Engine, words: str) -> bool:
    return any(words in e.message for e in engine.events)


async def _admin(engine: Engine, state: str) -> bool:
    return engine.trackers["b"].admin == state


async def test_a_stderr_nobody_reads_never_stalls_the_engine(tmp_path):
    """The event log into a pipe nobody drains (4 KiB of room): events keep coming, readiness keeps
    answering, and the lines past the queue are counted, not waited for."""
    import fcntl
    import os as os_

    from llmtop.serve.log import EventLog

    read_end, write_end = os_.pipe()
    fcntl.fcntl(write_end, 1031, 4096)  # F_SETPIPE_SZ: a small pipe fills fast
    stream = os_.fdopen(write_end, "w")
    async with serving(tmp_path) as (engine, client, agent, _sim):
        log = EventLog(engine, "text", stream)
        try:
            await first_round(engine)
            for i in range(2000):  # far more than the pipe and the queue hold
                engine.emit(Event(0.0, "ok", "status", f"line {i} " + "x" * 100))
            r = await asyncio.wait_for(client.get("/backends/ok/ready"), 5)
            assert r.status_code == 200
            assert await asyncio.wait_for(ask_agent(agent, b"ok\n"), 5) == b"ready up\n"
        finally:
            os_.close(read_end)  # the reader goes: the writer thread's write fails and it moves on
            log.close()


async def test_an_alert_rule_that_cannot_be_judged_is_not_exported_as_not_tripped(tmp_path):
    from llmtop.config import AlertRule
    from llmtop.serve.exporter import Exposition

    backends = [SimBackend("gpu1", "vllm")]
    async with Simulator(backends) as sim:
        rules = (AlertRule("vllm:num_requests_waiting", above=5), AlertRule("vllm:not_a_real_series", above=0.5))
        config = Config(backends=(BackendConfig("gpu1", "vllm", sim.url("gpu1"), tuple(backends[0].models), alerts=rules),))
        async with Engine(config, StateStore(tmp_path / "s.json")) as engine:
            await engine.run_round()
            text = Exposition(engine.snapshot, lambda: ("healthy", "degraded")).render(False).decode()
            b = engine.snapshot().backends[0]
    got = samples(text)
    base = {"backend": "gpu1", "provider": "vllm"}
    assert got[("llmtop_backend_alert_tripped", tuple(sorted({**base, "rule": "vllm:num_requests_waiting > 5"}.items())))] == 0
    assert not any("not_a_real_series" in str(key) for key in got)  # unknown: no series, as for the missing models
    assert "not_a_real_series not exposed" in b.alerts_unknown


async def test_an_event_stream_client_that_stops_reading_is_let_go(tmp_path, monkeypatch):
    import socket

    import llmtop.serve.http as http

    monkeypatch.setattr(http, "WRITE_S", 0.5)
    async with serving(tmp_path) as (engine, _client, _agent, _sim):
        await first_round(engine)
        before = len(engine._listeners)
        sock = socket.create_connection(("127.0.0.1", _client.base_url.port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(b"GET /api/v1/events HTTP/1.1\r\nHost: x\r\n\r\n")  # and never reads again
        try:
            await until(lambda: _listeners(engine, before + 1), "the stream to subscribe")
            for _ in range(40):  # 16 MB: far more than the kernel's and the transport's buffers hold
                for _ in range(10):
                    engine.emit(Event(0.0, "ok", "probe", "x" * 40_000))
                await asyncio.sleep(0.01)
            await until(lambda: _listeners(engine, before), "the stalled client to be let go")
        finally:
            sock.close()


async def _listeners(engine: Engine, n: int) -> bool:
    return len(engine._listeners) == n


async def test_an_admin_action_the_state_file_refuses_is_one_line_not_a_500(tmp_path, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "s3cret-admin-token")
    async with serving(tmp_path) as (engine, client, _agent, _sim):
        engine.state.path.mkdir()  # the state file's path is a directory now: nothing can be written
        r = await client.post("/api/v1/backends/ok/drain", headers={"Authorization": "Bearer s3cret-admin-token"})
    assert r.status_code == 503 and r.text.startswith("not changed: ") and r.text.count("\n") == 1
    assert any(e.kind == "state" and e.level == "error" for e in engine.events)
