"""SVG snapshots of the main, detail and help screens at 80x24, 120x40 and 200x50, over a fleet fed fixed results on a fixed clock."""

from __future__ import annotations

import time

import pytest

from llmtop.config import AlertRule, BackendConfig, Config, Settings
from llmtop.engine import Engine
from llmtop.probe import HealthResult, ModelsResult, ProbeResult
from llmtop.providers.base import PollResult
from llmtop.snapshot import GpuSnapshot, GpuStatus, Metrics
from llmtop.state import StateStore
from llmtop.tui.app import LlmtopApp
from llmtop.tui.widgets.fleet_table import FleetTable
from fixed_source import FixedSource

START = 1_750_000_000.0  # a fixed wall clock: every time on screen is derived from it
SMALL, MEDIUM, LARGE = (80, 24), (120, 40), (200, 50)
SIZES = pytest.mark.parametrize("size", [SMALL, MEDIUM, LARGE], ids=["80x24", "120x40", "200x50"])
LLAMA = "meta-llama/Llama-3.1-8B-Instruct"


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def mono(self) -> float:
        return self.t

    def wall(self) -> float:
        return START + self.t


def backend(name: str, provider: str, models: tuple[str, ...] = (LLAMA,), **kw) -> BackendConfig:
    return BackendConfig(name=name, provider=provider, url=f"http://10.0.0.{len(name)}:8000", models=models, **kw)


def poll(ok=True, latency=4.0, models=(LLAMA,), metrics: Metrics | None = None, error=None, loading=False):
    return PollResult(
        health=HealthResult(ok=ok, latency_ms=latency if ok else None, loading=loading, error=error, version="0.8.5" if ok else None),
        models=ModelsResult(models=models if ok else None, error=None if ok else error),
        metrics=metrics,
    )


def probe(ttft: float, tps: float, model: str = LLAMA, estimated=False, **server) -> ProbeResult:
    return ProbeResult(model, ok=True, ttft_ms=ttft, tokens_per_s=tps, output_tokens=8, tokens_estimated=estimated, **server)


def build_engine(tmp_path) -> Engine:
    clock = FakeClock()
    config = Config(
        settings=Settings(health_interval_s=5, probe_interval_s=60),
        backends=(
            backend("vllm-a100-1", "vllm", alerts=(AlertRule("vllm:num_requests_waiting", above=10),)),
            backend("vllm-a100-2", "vllm"),
            backend("sglang-70b", "sglang", ("meta-llama/Llama-3.3-70B-Instruct",)),
            backend("ollama-ws", "ollama", ("llama3.2", "qwen2.5:7b")),
            backend("tgi-mistral", "tgi", ("mistralai/Mistral-7B-Instruct-v0.3",)),
            backend("llamacpp-box", "llamacpp", ("qwen2.5-coder-7b",)),
            backend("litellm-gw", "litellm", ("gpt-4o-mini",)),
            backend("openai-api", "openai", ("gpt-4o-mini",)),
            backend("anthropic-api", "anthropic", ("claude-sonnet-4-5",), enabled=False),
        ),
    )
    state = StateStore(tmp_path / "state.json")
    state.set_admin("litellm-gw", "draining")
    engine = Engine(config, state, clock=clock.mono, wall=clock.wall)
    t = engine.trackers
    for i in range(24):
        clock.t += 5
        wave = (i % 6) * 6.0
        busy = Metrics(requests_running=6, requests_waiting=14 + i % 3, kv_cache_usage=0.97, server_ttft_ms=310, raw={"vllm:num_requests_waiting": 14 + i % 3, "vllm:num_requests_running": 6})
        calm = Metrics(requests_running=2, requests_waiting=0, kv_cache_usage=0.41, server_ttft_ms=28, raw={"vllm:num_requests_waiting": 0, "vllm:num_requests_running": 2, "vllm:gpu_prefix_cache_hit_rate": 0.62})
        t["vllm-a100-1"].apply_poll(poll(latency=3 + i % 4, metrics=calm))
        t["vllm-a100-1"].apply_probe(probe(30 + wave, 142 - wave))
        t["vllm-a100-2"].apply_poll(poll(latency=9 + i % 5, metrics=busy))
        t["vllm-a100-2"].apply_probe(probe(640 + wave * 20, 31 - i % 4))
        t["sglang-70b"].apply_poll(poll(models=("meta-llama/Llama-3.3-70B-Instruct",), metrics=Metrics(2, 1, 0.83)))
        t["sglang-70b"].apply_probe(probe(5600 + wave * 10, 18.5, "meta-llama/Llama-3.3-70B-Instruct"))
        t["ollama-ws"].apply_poll(poll(latency=2, models=("llama3.2:latest",)))
        t["ollama-ws"].apply_probe(probe(210 + wave, 44, "llama3.2", server_ttft_ms=180 + wave, server_tokens_per_s=47.5, load_ms=12))
        t["llamacpp-box"].apply_poll(poll(ok=False, loading=True, error="HTTP 503: Loading model"))
        t["litellm-gw"].apply_poll(poll(latency=18, models=("gpt-4o-mini", "claude-3-5-haiku")))
        t["openai-api"].apply_poll(poll(latency=160, models=("gpt-4o-mini", "gpt-4o")))
        t["openai-api"].apply_probe(probe(420 + wave, 4.2, "gpt-4o-mini", estimated=True))
        if i < 18:
            t["tgi-mistral"].apply_poll(poll(latency=7, models=("mistralai/Mistral-7B-Instruct-v0.3",)))
            t["tgi-mistral"].apply_probe(probe(95 + wave, 66, "mistralai/Mistral-7B-Instruct-v0.3"))
        else:
            t["tgi-mistral"].apply_poll(poll(ok=False, error="connect failed: connection refused"))
    clock.t += 2
    engine.gpu_status = GpuStatus(
        gpus=(
            GpuSnapshot(0, "NVIDIA H100 80GB HBM3", 87.0, 71_680.0, 81_559.0, 64.0, 512.0, 700.0),
            GpuSnapshot(1, "NVIDIA H100 80GB HBM3", 12.0, 2_048.0, 81_559.0, 41.0, 96.0, 700.0),
        )
    )
    return engine


