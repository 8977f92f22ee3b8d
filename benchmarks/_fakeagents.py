"""Fake llmtop agents for bench_remote.py: N event streams of M synthetic backends each, in a process of their own.

Each agent is a path prefix (http://127.0.0.1:PORT/agentK) answering /api/v1/events as `llmtop
serve` does: the whole fleet once, then each backend again whenever it "changed" (every backend
every --every seconds, spread evenly: what a health poll every 5 s does to a real agent), and a
new probe result every 60 s. The documents are made by the real BackendSnapshot.to_json, so
their size is what a real agent sends.

Run: python benchmarks/_fakeagents.py AGENTS BACKENDS [EVERY_S]   (prints its base URL, then serves)
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import sys
import time

from aiohttp import web

from llmtop.snapshot import BackendSnapshot, Metrics, ProbeSummary

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def backend(agent: int, i: int, now: float, rng: random.Random) -> dict:
    at = now - rng.uniform(0, 60)
    probe = ProbeSummary(MODEL, rng.uniform(20, 400), rng.uniform(30, 200), 8, False, None, at, ttfb_ms=rng.uniform(10, 300))
    b = BackendSnapshot(
        name=f"a{agent}-sim-{i:04d}", provider="vllm", url=f"http://10.{agent}.{i // 250}.{i % 250}:8000", status="healthy",
        status_reason=None, circuit="closed", admin="active", enabled=True, latency_ms=rng.uniform(0.3, 5), models=(MODEL,),
        expected_models=(MODEL,), missing_models=(), alerts=(), metrics=Metrics(rng.randint(0, 8), rng.randint(0, 3), rng.random()),
        probe=probe, error=None, error_rate=0.0, last_health_at=now, retry_after_at=None, probe_tokens_per_hour=480.0,
        last_ok_probe=probe, stale_after_s=130.0, up=True, version="0.8.5",
    )
    return b.to_json(now)


async def main(agents: int, backends: int, every_s: float) -> None:
    rng = random.Random(7)

    async def events(request: web.Request) -> web.StreamResponse:
        agent = int(request.match_info["agent"])
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        now = time.time()
        docs = [backend(agent, i, now, rng) for i in range(backends)]
        fleet = {"schema": 1, "at": now, "time": "", "backends": docs, "gpus": [], "gpu_message": "no NVIDIA GPU"}
        await response.write(f"event: fleet\ndata: {json.dumps(fleet)}\n\n".encode())
        tick, i = 0.5, 0
        per_tick = max(1, round(backends * tick / every_s))
        try:
            while True:
                await asyncio.sleep(tick)
                now = time.time()
                out = []
                for _ in range(per_tick):
                    d = docs[i % backends]
                    d["latency_ms"] = round(rng.uniform(0.3, 5), 1)
                    d["last_health_at"] = round(now, 3)
                    if rng.random() < every_s / 60:  # a new probe about once a minute
                        d["probe"] = {**d["probe"], "at": round(now, 3), "ttft_ms": round(rng.uniform(20, 400), 1)}
                        d["probe"]["phases"] = {**d["probe"]["phases"], "ttft_ms": d["probe"]["ttft_ms"]}
                    out.append(f"event: backend\ndata: {json.dumps(d)}\n\n")
                    i += 1
                await response.write("".join(out).encode())
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        return response

    app = web.Application()
    app.add_routes([web.get("/agent{agent}/api/v1/events", events)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(f"http://127.0.0.1:{runner.addresses[0][1]}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]) if len(sys.argv) > 3 else 5.0))
