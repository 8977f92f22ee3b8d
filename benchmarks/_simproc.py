"""Run a Simulator in a child process, so its event loop never competes with the client being measured."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SERVE = r"""
import asyncio, json, signal, sys
from llmtop.simulator import SimBackend, Simulator
spec = json.loads(sys.argv[1])
async def main():
    backends = [SimBackend(**b) for b in spec]
    async with Simulator(backends) as sim:
        print(sim.base_url, flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
asyncio.run(main())
"""


class SimProcess:
    """`with SimProcess([{"name": ..., "ttft_ms": ...}, ...]) as base_url:` serves those backends."""

    def __init__(self, spec: list[dict]):
        self.spec = spec
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> str:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVE, json.dumps(self.spec)], stdout=subprocess.PIPE, text=True
        )
        return self.proc.stdout.readline().strip()

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def write_config(base_url: str, spec: list[dict], settings: dict | None = None) -> Path:
    import tomli_w

    backends = [
        {"name": b["name"], "provider": b.get("provider", "vllm"), "url": f"{base_url}/{b['name']}",
         "models": b.get("models", ["meta-llama/Llama-3.1-8B-Instruct"])}
        for b in spec
    ]
    fd, path = tempfile.mkstemp(suffix=".toml", prefix="llmtop-bench-")
    os.close(fd)
    Path(path).write_text(tomli_w.dumps({"settings": settings or {}, "backend": backends}))
    return Path(path)


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def percentile(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def wait_ready(base_url: str) -> None:
    import httpx

    from llmtop.transport import shared_ssl_context

    for _ in range(100):
        try:  # one CA bundle for all the tries: httpx loads one per client otherwise (30-40 ms of CPU each)
            httpx.get(base_url + "/", timeout=1, trust_env=False, verify=shared_ssl_context())
            return
        except httpx.HTTPError:
            time.sleep(0.05)


def cpu_reference() -> str:
    """One line that says how fast this machine runs Python: the median time of a fixed pure-Python
    loop, so figures measured on different machines can be compared (a machine 2x slower shows
    about twice the time here)."""
    import time as _time

    def loop() -> float:
        start = _time.perf_counter()
        total = 0
        for i in range(2_000_000):
            total += i * i % 7
        return _time.perf_counter() - start

    times = sorted(loop() for _ in range(5))
    return f"CPU reference: a fixed pure-Python loop (2M multiply-mod-adds) took {times[2] * 1000:.0f} ms here (median of 5)"


class CpuLoad:
    """`with CpuLoad(n):` keeps n other processes spinning on the CPU: "another process loads the CPU"."""

    def __init__(self, n: int):
        self.n = n
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> "CpuLoad":
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(self.n)]
        return self

    def __exit__(self, *exc) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()
