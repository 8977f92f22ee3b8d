"""`llmtop check` over a large simulated fleet: wall time against the slowest single probe, and peak memory.

Targets (issue #2): wall time under 2x the slowest single backend's probe, peak memory under 150 MB.
Run: .venv/bin/python benchmarks/bench_check_fleet.py [--backends 500] [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _simproc import SimProcess, median, percentile, write_config  # noqa: E402

TOKENS = 8


PROFILES = {
    # Small models on idle GPUs: short probes, the hardest case for the 2x target.
    "fast": {"ttft_ms": (50, 800), "gap_ms": (10, 40)},
    # A production mix: big models and queues (TTFT up to 2 s), 20-100 tokens/s.
    "mixed": {"ttft_ms": (100, 2000), "gap_ms": (10, 50)},
}


def fleet(n: int, seed: int = 7, profile: str = "fast") -> list[dict]:
    """n backends with timings drawn uniformly from the profile's ranges (seeded, so repeatable)."""
    rng = random.Random(seed)
    p = PROFILES[profile]
    return [
        {"name": f"sim-{i:04d}", "ttft_ms": round(rng.uniform(*p["ttft_ms"])), "gap_ms": round(rng.uniform(*p["gap_ms"]))}
        for i in range(n)
    ]


def slowest_probe_ms(spec: list[dict]) -> float:
    return max(b["ttft_ms"] + (TOKENS - 1) * b["gap_ms"] for b in spec)


def run_check(config: Path) -> tuple[float, int, float, dict]:
    """(wall seconds, exit code, peak RSS MB, parsed JSON) of one `llmtop check --json` process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "llmtop", "check", "--json", "--config", str(config), "--state", str(config) + ".state"],
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if proc.returncode not in (0, 1):
        print(proc.stderr, file=sys.stderr)
        raise SystemExit(f"llmtop check failed with exit code {proc.returncode}")
    return wall, proc.returncode, max(peak_kb, before) / 1024, json.loads(proc.stdout)


latency: list[float] = []  # health latencies of the last report: the simulator answers in well under 1 ms


def accuracy(report: dict, spec: list[dict]) -> tuple[list[float], list[float]]:
    """Per backend: measured TTFT minus the simulator's, and decode-rate error in %."""
    known = {b["name"]: b for b in spec}
    ttft, rate = [], []
    latency.clear()
    latency.extend(b["latency_ms"] for b in report["backends"] if b["latency_ms"] is not None)
    for b in report["backends"]:
        p, s = b["probe"], known[b["name"]]
        if p and p["ttft_ms"] is not None and p["tokens_per_s"] is not None:
            ttft.append(p["ttft_ms"] - s["ttft_ms"])
            expected = 1000.0 / s["gap_ms"]
            rate.append((p["tokens_per_s"] - expected) / expected * 100)
    return ttft, rate


def run_round_in_process(config: Path) -> float:
    """Seconds for one engine round alone, without interpreter start-up and imports."""
    code = (
        "import asyncio,time,sys\n"
        "from llmtop.config import load_config\nfrom llmtop.state import StateStore\nfrom llmtop.engine import Engine\n"
        "async def main():\n"
        f"    async with Engine(load_config({str(config)!r}), StateStore({str(config) + '.state2'!r})) as e:\n"
        "        t=time.perf_counter(); await e.run_round(); print(time.perf_counter()-t)\n"
        "        bad=[b for b in e.snapshot().backends if b.status!='healthy']\n"
        "        print(len(bad), file=sys.stderr)\n"
        "asyncio.run(main())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    unhealthy = int(proc.stderr.strip().splitlines()[-1])
    if unhealthy:
        print(f"warning: {unhealthy} backends not healthy in the in-process round", file=sys.stderr)
    return float(proc.stdout.strip())


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backends", type=int, default=500)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="fast", help="the fleet's timings (default fast)")
    parser.add_argument(
        "--probe-concurrency", type=int, nargs="+", default=[512, 64],
        help="settings.probe_concurrency caps to compare (default: llmtop's own 512, and a cap of 64)",
    )
    args = parser.parse_args()
    spec = fleet(args.backends, profile=args.profile)
    slowest = slowest_probe_ms(spec) / 1000
    print(f"{args.backends} simulated vLLM backends, profile {args.profile!r} {PROFILES[args.profile]}")
    print(f"(simulator in its own process), {args.runs} runs each")
    print(f"slowest single probe (TTFT + {TOKENS - 1} gaps): {slowest * 1000:.0f} ms")
    with SimProcess(spec) as base_url:
        for concurrency in args.probe_concurrency:
            settings = {"probe_max_tokens": TOKENS, "timeout_s": 20, "probe_concurrency": concurrency}
            print()
            print(f"probe_concurrency = {concurrency}")
            measure(write_config(base_url, spec, settings), spec, args.runs, slowest)
    return 0


def measure(config: Path, spec: list[dict], runs: int, slowest: float) -> None:
    walls, peaks, rounds, ttft_err, rate_err = [], [], [], [], []
    for _ in range(runs):
        wall, code, peak, report = run_check(config)
        walls.append(wall)
        peaks.append(peak)
        t, r = accuracy(report, spec)
        ttft_err += t
        rate_err += r
        rounds.append(run_round_in_process(config))
    print(f"  `llmtop check --json` wall time: median {median(walls):.2f} s  (min {min(walls):.2f}, max {max(walls):.2f})"
          f"  = {median(walls) / slowest:.2f}x the slowest probe (target < 2x)")
    print(f"  engine round alone (no start-up): median {median(rounds):.2f} s = {median(rounds) / slowest:.2f}x")
    print(f"  peak RSS of the check process: {max(peaks):.1f} MB (target < 150 MB)  [includes interpreter + imports]")
    print(f"  last exit code: {code} (0 = every backend healthy)")
    abs_rate = [abs(x) for x in rate_err]
    print(
        f"  truth at this scale: TTFT error median {median(ttft_err):+.1f} ms, p95 {percentile(ttft_err, 95):+.1f} ms;"
        f" decode-rate |error| median {median(abs_rate):.2f} %, p95 {percentile(abs_rate, 95):.2f} %"
    )
    print(f"  health latency shown (server answers in < 1 ms): median {median(latency):.1f} ms, p95 {percentile(latency, 95):.1f} ms")


if __name__ == "__main__":
    raise SystemExit(main())
