"""`llmtop serve` watching 500 simulated backends: /metrics scrape time and size, readiness under
1,000 requests/s, the probes' TTFT error with and without that load, and serve's memory.

Targets (issue #9): scrape under 50 ms; readiness p99 under 5 ms at 1,000 requests/s; no change
of TTFT error beyond noise; memory under 100 MB. To measure an older commit, run this file from
that commit's checkout as the working directory (`python -m llmtop` puts it first on sys.path;
PYTHONPATH alone does not).
Run: .venv/bin/python benchmarks/bench_serve.py [--backends 500] [--seconds 15]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _simproc import SimProcess, cpu_reference, median, percentile, write_config  # noqa: E402

from bench_check_fleet import _pss_mb, _tree, fleet  # noqa: E402

PORT = 19850
FLOOR_PORT = 19859
# The floor: the same questions to a server that does nothing else, in its own process, beside serve.
TRIVIAL = r"""
import sys
from aiohttp import web
async def ready(request):
    return web.Response(text="ready\n")
app = web.Application()
app.add_routes([web.get("/backends/{name}/ready", ready)])
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=lambda *a: print("up", flush=True))
"""


async def wait_ready(client, url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if (await client.get(url + "/readyz")).status_code == 200:
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        await asyncio.sleep(0.2)
    raise SystemExit("serve did not become ready")


async def readiness_load(host: str, port: int, path: str, rate: float, seconds: float, fresh: bool = False, connections: int = 8) -> list[float]:
    """`rate` GETs per second from `connections` clients, each timed from its write (`fresh`: from
    its connect) to the end of its answer. Kept-alive connections by default; `fresh`: each
    question on a connection of its own, as kubelet and HAProxy's http-check ask. A plain asyncio
    client: cheap enough to keep the rate on one core."""
    latencies: list[float] = []
    request = f"GET {path} HTTP/1.1\r\nHost: bench\r\n{'Connection: close' + chr(13) + chr(10) if fresh else ''}\r\n".encode()
    interval = connections / rate
    end = time.perf_counter() + seconds

    async def one_client(offset: float) -> None:
        reader = writer = None
        next_at = time.perf_counter() + offset
        while next_at < end:
            delay = next_at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            start = time.perf_counter()
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - start)
            if fresh:
                writer.close()
                writer = None
            next_at += interval
        if writer is not None:
            writer.close()

    await asyncio.gather(*(one_client(i * interval / connections) for i in range(connections)))
    return latencies


async def readiness_load_apart(host: str, port: int, path: str, rate: float, seconds: float, fresh: bool = False) -> list[float]:
    """readiness_load in a process of its own: in this one, reading a 2 MB fleet document every
    2 s (the TTFT sampling beside it) held the client's loop for ~15 ms each time, and those
    waits were counted as the server's latency (they made most of the p99)."""
    child = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--load", json.dumps([host, port, path, rate, seconds, fresh]), stdout=subprocess.PIPE
    )
    out, _ = await child.communicate()
    return json.loads(out)


def ttft_errors(doc: dict, spec: dict[str, dict]) -> list[float]:
    out = []
    for b in doc["backends"]:
        p = b["probe"]
        if p and p["ttft_ms"] is not None and b["probe_current"]:
            out.append(p["ttft_ms"] - spec[b["name"]]["ttft_ms"])
    return out


