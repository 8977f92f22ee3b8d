"""Remote fleets: what an agent sends one connected screen, and the screen attached to many agents.

1. Bytes per second a real `llmtop serve` over 500 simulated backends sends one event-stream
   client in steady state, beside the size of one full fleet document (target: changes only, well
   under one full document per second).
2. The TUI attached to 10 agents of 300 backends each (3,000 rows), 200x50: steady CPU of the
   screen's process with nobody typing, key-to-screen latency (as bench_tui.py measures it), and
   its memory. The agents are fakes in a child process (_fakeagents.py) that send what a real
   agent sends (documents made by BackendSnapshot.to_json; each backend changes every 5 s), so
   the figures are the screen's own cost. Targets: key-to-screen p95 under 100 ms, steady CPU
   under 25 % of a core.

Run: .venv/bin/python benchmarks/bench_remote.py [--agents 10] [--backends 300] [--steady 20] [--presses 20] [--seconds 30]
Prints figures only; there are no pass/fail thresholds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import httpx  # noqa: E402
from _simproc import SimProcess, cpu_reference, wait_ready, write_config  # noqa: E402
from bench_tui import SIZE, FrameWatch, measure_keys, rows_shown  # noqa: E402

from llmtop.transport import shared_ssl_context  # noqa: E402

HERE = Path(__file__).parent


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def agent_bytes(args) -> None:
    spec = [{"name": f"sim-{i:04d}"} for i in range(args.serve_backends)]
    with SimProcess(spec) as base_url, tempfile.TemporaryDirectory() as tmp:
        wait_ready(base_url)
        config = write_config(base_url, spec, {"health_interval_s": 5.0, "probe_interval_s": 60.0})
        port = 19850 + os.getpid() % 1000
        proc = subprocess.Popen(
            [sys.executable, "-m", "llmtop", "serve", "--config", str(config), "--state", f"{tmp}/s.json", "--listen", f"127.0.0.1:{port}"],
            stderr=subprocess.DEVNULL,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(f"{url}/readyz", timeout=2, trust_env=False, verify=shared_ssl_context()).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("serve never became ready")
                time.sleep(0.2)
            time.sleep(5)  # past the first probes
            fleet_bytes = len(httpx.get(f"{url}/api/v1/fleet", timeout=30, trust_env=False, verify=shared_ssl_context()).content)
            with httpx.stream("GET", f"{url}/api/v1/events", timeout=60, trust_env=False, verify=shared_ssl_context()) as response:
                chunks = response.iter_raw()
                first = b""
                while b"\n\n" not in first:  # the whole fleet, first
                    first += next(chunks)
                got, events, started = 0, 0, time.monotonic()
                for chunk in chunks:
                    got += len(chunk)
                    events += chunk.count(b"\nevent: ") + chunk.startswith(b"event: ")
                    if time.monotonic() - started > args.seconds:
                        break
                took = time.monotonic() - started
            print(f"agent over {args.serve_backends} backends (health every 5 s, probes every 60 s), over {took:.0f} s:")
            print(f"  one full fleet document: {fleet_bytes / 1024:.0f} KiB")
            print(f"  event stream, steady: {got / took / 1024:.1f} KiB/s, {events / took:.0f} events/s "
                  f"= {got / took / fleet_bytes:.2f} full documents per second")
        finally:
            proc.terminate()
            proc.wait(timeout=10)
            config.unlink(missing_ok=True)


async def screen(args) -> None:
    from llmtop.config import Config
    from llmtop.engine import Engine
    from llmtop.remote.agents import AgentSource
    from llmtop.state import StateStore
    from llmtop.tui.app import LlmtopApp
    from llmtop.tui.widgets.fleet_table import FleetTable

    fake = subprocess.Popen([sys.executable, str(HERE / "_fakeagents.py"), str(args.agents), str(args.backends), "5"], stdout=subprocess.PIPE, text=True)
    try:
        base = fake.stdout.readline().strip()
        rss0 = rss_mb()
        sources = [AgentSource(f"{base}/agent{k}", f"agent{k}") for k in range(args.agents)]
        with tempfile.TemporaryDirectory() as tmp:
            app = LlmtopApp(Engine(Config(), StateStore(Path(tmp) / "s.json")), config_path=None, sources=sources, settle_heap=True)
            async with app.run_test(size=SIZE) as pilot:
                watch = FrameWatch(app)
                table = app.screen.query_one(FleetTable)
                total = args.agents * args.backends
                took = await rows_shown(table, total)
                print(f"screen over {args.agents} agents x {args.backends} backends = {total} rows, {SIZE[0]}x{SIZE[1]}:")
                print(f"  all rows shown {took:.1f} s after start")
                await asyncio.sleep(3)
                frames, cpu0, wall0 = watch.frames, time.process_time(), time.perf_counter()
                await asyncio.sleep(args.steady)
                cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
                print(f"  nobody typing, over {wall:.1f} s: CPU {100 * cpu / wall:.1f}% of one core, {(watch.frames - frames) / wall:.1f} frames/s")
                print(f"  memory: {rss_mb():.0f} MB RSS ({rss_mb() - rss0:.0f} MB more than before the screen)")
                await measure_keys(watch, pilot, table, args.presses, "a3-sim")
                await pilot.press("q")
    finally:
        fake.terminate()
        fake.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=10)
    parser.add_argument("--backends", type=int, default=300, help="backends per agent for the screen")
    parser.add_argument("--serve-backends", type=int, default=500, help="backends of the real agent whose stream is measured")
    parser.add_argument("--seconds", type=float, default=30.0, help="seconds of event stream to measure")
    parser.add_argument("--steady", type=float, default=20.0)
    parser.add_argument("--presses", type=int, default=20)
    parser.add_argument("--skip-bytes", action="store_true")
    args = parser.parse_args()
    print(cpu_reference())
    if not args.skip_bytes:
        agent_bytes(args)
    asyncio.run(screen(args))


if __name__ == "__main__":
    main()
