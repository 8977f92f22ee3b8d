"""Every remote byte is hostile: each class of issue #7 against a simulator that misbehaves on purpose, over 127.0.0.1, for every provider."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import time
import tracemalloc
import unicodedata

import pytest

import loopback
from llmtop.check import render_table, to_json
from llmtop.config import BackendConfig, Config, ConfigError, Settings, loads_config
from llmtop.engine import Engine
from llmtop.inbound import MAX_RETRY_AFTER_S
from llmtop.simulator import HOSTILE_TEXT, SimBackend, Simulator
from llmtop.snapshot import FleetSnapshot, TerminalView
from llmtop.state import StateStore
from llmtop.tracker import MODELS_KEPT

PROVIDERS = ["vllm", "sglang", "tgi", "llamacpp", "lmstudio", "litellm", "openai", "ollama", "anthropic"]
METRIC_PROVIDERS = ["vllm", "sglang", "tgi", "llamacpp", "litellm"]
KEY = "sk-QZ9x7Wq2Jv8Rt4Lm6Np0Yb"  # no piece of it occurs in any other text these tests see


def model_for(provider: str) -> str:
    return "llama3.2" if provider == "ollama" else "test-model"


def config(sim: Simulator, backends: list[SimBackend], key_env: str | None = None, **settings) -> Config:
    return Config(
        settings=Settings(**{"timeout_s": 3.0, **settings}),
        backends=tuple(
            BackendConfig(sb.name, sb.provider, sim.url(sb.name), tuple(sb.models), api_key_env=key_env) for sb in backends
        ),
    )


@pytest.fixture
def state(tmp_path):
    return StateStore(tmp_path / "state.json")


async def rounds(sim, backends, state, n=1, **kw) -> FleetSnapshot:
    async with Engine(config(sim, backends, **kw), state) as engine:
        for _ in range(n):
            await engine.run_round()
        return engine.snapshot()


def unsafe(text: str) -> list[str]:
    """Characters no terminal line may carry: controls (but the newlines between lines), format
    characters (bidi overrides), and the C1 range."""
    return [
        repr(ch) for ch in text if ch != "\n" and (unicodedata.category(ch) in ("Cc", "Cf", "Cs") or "\x80" <= ch <= "\x9f")
    ]


def all_text(snapshot: FleetSnapshot) -> str:
    """Every string a snapshot carries, as one text (what the faces could show)."""
    return json.dumps(snapshot.to_json(), ensure_ascii=False) + repr(snapshot)


# -- remote text is data, never terminal control ---------------------------------------------


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_escape_sequences_from_a_backend_never_reach_the_table(provider, state):
    sb = SimBackend(f"h-{provider}", provider, [model_for(provider)], hostile=True)
    broken = SimBackend(f"e-{provider}", provider, [model_for(provider)], hostile=True, fault="5xx")
    async with Simulator([sb, broken]) as sim:
        snap = await rounds(sim, [sb, broken], state)
    table = render_table(snap)
    assert unsafe(table) == [], table
    assert "FORGED ROW" not in table.splitlines()[0]  # no line of its own
    # The error of the broken one, on one line, with its text but none of its control.
    note = next(line for line in table.splitlines() if line.strip().startswith(broken.name))
    if provider != "sglang":  # SGLang's 503 at start reads as "starting up", quoting nothing
        assert "pwned" in note and "FORGED ROW" in note
    # JSON keeps the exact text, escaped by JSON itself.
    data = json.loads(to_json(snap))
    texts = json.dumps(data)
    assert "\\u001b" in texts and "\x1b" not in texts
    healthy = snap.backend(sb.name)
    if provider != "tgi":  # TGI serves exactly one model; its hostile text is its version
        assert any(m.startswith(f"model-{HOSTILE_TEXT}") for m in healthy.models)
    safe = TerminalView()(snap)
    assert unsafe(all_text(safe).replace("\\n", "")) == []


async def test_a_backend_with_nothing_to_clean_is_shown_as_it_is(state):
    # Sanitising copies a snapshot only when a text changes: the screen's tick over thousands of
    # remote rows was mostly copies of clean ones.
    sb = SimBackend("plain-vllm", "vllm", [model_for("vllm")])
    async with Simulator([sb]) as sim:
        snap = await rounds(sim, [sb], state)
    b = snap.backend(sb.name)
    assert b.probe is not None and b.models
    assert b.for_terminal() is b
    assert TerminalView()(snap).backend(sb.name) is b


async def test_escape_sequences_never_reach_the_live_screen(state, tmp_path):
    from llmtop.tui.app import LlmtopApp

    backends = [SimBackend("h-vllm", "vllm", hostile=True), SimBackend("h-err", "ollama", ["llama3.2"], hostile=True, fault="5xx")]
    async with Simulator(backends) as sim:
        engine = Engine(config(sim, backends), state)
        app = LlmtopApp(engine, config_path=None)
        async with app.run_test(size=(200, 50)) as pilot:
            deadline = time.monotonic() + 10
            while not (app.view and all(b.last_health_at for b in app.view.fleet.backends) and app.view.fleet.events):
                assert time.monotonic() < deadline, "no poll answered"
                await pilot.pause(0.05)
            app.refresh_fleet()
            await pilot.pause()
            screens = []
            for name in ("h-vllm", "h-err"):
                app.post_message(__import__("llmtop.tui.messages", fromlist=["x"]).DetailsRequested(name))
                await pilot.pause()
                screens.append("\n".join(strip.text for strip in app.screen._compositor.render_strips()))
                await pilot.press("escape")
                await pilot.pause()
            screens.append("\n".join(strip.text for strip in app.screen._compositor.render_strips()))
            app.notify(f"toast {HOSTILE_TEXT}")
            messages = [n.message for n in app._notifications]
    text = "\n".join(screens)
    assert "pwned" in text  # the text is shown...
    assert unsafe(text) == []  # ...without a single control, escape or bidi character
    assert all(unsafe(m) == [] for m in messages)


def test_a_config_name_with_control_characters_is_a_one_line_error():
    for bad in ("gpu\x1b[2J1", "a\u202eb", "line\nbreak"):
        text = f'[[backend]]\nname = {json.dumps(bad)}\nprovider = "vllm"\nurl = "http://h:1"\n'
        with pytest.raises(ConfigError) as err:
            loads_config(text, "fleet.toml")
        message = str(err.value)
        assert message.startswith("fleet.toml: backend[0].name:") and "\n" not in message and unsafe(message) == []


def test_config_errors_reach_stderr_safely(tmp_path):
    path = tmp_path / "fleet.toml"
    path.write_text('[settings]\n"\\u001b]0;pwned\\u0007" = 1\n')
    r = subprocess.run([sys.executable, "-m", "llmtop", "check", "--config", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert unsafe(r.stderr) == [] and "Traceback" not in r.stderr


# -- numbers from outside are checked -------------------------------------------------------


def finite_numbers(obj) -> bool:
    if isinstance(obj, float):
        return math.isfinite(obj)
    if isinstance(obj, dict):
        return all(finite_numbers(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(finite_numbers(v) for v in obj)
    return True


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_nan_and_infinity_never_enter(provider, state):
    sb = SimBackend(f"n-{provider}", provider, [model_for(provider)], fault="nan")
    async with Simulator([sb]) as sim:
        snap = await rounds(sim, [sb], state, n=2)
    b = snap.backends[0]
    assert b.status == "healthy", b.status_reason
    assert finite_numbers(snap.to_json())
    messages = [m for _, m in b.recent_errors]
    assert len(messages) == len(set(messages))  # a note seen every poll is one line, not one per poll
    data = json.loads(to_json(snap), parse_constant=lambda c: pytest.fail(f"{c} in check --json"))
    metrics = data["backends"][0]["metrics"]
    if provider in METRIC_PROVIDERS:
        assert "kv_cache_usage" not in metrics and "requests_waiting" not in metrics  # absent, not NaN
        assert any("not a finite number" in m for _, m in b.recent_errors)  # and why
    if provider in ("openai", "vllm", "sglang", "lmstudio", "litellm", "tgi", "llamacpp"):
        assert b.probe.tokens_estimated  # a NaN usage count is no count: the chunks are counted instead
        assert any("NaN is not a number" in m for _, m in b.recent_errors)
    if provider in ("ollama", "llamacpp"):
        assert b.probe.server_tokens_per_s is None and b.probe.load_ms is None


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_a_retry_after_of_millennia_pauses_a_backend_for_at_most_the_clamp(provider, state):
    sb = SimBackend(f"r-{provider}", provider, [model_for(provider)], fault="retry_forever")
    async with Simulator([sb]) as sim:
        async with Engine(config(sim, [sb]), state) as engine:
            for _ in range(4):
                await engine.run_round()
            b = engine.snapshot().backends[0]
            tracker = engine.trackers[sb.name]
            assert tracker.retry_after_until - engine.clock() <= MAX_RETRY_AFTER_S
    assert b.status == "degraded" and "rate limited" in b.status_reason
    assert b.circuit == "closed"  # a rate limit is the backend protecting itself, not failing
    assert b.retry_after_at is not None and b.retry_after_at - time.time() <= MAX_RETRY_AFTER_S + 1
    time.strftime("%H:%M:%S", time.localtime(b.retry_after_at))  # a time a clock can print


async def test_a_429_on_probes_is_rate_limited_not_a_failure(state):
    sb = SimBackend("ratelimited", "openai", ["gpt-4o-mini"], fault="429", fault_arg=45)
    async with Simulator([sb]) as sim:
        async with Engine(config(sim, [sb], probe_interval_s=0.01), state) as engine:
            for _ in range(6):
                engine.trackers[sb.name].retry_after_until = None  # as if each Retry-After had passed
                await engine.run_round()
            b = engine.snapshot().backends[0]
    assert b.circuit == "closed" and b.status == "degraded" and b.status_reason == "rate limited (429)"
    assert 40 <= b.retry_after_at - time.time() <= 46


# -- secrets stay secret ----------------------------------------------------------------------


@pytest.mark.parametrize("provider", ["vllm", "tgi", "llamacpp", "lmstudio", "litellm", "openai", "anthropic", "sglang"])
async def test_a_server_that_echoes_the_key_leaks_none_of_it(provider, state, monkeypatch):
    monkeypatch.setenv("THE_KEY", KEY)
    sb = SimBackend(f"k-{provider}", provider, [model_for(provider)], api_key=KEY, echo_headers=True, fault="5xx")
    async with Simulator([sb]) as sim:
        snap = await rounds(sim, [sb], state, key_env="THE_KEY")
    b = snap.backends[0]
    text = all_text(snap) + render_table(snap)
    assert b.status in ("down", "loading") and "you sent" in text  # the echo is there (SGLang's 503 reads as starting up)...
    for n in range(4, len(KEY) + 1):  # ...and not one piece of the key of four characters or more
        for i in range(len(KEY) - n + 1):
            assert KEY[i : i + n] not in text, KEY[i : i + n]


def test_a_url_with_a_password_is_refused_without_printing_it():
    text = '[[backend]]\nname = "g"\nprovider = "vllm"\nurl = "http://admin:hunter2-s3cret@10.0.0.5:8000"\n'
    with pytest.raises(ConfigError) as err:
        loads_config(text, "fleet.toml")
    message = str(err.value)
    assert "hunter2" not in message and "admin" not in message and "***@10.0.0.5:8000" in message
    assert "api_key_env" in message


# -- resources are bounded by llmtop --------------------------------------------------------


@pytest.mark.parametrize("provider", ["vllm", "ollama", "openai"])
async def test_a_gzip_bomb_costs_bounded_memory_and_reads_as_what_it_is(provider, state):
    sb = SimBackend(f"g-{provider}", provider, [model_for(provider)], fault="gzip_bomb")
    async with Simulator([sb]) as sim:
        sim_bomb = __import__("llmtop.simulator", fromlist=["_gzip_bomb"])._gzip_bomb()  # made before measuring
        assert len(sim_bomb) < 1024 * 1024
        tracemalloc.start()
        try:
            snap = await rounds(sim, [sb], state)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    b = snap.backends[0]
    assert peak < 40 * 1024 * 1024  # 100 MiB inflated would be 100 MiB; the caps hold it to a few
    assert b.models is None and "MiB" in (b.models_error or "")
    assert b.status in ("degraded", "down") and b.models_summary() == "?/1"


@pytest.mark.parametrize("provider", ["vllm", "ollama", "anthropic"])
async def test_a_model_list_of_any_length_keeps_a_bounded_number_and_its_total(provider, state):
    model = model_for(provider)
    sb = SimBackend(f"m-{provider}", provider, [model], fault="many_models", fault_arg=100_000)
    async with Simulator([sb]) as sim:
        snap = await rounds(sim, [sb], state)
    b = snap.backends[0]
    assert b.models_total == 100_001 and len(b.models) == MODELS_KEPT
    assert b.missing_models == ()  # the expected model is last in the list, past what is kept
    assert b.models_summary() == "1/1"


# -- no figure claims more than was measured --------------------------------------------------


@pytest.mark.parametrize("provider", ["vllm", "sglang", "tgi", "llamacpp", "litellm", "ollama"])
async def test_an_unreadable_model_list_is_unknown_not_all_served(provider, state):
    sb = SimBackend(f"u-{provider}", provider, [model_for(provider)], fault="huge_body", fault_arg=9)
    async with Simulator([sb]) as sim:
        snap = await rounds(sim, [sb], state)
    b = snap.backends[0]
    assert b.models is None and b.status == "degraded" and "model list unknown" in b.status_reason
    assert b.models_summary() == "?/1"
    assert json.loads(to_json(snap))["backends"][0]["missing_models"] is None


async def test_figures_from_before_a_failure_are_shown_as_old(state):
    # Two tokens 100 ms apart: the first is read alone, so timed, even on a loaded core (10 ms
    # apart, a loop late by that much read both together, twice, and the probe was honestly untimed).
    sb = SimBackend("fall", "vllm", gap_ms=100, output_tokens=2)
    async with Simulator([sb]) as sim:
        async with Engine(config(sim, [sb], timeout_s=1.0), state) as engine:
            await engine.run_round()
            ok = engine.snapshot()
            assert ok.backends[0].figures_current(ok.at)
            sb.fault = "5xx"
            await engine.run_round()
            down = engine.snapshot()
    b = down.backends[0]
    assert b.status == "down" and not b.figures_current(down.at)
    assert b.last_ok_probe is not None and b.last_ok_probe.ttft_ms is not None
    line = next(line for line in render_table(down).splitlines() if line.startswith("DOWN"))
    assert f"({b.last_ok_probe.ttft_ms:.1f})" in line  # the old figure, in parentheses
    assert json.loads(to_json(down))["backends"][0]["probe_current"] is False


@pytest.mark.parametrize("provider", ["vllm", "openai", "lmstudio", "anthropic"])
async def test_a_backend_without_expected_models_is_probed_with_one_it_serves(provider, state):
    sb = SimBackend(f"p-{provider}", provider, ["served-one", "served-two"], gap_ms=100, output_tokens=2)  # timed even when read late
    async with Simulator([sb]) as sim:
        cfg = config(sim, [sb])
        cfg = Config(settings=cfg.settings, backends=(BackendConfig(sb.name, provider, sim.url(sb.name)),))
        async with Engine(cfg, state) as engine:
            await engine.run_round()  # the poll learns the list
            await engine.run_round()
            b = engine.snapshot().backends[0]
    assert b.probe is not None and b.probe.model == "served-one" and b.probe.ttft_ms is not None
    assert b.status == "healthy"


async def test_a_backend_that_serves_nothing_says_it_is_not_probed(state):
    sb = SimBackend("empty", "vllm", [])
    async with Simulator([sb]) as sim:
        cfg = Config(settings=Settings(timeout_s=3.0), backends=(BackendConfig("empty", "vllm", sim.url("empty")),))
        async with Engine(cfg, state) as engine:
            await engine.run_round()
            b = engine.snapshot().backends[0]
    assert b.probe is None and b.status == "degraded" and "not probed" in b.status_reason
    assert "not probed" in render_table(engine.snapshot())


# -- local servers are not disturbed by being watched ----------------------------------------


async def test_ollama_probes_only_loaded_models_and_leaves_their_residency(state):
    sb = SimBackend("ol", "ollama", ["llama3.2", "qwen2.5:7b"], loaded=["qwen2.5:7b"], keep_alive_s=120)
    async with Simulator([sb]) as sim:
        async with Engine(config(sim, [sb]), state) as engine:
            await engine.run_round()
            await engine.run_round()
            b = engine.snapshot().backends[0]
    # llama3.2 (the first expected) is not loaded: the loaded qwen2.5:7b is probed instead.
    assert b.probe.model == "qwen2.5:7b" and b.status == "healthy"
    assert all(body["model"] == "qwen2.5:7b" for body in sb.bodies)
    assert 110 <= sb.bodies[-1]["keep_alive"] <= 120  # what it had left: the probe extends nothing


async def test_ollama_with_nothing_loaded_is_not_probed_unless_asked(state, tmp_path):
    sb = SimBackend("ol", "ollama", ["llama3.2"], loaded=[])
    async with Simulator([sb]) as sim:
        async with Engine(config(sim, [sb]), state) as engine:
            await engine.run_round()
            b = engine.snapshot().backends[0]
        assert sb.bodies == [] and b.status == "healthy" and "not loaded" in b.probe_note
        cfg = loads_config(
            f'[[backend]]\nname = "ol"\nprovider = "ollama"\nurl = "{sim.url("ol")}"\nmodels = ["llama3.2"]\nprobe_unloaded = true\n'
        )
        async with Engine(cfg, StateStore(tmp_path / "s2.json")) as engine:
            await engine.run_round()
            await engine.run_round()
    assert sb.bodies and sb.bodies[-1]["keep_alive"] == 0  # loaded for the probe, unloaded right after


async def test_ollama_models_kept_for_good_stay_kept_for_good(state):
    sb = SimBackend("ol", "ollama", ["llama3.2"], keep_alive_s=-1)
    async with Simulator([sb]) as sim:
        async with Engine(config(sim, [sb]), state) as engine:
            await engine.run_round()
            await engine.run_round()
    assert sb.bodies[-1]["keep_alive"] == -1


# -- the demo shows one -------------------------------------------------------------------------


def test_the_demo_fleet_has_a_hostile_backend():
    from llmtop.simulator import demo_fleet

    hostile = [b for b in demo_fleet(seed=1) if b.hostile]
    assert hostile and hostile[0].fault == "nan"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs a POSIX shell environment")
def test_check_demo_table_is_safe_and_json_exact(tmp_path):
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path)}
    run = [sys.executable, "-m", "llmtop", "check", "--demo", "--state", str(tmp_path / "s.json")]
    table = subprocess.run(run, capture_output=True, text=True, timeout=120, env=env)
    assert "vllm-hostile" in table.stdout and unsafe(table.stdout) == []
    data = subprocess.run([*run, "--json"], capture_output=True, text=True, timeout=120, env=env)
    hostile = next(b for b in json.loads(data.stdout)["backends"] if b["name"] == "vllm-hostile")
    assert f"model-{HOSTILE_TEXT}" in hostile["models"]


async def test_a_rate_that_overflows_from_finite_inputs_breaks_nothing(state):
    """eval_count over a 1e-300 ns eval_duration: each input finite, the rate infinite. It must read
    as absent, and check --json and serve's fleet document must stay valid for every backend."""
    from llmtop.serve.http import ServeSite

    sb = SimBackend("ol", "ollama", ["llama3.2"])
    async with Simulator([sb]) as sim:
        original = sim._answer

        async def tiny_durations(backend, req):
            response = await original(backend, req)
            if req.path == "/api/chat" and not isinstance(response.body, bytes):
                inner = response.body

                async def rewritten():
                    async for piece in inner:
                        if b'"done":true' in piece:
                            piece = piece.replace(b'"eval_duration":', b'"eval_duration":1e-300,"x":')
                        yield piece

                response.body = rewritten()
            return response

        sim._answer = tiny_durations
        async with Engine(config(sim, [sb]), state) as engine:
            await engine.run_round()
            snap = engine.snapshot()
            site = ServeSite(engine, "127.0.0.1:0")
            await site.start()
            try:
                async with loopback.AsyncClient(trust_env=False) as client:
                    fleet = await client.get(f"http://127.0.0.1:{site.port}/api/v1/fleet")
            finally:
                await site.stop()
    assert snap.backends[0].probe.server_tokens_per_s is None
    json.loads(to_json(snap))
    assert fleet.status_code == 200 and fleet.json()["backends"][0]["name"] == "ol"


