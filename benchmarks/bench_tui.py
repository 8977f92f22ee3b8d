"""The TUI over 300 simulated backends: key-to-screen latency and the process's CPU in steady state.

Key-to-screen runs from just before a key is sent to the first frame the compositor hands to the
terminal that shows the key's effect (found by its text in the frame). The app runs headless, so
each frame is also rendered to terminal escape codes here, as a real terminal session would, to
keep that cost in the CPU figure. The simulator runs in a child process so it costs this one nothing.

Run: /work/venv/bin/python benchmarks/bench_tui.py [--backends 300] [--steady 20] [--presses 30]
Prints figures only; there are no pass/fail thresholds.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _simproc import SimProcess, cpu_reference, median, percentile, wait_ready, write_config  # noqa: E402

from llmtop.config import load_config  # noqa: E402
from llmtop.engine import Engine  # noqa: E402
from llmtop.state import StateStore  # noqa: E402
from llmtop.tui.app import LlmtopApp  # noqa: E402
from llmtop.tui.format import SORT_LABELS, SORT_NAMES  # noqa: E402
from llmtop.tui.widgets.fleet_table import FleetTable  # noqa: E402

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
SIZE = (200, 50)


class FrameWatch:
    """Wraps App._display: renders every frame as a terminal would, and notes when an awaited text appears."""

    def __init__(self, app: LlmtopApp) -> None:
        self.app = app
        self.frames = 0
        self.marker: str | None = None
        self.seen_at: float | None = None
        self._display = app._display
        app._display = self._on_display

    def _on_display(self, screen, renderable) -> None:
        at = time.perf_counter()
        self._display(screen, renderable)
        if renderable is None or not hasattr(renderable, "render_segments"):
            return
        self.frames += 1
        text = renderable.render_segments(self.app.console)
        if self.marker is not None and self.seen_at is None and self.marker in ANSI.sub("", text):
            self.seen_at = at

    async def press(self, pilot, key: str, marker: str, timeout: float = 5.0) -> float:
        """Milliseconds from sending `key` to the first frame containing `marker`."""
        self.marker, self.seen_at = marker, None
        started = time.perf_counter()
        await pilot.press(key)
        deadline = started + timeout
        while self.seen_at is None:
            if time.perf_counter() > deadline:
                raise SystemExit(f"no frame showed {marker!r} within {timeout}s of pressing {key!r}")
            await asyncio.sleep(0.001)
        self.marker = None
        return (self.seen_at - started) * 1000


def report(name: str, samples: list[float]) -> None:
    print(f"  {name:<22} n={len(samples):<3} median {median(samples):6.1f} ms   p95 {percentile(samples, 95):6.1f} ms   max {max(samples):6.1f} ms")


async def measure_keys(watch: FrameWatch, pilot, table: FleetTable, presses: int, filter_text: str) -> None:
    """Key-to-screen of each kind of key, as an operator uses them: sort, move, filter, details."""
    sort_ms = []
    for _ in range(presses):
        upcoming = SORT_NAMES[(SORT_NAMES.index(table.sort_name) + 1) % len(SORT_NAMES)]
        sort_ms.append(await watch.press(pilot, "s", f"sort: {SORT_LABELS[upcoming]}"))
    report("s (cycle sort)", sort_ms)

    while table.sort_name != "name":  # a stable order, so the next row is known in advance
        await pilot.press("s")
    down_ms = []
    for _ in range(presses):
        following = table.names[table.cursor_row + 1]
        down_ms.append(await watch.press(pilot, "j", f"{following} · trends"))
    report("j (cursor down)", down_ms)

    await pilot.press("slash")
    typed, filter_ms = "", []
    for char in filter_text:
        typed += char
        filter_ms.append(await watch.press(pilot, "minus" if char == "-" else char, f"filter '{typed}'"))
    await pilot.press("escape")
    report("/ typing a filter", filter_ms)

    detail_ms, back_ms = [], []
    for _ in range(max(3, presses // 3)):
        detail_ms.append(await watch.press(pilot, "enter", "probe cost"))
        back_ms.append(await watch.press(pilot, "escape", "sort: "))
    report("Enter (details)", detail_ms)
    report("Esc (back)", back_ms)
    report("all keys", sort_ms + down_ms + filter_ms + detail_ms + back_ms)


async def rows_shown(table: FleetTable, total: int, limit_s: float = 60) -> float:
    """Seconds until the table holds `total` rows (a screen over remote sources filling up)."""
    started = time.perf_counter()
    while table.row_count < total:
        if time.perf_counter() - started > limit_s:
            raise SystemExit(f"only {table.row_count} of {total} rows after {limit_s:g} s")
        await asyncio.sleep(0.1)
    return time.perf_counter() - started


async def engine_alone(config: Path, state: Path, args) -> float:
    """CPU % of the same engine with no UI, so the UI's own share can be read off the difference."""
    engine = Engine(load_config(config), StateStore(state))
    await engine.open()
    engine.start()
    try:
        await asyncio.sleep(5)  # past the first round
        cpu0, wall0 = time.process_time(), time.perf_counter()
        await asyncio.sleep(args.steady)
        return 100 * (time.process_time() - cpu0) / (time.perf_counter() - wall0)
    finally:
        await engine.close()


