"""CPU this process spends per poll (health, models, metrics) and per probe (an 8-token stream).

What bounds a big fleet on a small machine is the engine's CPU per request: it decides how many
probes the governor can admit while the event loop stays punctual (governor.py), how long the
poll phase of a 500-backend check takes, and what the engine costs a screen or serve watching
300. The simulator runs in its own process, so its CPU is not counted; over loopback, the kernel's
work to deliver each request (the send) is counted, as it is for a real fleet, where it is less.

Run: .venv/bin/python benchmarks/bench_cpu.py [--backends 20] [--rounds 15] [--page vllm-capture]
Prints figures only; there are no pass/fail thresholds.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _simproc import SimProcess, cpu_reference, median, write_config  # noqa: E402

from bench_check_fleet import fleet  # noqa: E402

from llmtop.config import load_config  # noqa: E402
from llmtop.engine import Engine  # noqa: E402
from llmtop.metrics import map_metrics  # noqa: E402
from llmtop.providers import adapter_class  # noqa: E402
from llmtop.state import StateStore  # noqa: E402

CAPTURE = Path(__file__).resolve().parent.parent.parent / "shared" / "captures" / "vllm-metrics.prom"


async def per_operation(config: Path, state: Path, backends: int, rounds: int) -> tuple[list[float], list[float]]:
    """Per round, CPU ms per poll and per probe, all backends at once, round after round."""
    polls, probes = [], []
    async with Engine(load_config(config), StateStore(state)) as engine:
        await engine.run_round()  # connections open, first figures in
        trackers = list(engine.trackers.values())
        for _ in range(rounds):
            cpu = time.process_time()
            await asyncio.gather(*(engine._step(t, engine._poll) for t in trackers))
            polls.append((time.process_time() - cpu) / len(trackers) * 1000)
            cpu = time.process_time()
            await asyncio.gather(*(engine._step(t, engine._probe) for t in trackers))
            probes.append((time.process_time() - cpu) / len(trackers) * 1000)
    return polls, probes


def page_cost(text: str, n: int = 300) -> float:
    names = adapter_class("vllm").metric_names
    start = time.process_time()
    for _ in range(n):
        map_metrics(text, names)
    return (time.process_time() - start) / n * 1000


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backends", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    print(cpu_reference())
    spec = fleet(args.backends)
    with SimProcess(spec) as base_url, tempfile.TemporaryDirectory() as tmp:
        config = write_config(base_url, spec, {"probe_max_tokens": 8, "timeout_s": 20})
        polls, probes = asyncio.run(per_operation(config, Path(tmp) / "state.json", args.backends, args.rounds))
    print(f"{args.backends} simulated vLLM backends at once, {args.rounds} rounds (simulator in its own process)")
    print(f"  CPU per poll (health + models + metrics): median {median(polls):.2f} ms (min {min(polls):.2f}, max {max(polls):.2f})")
    print(f"  CPU per probe (8 tokens streamed):        median {median(probes):.2f} ms (min {min(probes):.2f}, max {max(probes):.2f})")
    if CAPTURE.exists():
        print(f"  reading a real vLLM metrics page ({CAPTURE.stat().st_size // 1024} KiB, the shared capture): {page_cost(CAPTURE.read_text()):.3f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