async def run(base_url: str, config: Path, seconds: float, n: int, spec: list[dict]) -> None:
    import httpx

    state = Path(tempfile.mkdtemp(prefix="llmtop-bench-")) / "state.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmtop", "serve", "--config", str(config), "--state", str(state), "--listen", f"127.0.0.1:{PORT}"],
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{PORT}"
    by_name = {b["name"]: b for b in spec}
    try:
        async with httpx.AsyncClient(trust_env=False, timeout=30) as client:
            await wait_ready(client, url)
            await asyncio.sleep(3)  # let the first probe round finish
            scrapes, size = [], 0
            for _ in range(20):
                start = time.perf_counter()
                r = await client.get(url + "/metrics")
                scrapes.append(time.perf_counter() - start)
                size = len(r.content)
                await asyncio.sleep(0.2)
            print(f"  /metrics over {n} backends: median {median(scrapes) * 1000:.1f} ms, p95 {percentile(scrapes, 95) * 1000:.1f} ms"
                  f" (target < 50 ms); {size / 1024:.0f} KiB, {r.text.count(chr(10))} lines")
            if shutil.which("curl"):
                # As Prometheus scrapes: a compiled client, every 2 s (by then a few hundred backends
                # have a new snapshot), its own clock from connect to the body's last byte.
                curled = []
                for _ in range(10):
                    out = await asyncio.to_thread(
                        subprocess.run, ["curl", "-s", "-o", "/dev/null", "-w", "%{time_total}", url + "/metrics"],
                        capture_output=True, text=True,
                    )
                    curled.append(float(out.stdout))
                    await asyncio.sleep(2)
                print(f"  /metrics read by curl every 2 s: median {median(curled) * 1000:.1f} ms, p95 {percentile(curled, 95) * 1000:.1f} ms")
            quiet_errors = []
            t_end = time.monotonic() + seconds
            while time.monotonic() < t_end:
                quiet_errors += ttft_errors((await client.get(url + "/api/v1/fleet")).json(), by_name)
                await asyncio.sleep(2)
            latencies = []
            loaded_errors = []

            async def sample_ttft():
                t_end = time.monotonic() + seconds
                while time.monotonic() < t_end:
                    await asyncio.sleep(2)
                    loaded_errors.extend(ttft_errors((await client.get(url + "/api/v1/fleet")).json(), by_name))

            load, _ = await asyncio.gather(readiness_load_apart("127.0.0.1", PORT, "/backends/sim-0001/ready", 1000, seconds), sample_ttft())
            fresh = await readiness_load_apart("127.0.0.1", PORT, "/backends/sim-0001/ready", 1000, seconds, True)
            trivial = subprocess.Popen([sys.executable, "-c", TRIVIAL, str(FLOOR_PORT)], stdout=subprocess.PIPE, text=True)
            try:
                trivial.stdout.readline()
                floor = await readiness_load_apart("127.0.0.1", FLOOR_PORT, "/backends/sim-0001/ready", 1000, seconds)
                floor_fresh = await readiness_load_apart("127.0.0.1", FLOOR_PORT, "/backends/sim-0001/ready", 1000, seconds, True)
            finally:
                trivial.terminate()
                trivial.wait(10)
            print("  readiness at 1,000 requests/s (the client in a process of its own; target p99 < 5 ms), and the floor: a trivial"
                  " aiohttp server in its own process beside serve, the same load:")
            for what, serve_l, floor_l in (("kept-alive connections", load, floor), ("a connection per question", fresh, floor_fresh)):
                print(f"    {what}: serve {len(serve_l) / seconds:.0f}/s, median {median(serve_l) * 1000:.2f} ms, p99 {percentile(serve_l, 99) * 1000:.2f} ms;"
                      f" floor median {median(floor_l) * 1000:.2f} ms, p99 {percentile(floor_l, 99) * 1000:.2f} ms")
            print(f"  probe TTFT error, serve quiet: median {median(quiet_errors):+.1f} ms, p95 {percentile(quiet_errors, 95):+.1f} ms"
                  f" ({len(quiet_errors)} readings)")
            print(f"  probe TTFT error, under the readiness load: median {median(loaded_errors):+.1f} ms,"
                  f" p95 {percentile(loaded_errors, 95):+.1f} ms ({len(loaded_errors)} readings)")
            tree = _tree(proc.pid)
            print(f"  serve's memory: {_pss_mb(tree):.1f} MB PSS (target < 100 MB), of which its readiness front"
                  f" {_pss_mb([p for p in tree if p != proc.pid]):.1f} MB")
    finally:
        proc.terminate()
        proc.wait(10)


async def render_in_process(config: Path) -> tuple[float, float, float]:
    """Medians of rendering /metrics inside a process watching the fleet, the CPU a scrape costs
    without the transfer: with nothing changed since the last scrape (warm), with nothing kept
    (cold), and after a round of health polls has made every backend a new snapshot, as it has
    by the time Prometheus scrapes again every 15-60 s."""
    from llmtop.config import load_config
    from llmtop.engine import Engine
    from llmtop.serve.exporter import Exposition
    from llmtop.state import StateStore

    async with Engine(load_config(config), StateStore(Path(tempfile.mkdtemp(prefix="llmtop-bench-")) / "s.json")) as engine:
        await engine.run_round()
        warm, cold = [], []
        for _ in range(7):
            exposition = Exposition(engine.snapshot, lambda: ("healthy", "degraded"))
            start = time.perf_counter()
            exposition.render(True)
            cold.append(time.perf_counter() - start)
            start = time.perf_counter()
            exposition.render(True)
            warm.append(time.perf_counter() - start)
        polled = []
        for _ in range(5):
            await engine.run_round(probe=False)
            fleet = engine.snapshot()  # serve's engine publishes its snapshots as it goes: not a scrape's cost
            start = time.perf_counter()
            exposition.render_fleet(fleet, ("healthy", "degraded"), True)
            polled.append(time.perf_counter() - start)
        return median(warm), median(cold), median(polled)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backends", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--load", help=argparse.SUPPRESS)  # the readiness client's own process (readiness_load_apart)
    args = parser.parse_args()
    if args.load:
        print(json.dumps(asyncio.run(readiness_load(*json.loads(args.load)))))
        return 0
    print(cpu_reference())
    spec = fleet(args.backends)
    print(f"{args.backends} simulated vLLM backends (simulator in its own process), probes every 10 s, polls every 5 s")
    with SimProcess(spec) as base_url:
        config = write_config(base_url, spec, {"probe_max_tokens": 8, "timeout_s": 20, "probe_interval_s": 10, "health_interval_s": 5})
        asyncio.run(run(base_url, config, args.seconds, args.backends, spec))
        warm, cold, polled = asyncio.run(render_in_process(config))
        print(f"  /metrics rendered in the process (the CPU a scrape costs, without the transfer): {warm * 1000:.1f} ms with"
              f" nothing changed, {polled * 1000:.1f} ms after a round of health polls, {cold * 1000:.1f} ms cold")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
