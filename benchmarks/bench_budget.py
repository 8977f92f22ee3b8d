"""A fleet probe budget over 200 simulated backends for 10 minutes of fake time: tokens spent against the budget, and the intervals that result.

Target (issue 11): tokens actually spent within 2% of the budget's share of the run.
The engine runs on a fake clock stepped once a second (Engine.run_due does what the live loop
would at each instant) against a simulator in a child process over 127.0.0.1: every poll and
probe is a real request; only the waiting between them is skipped.
Run: .venv/bin/python benchmarks/bench_budget.py [--backends 200] [--minutes 10] [--budgets 50000,100000,200000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _simproc import SimProcess, cpu_reference, percentile  # noqa: E402

from llmtop.config import BackendConfig, BudgetSettings, Config, Settings  # noqa: E402
from llmtop.engine import Engine  # noqa: E402
from llmtop.state import StateStore  # noqa: E402

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


async def run(base_url: str, n: int, budget: float, minutes: float, probe_interval_s: float, health_interval_s: float) -> dict:
    now = [10_000.0]
    config = Config(
        settings=Settings(probe_interval_s=probe_interval_s, health_interval_s=health_interval_s, timeout_s=10),
        backends=tuple(BackendConfig(f"sim-{i:04d}", "vllm", f"{base_url}/sim-{i:04d}", models=(MODEL,)) for i in range(n)),
        budget=BudgetSettings(budget),
    )
    state = StateStore(Path(tempfile.mkdtemp()) / "state.json")
    probes_at: dict[str, list[tuple[float, bool]]] = {}
    untimed = 0
    start = now[0]
    wall = time.perf_counter()
    async with Engine(config, state, clock=lambda: now[0], wall=lambda: now[0]) as engine:
        seen = {name: 0 for name in engine.trackers}
        while now[0] < start + minutes * 60:
            await engine.run_due()
            for name, t in engine.trackers.items():
                if t.counters.probes != seen[name]:
                    seen[name] = t.counters.probes
                    probes_at.setdefault(name, []).append((now[0] - start, bool(t.probe.untimed)))
                    untimed += bool(t.probe.untimed)  # read late: tried again soon, and paid for
            now[0] += 1.0
        fleet = engine.snapshot()
    wall = time.perf_counter() - wall
    spent = sum(b.counters.probe_tokens + b.counters.probe_input_tokens for b in fleet.backends)
    per_probe = spent / max(1, sum(b.counters.probes for b in fleet.backends))
    # After a timed probe: the scheduler's interval (an untimed one is retried soon, on purpose).
    gaps = [b - a for times in probes_at.values() for (a, late), (b, _) in zip(times, times[1:]) if not late]
    plans = [b.probe_interval_s for b in fleet.backends if b.probe_interval_s is not None]
    return {
        "budget": budget,
        "wanted": n * 3600 / probe_interval_s * per_probe,
        "spent": spent,
        "share": budget * minutes / 60,
        "probes": sum(b.counters.probes for b in fleet.backends),
        "plan": statistics.median(plans),
        "gap_p5": percentile(gaps, 5) if gaps else None,
        "gap_median": statistics.median(gaps) if gaps else None,
        "gap_p95": percentile(gaps, 95) if gaps else None,
        "note": fleet.backends[0].probe_note,
        "untimed": untimed,
        "wall_s": wall,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", type=int, default=200)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--budgets", default="50000,100000,200000", help="fleet tokens_per_hour, comma-separated")
    parser.add_argument("--probe-interval", type=float, default=60)
    parser.add_argument("--health-interval", type=float, default=15)
    args = parser.parse_args()
    print(cpu_reference())
    # Tokens 10 ms apart: each is read on its own, so probes are timed (not retried) and the
    # intervals measured are the scheduler's.
    spec = [{"name": f"sim-{i:04d}", "ttft_ms": 20, "gap_ms": 10} for i in range(args.backends)]
    print(
        f"{args.backends} simulated vLLM backends (8 output + 10 prompt tokens a probe), probe_interval_s = "
        f"{args.probe_interval:g}, health_interval_s = {args.health_interval:g}, {args.minutes:g} min of fake time"
    )
    worst = 0.0
    with SimProcess(spec) as base_url:
        for budget in (float(b) for b in args.budgets.split(",")):
            r = asyncio.run(run(base_url, args.backends, budget, args.minutes, args.probe_interval, args.health_interval))
            off = (r["spent"] - r["share"]) / r["share"]
            worst = max(worst, abs(off))
            print(
                f"budget {budget:>9,.0f} tokens/h (fleet wants {r['wanted']:,.0f}): spent {r['spent']:,.0f} in {args.minutes:g} min "
                f"against a share of {r['share']:,.0f} ({off:+.2%}), {r['probes']} probes ({r['untimed']} untimed, retried); interval planned {r['plan']:.0f} s, "
                f"measured after timed probes p5/median/p95 {r['gap_p5']:.0f}/{r['gap_median']:.0f}/{r['gap_p95']:.0f} s "
                f"[{r['wall_s']:.0f} s wall]"
            )
            print(f"    note: {r['note']}")
    print(f"worst deviation from the budget: {worst:.2%} (target: within 2%)")
    return 0 if worst <= 0.02 else 1


if __name__ == "__main__":
    sys.exit(main())