@pytest.fixture
def engine(tmp_path, monkeypatch):
    monkeypatch.setenv("TZ", "UTC")  # event times are local times; pin them
    time.tzset()
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))  # no user themes
    yield build_engine(tmp_path)
    monkeypatch.undo()
    time.tzset()


def app_for(engine: Engine) -> LlmtopApp:
    return LlmtopApp(engine, config_path=None, live=False)


async def select(pilot, name: str) -> None:
    # The screen takes its first view once its nested widgets have mounted, after a refresh: one
    # pause was usually, not always, enough on a loaded machine. Wait for the row itself.
    deadline = time.monotonic() + 30  # outer bound only
    while not (tables := pilot.app.screen.query(FleetTable)) or name not in tables.first().names:
        assert time.monotonic() < deadline, f"no row {name!r} on screen"
        await pilot.pause()
    table = tables.first()
    table.move_cursor(row=table.get_row_index(name))
    await pilot.pause()


@SIZES
def test_main_screen(snap_compare, engine, size):
    async def pick(pilot):
        await select(pilot, "vllm-a100-2")

    assert snap_compare(app_for(engine), terminal_size=size, run_before=pick)


@SIZES
def test_detail_screen(snap_compare, engine, size):
    async def open_detail(pilot):
        await select(pilot, "ollama-ws")
        await pilot.press("enter")
        await pilot.pause()

    assert snap_compare(app_for(engine), terminal_size=size, run_before=open_detail)


@SIZES
def test_help_screen(snap_compare, engine, size):
    assert snap_compare(app_for(engine), terminal_size=size, press=["question_mark"])


@pytest.mark.parametrize("size", [SMALL, LARGE], ids=["80x24", "200x50"])
def test_merged_view_with_a_stale_agent(snap_compare, engine, size):
    """Local rows, a connected agent's (one name the same as a local one: shown as rack1/...), and
    a lost agent's, greyed as stale since the time it was lost, never as down."""
    fleet = engine.snapshot().backends
    sources = [
        FixedSource("rack1", fleet[:2], "connected"),
        FixedSource("rack2", [b for b in fleet if b.name in ("sglang-70b", "ollama-ws", "tgi-mistral")], "stale",
                    since=START + 900, detail="cannot connect (is `llmtop serve` running there?)"),
    ]
    app = LlmtopApp(engine, config_path=None, live=False, sources=sources)

    async def pick(pilot):
        await select(pilot, "rack1/vllm-a100-2")

    assert snap_compare(app, terminal_size=size, run_before=pick)
