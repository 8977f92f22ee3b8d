"""The Prometheus source over 3,000 backends: a real Prometheus scrapes 10 synthetic agents of 300
backends each (llmtop's own exporter over made-up fleet snapshots), and PrometheusSource.refresh()
is timed: the first one (with its backfill of the sparklines), then steady ones, then history().

Target (issue #10): a full refresh of 3,000 backends within 2 s.
With --screen, also the live screen over the same source (200x50): key-to-screen latency as in
bench_tui.py, while the source refreshes every 5 s beside it.
Run: .venv/bin/python benchmarks/bench_prometheus.py [--agents 10] [--per-agent 300] [--warmup 110] [--runs 10] [--screen]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _simproc import cpu_reference, median, percentile  # noqa: E402

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the synthetic agents (a child process, so their rendering never competes with the source) ---------------


def synthetic_fleet(agent: int, n: int, now: float, rng: random.Random):
    from llmtop.snapshot import BackendSnapshot, Counters, FleetSnapshot, GpuStatus, Metrics, ProbeSummary

    backends = []
    for i in range(n):
        kind = rng.random()
        status = "healthy" if kind < 0.9 else "degraded" if kind < 0.95 else "down"
        probe = None
        if status != "down":
            probe = ProbeSummary(model=MODEL, ttft_ms=rng.uniform(30, 400), tokens_per_s=rng.uniform(20, 150), output_tokens=8,
                                 tokens_estimated=False, error=None, at=now - rng.uniform(0, 60))
        expected = (MODEL, "extra-model") if status == "degraded" else (MODEL,)
        backends.append(BackendSnapshot(
            name=f"a{agent:02d}-b{i:04d}", provider="vllm", url=f"http://10.{agent}.{i // 250}.{i % 250}:8000", status=status,
            status_reason=None, circuit="open" if status == "down" else "closed", admin="draining" if i % 50 == 7 else "active",
            enabled=True, latency_ms=None if status == "down" else rng.uniform(0.5, 20), models=(MODEL,), expected_models=expected,
            missing_models=("extra-model",) if status == "degraded" else (), alerts=(),
            metrics=Metrics(requests_running=rng.randint(0, 8), requests_waiting=rng.randint(0, 4), kv_cache_usage=rng.random()),
            probe=probe, error=None, error_rate=0.0, last_health_at=now, retry_after_at=None, probe_tokens_per_hour=480.0,
            models_total=1, last_ok_probe=probe, counters=Counters(probes=100, probe_tokens=800, last_success_at=probe and probe.at),
            labels=(("region", f"r{agent % 3}"), ("team", "ml")), up=status != "down",
        ))
    return FleetSnapshot(at=now, backends=tuple(backends), gpu=GpuStatus(message="no NVIDIA GPU"), events=())


def serve_agents(ports: list[int], per_agent: int) -> None:
    """Each port answers /metrics for one agent's fleet, whose figures change every 5 s (as probes and polls would)."""
    from aiohttp import web

    from llmtop.serve.exporter import Exposition

    async def main() -> None:
        runners = []
        for agent, port in enumerate(ports):
            rng = random.Random(agent)
            held = {"at": 0.0, "fleet": None}

            def snapshot(agent=agent, rng=rng, held=held):
                now = time.time()
                if now - held["at"] >= 5.0:
                    held["at"], held["fleet"] = now, synthetic_fleet(agent, per_agent, now, rng)
                return held["fleet"]

            exposition = Exposition(snapshot, lambda: ("healthy", "degraded"))

            async def metrics(request, exposition=exposition):
                body, content_type = exposition.answer(request.headers.get("Accept", ""))
                return web.Response(body=body, headers={"Content-Type": content_type})

            app = web.Application()
            app.router.add_get("/metrics", metrics)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            runners.append(runner)
        print("ready", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


# -- the measurement ----------------------------------------------------------------------------------------------


async def until(condition, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        await asyncio.sleep(1.0)


def report(sizes: list[tuple[str, int, float]]) -> None:
    for kind in ("instant", "range"):
        mine = [(size, took) for name, size, took in sizes if name == kind]
        if mine:
            print(f"    {len(mine)} {kind} queries: {sum(s for s, _ in mine) / 1024:.0f} KiB of answers;"
                  f" each answered in {min(t for _, t in mine) * 1000:.0f} to {max(t for _, t in mine) * 1000:.0f} ms (sent together)")


async def measure(url: str, total: int, runs: int) -> None:
    from llmtop.remote.prometheus import HISTORY_POINTS, PrometheusSource

    source = PrometheusSource(url, '{job="llmtop"}', refresh_s=5.0)
    sizes: list[tuple[str, int, float]] = []
    fetch = source._get


    async def timed_get(path, params):  # the size and time of each answer, to say where a refresh goes
        start = time.perf_counter()
        body = await fetch(path, params)
        sizes.append(("range" if path.endswith("query_range") else "instant", len(body), time.perf_counter() - start))
        return body

    source._get = timed_get
    try:
        cpu = time.process_time()
        state = await source.refresh()
        first, first_cpu = source.last_refresh_s, time.process_time() - cpu
        rows = source.backends()
        held = sum(len(b.ttft_history) + len(b.tps_history) + len(b.latency_history) + len(b.queue_history) for b in rows)
        print(f"  first refresh: the rows shown after {source.last_table_s * 1000:.0f} ms (target < 2000 ms);"
              f" with the sparklines' backfill after them {first * 1000:.0f} ms wall, {first_cpu * 1000:.0f} ms CPU in this process;"
              f" {state.standing}, {len(rows)} rows of {total}; {held} sparkline points held")
        report(sizes)
        times, cpus = [], []
        for _ in range(runs):
            await asyncio.sleep(source.history_step_s)  # as the refresh loop would: each refresh has new sparkline points
            sizes.clear()
            cpu = time.process_time()
            await source.refresh()
            times.append(source.last_refresh_s)
            cpus.append(time.process_time() - cpu)
        assert len(source.backends()) == total and source.state().standing == "connected", source.state()
        stale = sum(b.stale_since is not None for b in source.backends())
        if stale:  # figures over rows Prometheus no longer has are not figures of a full refresh
            print(f"  warning: {stale} of {total} rows are stale (their agents' scrapes failed: this machine is too loaded to trust these figures)")
        print(f"  steady refresh of {total} backends, {runs} runs: median {median(times) * 1000:.0f} ms, p95 {percentile(times, 95) * 1000:.0f} ms,"
              f" max {max(times) * 1000:.0f} ms wall (target < 2000 ms); CPU in this process median {median(cpus) * 1000:.0f} ms")
        report(sizes)
        sample = random.Random(1).sample(rows, 20)
        took = []
        for b in sample:
            start = time.perf_counter()
            h = await source.history(b.agent, b.name, 600)
            took.append(time.perf_counter() - start)
        print(f"  history() of one backend over 600 s (a detail chart): median {median(took) * 1000:.1f} ms, p95 {percentile(took, 95) * 1000:.1f} ms;"
              f" {len(h['latency'])} latency points of at most {HISTORY_POINTS}")
        full = PrometheusSource(url, '{job="llmtop"}', backfill_points=total * 4 * HISTORY_POINTS)
        await full.refresh()
        held = sum(len(b.latency_history) for b in full.backends()) / max(1, len(full.backends()))
        print(f"  a first refresh that fills all of every sparkline's window (backfill_points={total * 4 * HISTORY_POINTS:,}):"
              f" {full.last_refresh_s * 1000:.0f} ms wall, {held:.0f} latency points a backend (as far as Prometheus holds data)")
        await full.stop()
        print(f"  this process's peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    finally:
        await source.stop()


async def screen(url: str, total: int, presses: int) -> None:
    """Key-to-screen of the live screen reading this Prometheus (what `llmtop --prometheus URL` runs)."""
    from bench_tui import SIZE, FrameWatch, measure_keys, rows_shown

    from llmtop.config import Config
    from llmtop.engine import Engine
    from llmtop.remote.prometheus import PrometheusSource
    from llmtop.state import StateStore
    from llmtop.tui.app import LlmtopApp
    from llmtop.tui.widgets.fleet_table import FleetTable

    source = PrometheusSource(url, '{job="llmtop"}', refresh_s=5.0)
    with tempfile.TemporaryDirectory() as tmp:
        app = LlmtopApp(Engine(Config(), StateStore(Path(tmp) / "s.json")), config_path=None, sources=[source], settle_heap=True)
        async with app.run_test(size=SIZE) as pilot:
            watch = FrameWatch(app)
            table = app.screen.query_one(FleetTable)
            took = await rows_shown(table, total)
            print(f"  the screen over it, {SIZE[0]}x{SIZE[1]}: all {total} rows shown {took:.1f} s after start")
            await asyncio.sleep(6)  # past the backfill, into steady refreshes
            cpu0, wall0 = time.process_time(), time.perf_counter()
            await asyncio.sleep(20)
            print(f"  nobody typing, over 20 s: CPU {100 * (time.process_time() - cpu0) / (time.perf_counter() - wall0):.1f}% of one core")
            await measure_keys(watch, pilot, table, presses, "a03-b01")
            await pilot.press("q")


async def run(args) -> None:
    import httpx

    total = args.agents * args.per_agent
    ports = [free_port() for _ in range(args.agents)]
    agents = subprocess.Popen([sys.executable, __file__, "--serve", json.dumps(ports), "--per-agent", str(args.per_agent)],
                              stdout=subprocess.PIPE, text=True)
    tmp = Path(tempfile.mkdtemp(prefix="llmtop-bench-prom-"))
    port = free_port()
    targets = [f"127.0.0.1:{p}" for p in ports]
    (tmp / "prometheus.yml").write_text(
        f"global: {{scrape_interval: {int(args.scrape_interval * 1000)}ms, scrape_timeout: {int(args.scrape_interval * 1000)}ms}}\n"
        f"scrape_configs:\n  - job_name: llmtop\n    static_configs: [{{targets: {json.dumps(targets)}}}]\n"
    )
    prometheus = None
    try:
        assert agents.stdout.readline().strip() == "ready"
        prometheus = subprocess.Popen(
            ["prometheus", f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=error"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        url = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(trust_env=False, timeout=30) as client:

            async def scraped() -> bool:
                if prometheus.poll() is not None:
                    raise SystemExit(f"Prometheus exited: {prometheus.stderr.read().decode()[-2000:]}")
                try:
                    r = await client.get(url + "/api/v1/query", params={"query": 'count(llmtop_backend_ready{job="llmtop"})'})
                    result = r.json()["data"]["result"]
                    return bool(result) and int(float(result[0]["value"][1])) == total
                except (httpx.HTTPError, ValueError, KeyError):
                    return False

            await until(scraped, f"Prometheus to hold all {total} backends", 300)
            series = (await client.get(url + "/api/v1/query", params={"query": 'count({job="llmtop"})'})).json()["data"]["result"][0]["value"][1]
            print(f"  Prometheus holds {total} backends in {args.agents} targets, {int(series):,} series, scraped every {args.scrape_interval} s;"
                  f" letting {args.warmup:.0f} s of history build up")
            await asyncio.sleep(args.warmup)
        await measure(url, total, args.runs)
        if args.screen:
            await screen(url, total, args.presses)
    finally:
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(30)
        agents.terminate()
        agents.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=10)
    parser.add_argument("--per-agent", type=int, default=300)
    parser.add_argument("--scrape-interval", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=110.0, help="seconds of history to let Prometheus gather first")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--screen", action="store_true", help="also measure the live screen's key-to-screen over this source")
    parser.add_argument("--presses", type=int, default=30, help="presses per measured key (--screen)")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve_agents(json.loads(args.serve), args.per_agent)
        return
    print(cpu_reference())
    print(f"Prometheus source over {args.agents} agents x {args.per_agent} backends:")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