async def test_figures_from_before_an_outage_stay_old_after_the_backend_is_back(state):
    sb = SimBackend("gpu1", "vllm", gap_ms=100, output_tokens=2)  # timed even when read late
    async with Simulator([sb]) as sim:
        async with Engine(config(sim, [sb], timeout_s=1.0), state) as engine:
            await engine.run_round()  # a probe measures
            sb.fault = "reset"
            await engine.run_round(probe=False)  # down: the figures are from before it
            sb.fault = None
            await engine.run_round(probe=False)  # back, and no probe since
            back = engine.snapshot()
            await engine.run_round()  # a probe after the outage
            probed = engine.snapshot()
    b = back.backends[0]
    assert b.status != "down" and not b.figures_current(back.at)  # still the old figures: shown as old
    assert json.loads(to_json(back))["backends"][0]["probe_current"] is False
    assert probed.backends[0].figures_current(probed.at)


async def test_a_disabled_backend_shows_no_frozen_gauges_as_live(state, tmp_path):
    from llmtop.serve.exporter import Exposition

    sb = SimBackend("gpu1", "vllm", waiting=3, kv_cache=0.97)
    async with Simulator([sb]) as sim:
        async with Engine(config(sim, [sb]), state) as engine:
            await engine.run_round()
            assert engine.snapshot().backends[0].metrics.requests_waiting == 3
            await engine.set_admin("gpu1", "disabled")
            sb.waiting, sb.kv_cache = 0, 0.1  # what it does now, which nobody asks while it is disabled
            await engine.run_round()
            b = engine.snapshot().backends[0]
            text = Exposition(engine.snapshot, lambda: ("healthy", "degraded")).render(False).decode()
    assert b.metrics is None and b.latency_ms is None and b.up is None
    assert "llmtop_backend_kv_cache_usage_ratio{" not in text and "llmtop_backend_up{" not in text