async def measure(config: Path, state: Path, args) -> None:
    print(f"engine alone, no UI, over {args.steady:.0f} s: CPU {await engine_alone(config, state, args):.1f}% of one core")
    engine = Engine(load_config(config), StateStore(state))
    app = LlmtopApp(engine, config_path=config, settle_heap=True)  # as the live screen (tui/run.py)
    async with app.run_test(size=SIZE) as pilot:
        watch = FrameWatch(app)
        table = app.screen.query_one(FleetTable)
        started = time.perf_counter()
        while time.perf_counter() - started < 30 and not all(b.probe for b in app.view.fleet.backends):
            await asyncio.sleep(0.2)
        probed = sum(1 for b in app.view.fleet.backends if b.probe)
        print(f"warm-up: {probed}/{len(app.view.fleet.backends)} backends probed after {time.perf_counter() - started:.1f} s")

        # Steady state first, with nobody at the keyboard.
        frames, cpu0, wall0 = watch.frames, time.process_time(), time.perf_counter()
        await asyncio.sleep(args.steady)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        print(f"engine + UI, nobody typing, over {wall:.1f} s: CPU {100 * cpu / wall:.1f}% of one core, {(watch.frames - frames) / wall:.1f} frames/s")

        print(f"key-to-screen with {len(app.view.fleet.backends)} backends live, {SIZE[0]}x{SIZE[1]}:")
        await measure_keys(watch, pilot, table, args.presses, "sim-01")

        cpu0, wall0 = time.process_time(), time.perf_counter()
        for _ in range(args.presses):
            await pilot.press("s")
            await asyncio.sleep(0.05)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        print(f"while pressing a key every ~50 ms: CPU {100 * cpu / wall:.1f}% of one core")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", type=int, default=300)
    parser.add_argument("--steady", type=float, default=20.0, help="seconds of steady state to measure CPU over")
    parser.add_argument("--presses", type=int, default=30, help="presses per measured key")
    parser.add_argument("--health-interval", type=float, default=2.0, help="seconds between polls per backend")
    parser.add_argument("--probe-interval", type=float, default=10.0, help="seconds between completion probes per backend")
    args = parser.parse_args()
    print(cpu_reference())
    spec = [{"name": f"sim-{i:04d}"} for i in range(1, args.backends + 1)]
    settings = {"health_interval_s": args.health_interval, "probe_interval_s": args.probe_interval}
    print(f"{args.backends} backends, health every {args.health_interval:g} s, probes every {args.probe_interval:g} s")
    with SimProcess(spec) as base_url:
        wait_ready(base_url)
        config = write_config(base_url, spec, settings)
        with tempfile.TemporaryDirectory() as tmp:
            try:
                asyncio.run(measure(config, Path(tmp) / "state.json", args))
            finally:
                config.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