async def test_a_reload_that_expects_another_model_judges_it_at_once(state):
    sb = SimBackend("gpu1", "vllm")
    async with Simulator([sb]) as sim:
        async with Engine(config(sim, [sb]), state) as engine:
            await engine.run_round()
            await engine.set_admin("gpu1", "disabled")  # no poll will come to correct it
            c = engine.config
            wider = BackendConfig("gpu1", "vllm", sim.url("gpu1"), (*sb.models, "not-served-model"))
            engine.reload(Config(settings=c.settings, breaker=c.breaker, backends=(wider,)))
            b = engine.snapshot().backends[0]
    assert b.missing_models == ("not-served-model",) and b.models_summary() == "1/2"


async def test_an_agents_name_from_outside_never_reaches_the_screen_raw(state, tmp_path):
    # A Prometheus row's agent is a label the exporter chose, and an agent names its own rows:
    # the agent column and the details print it like any other text from outside.
    from fixed_source import FixedSource

    from llmtop.tui.app import LlmtopApp
    from llmtop.tui.messages import DetailsRequested

    engine = Engine(Config(), state)
    (row,) = Engine(Config(backends=(BackendConfig("b1", "vllm", "http://127.0.0.1:9", ("m",)),)), state).snapshot().backends
    source = FixedSource(f"agent {HOSTILE_TEXT}", [row], "connected")
    app = LlmtopApp(engine, config_path=None, live=False, sources=[source])
    from llmtop.tui.screens.detail import DetailScreen

    def screen_text() -> str:
        return "\n".join(strip.text for strip in app.screen._compositor.render_strips())

    async def until(condition, what: str) -> None:
        deadline = time.monotonic() + 30  # outer bound only
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            await pilot.pause(0.05)

    async with app.run_test(size=(200, 50)) as pilot:
        await until(lambda: "pwned" in screen_text(), "the row drawn with its agent")
        shown = [screen_text()]
        app.post_message(DetailsRequested(app.view.fleet.backends[0].name))
        await until(lambda: isinstance(app.screen, DetailScreen) and "via agent" in screen_text(), "the details drawn")
        shown.append(screen_text())
    text = "\n".join(shown)
    assert "pwned" in text  # the agent's name is shown...
    assert unsafe(text) == []  # ...without a single control, escape or bidi character
    table = render_table(dataclasses.replace(engine.snapshot(), backends=source.backends()))  # `check --connect`'s AGENT column
    assert "pwned" in table and unsafe(table) == []
