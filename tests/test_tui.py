"""The live TUI over the real simulator on 127.0.0.1: every key, reloads good and broken, a hung backend, odd sizes."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from textual.worker import WorkerCancelled

from llmtop import local, loopthread
from llmtop.config import Config, load_config
from llmtop.engine import Engine
from llmtop.simulator import SimBackend, Simulator
from llmtop.state import StateStore
from llmtop.tui.app import LlmtopApp
from llmtop.tui.screens.confirm import ConfirmScreen
from llmtop.tui.screens.detail import Chart, DetailScreen
from llmtop.tui.screens.fleet import FleetScreen
from llmtop.tui.screens.help import HelpScreen
from llmtop.tui.widgets.fleet_table import FleetTable
from llmtop.tui.widgets.gpu_panel import GpuPanel
from fixed_source import FixedSource

COMPLETIONS = "/v1/chat/completions"
SIZE = (120, 36)


def fleet() -> list[SimBackend]:
    return [
        SimBackend("alpha", "vllm", ttft_ms=30),
        SimBackend("beta", "ollama", ["llama3.2"], ttft_ms=80),
        SimBackend("gamma", "vllm", ttft_ms=150),
    ]


def config_text(sim: Simulator, backends: list[SimBackend], timeout_s: float = 2.0) -> str:
    # A long probe interval: after the first probe, completions only happen when a key asks for one.
    lines = [f"[settings]\nhealth_interval_s = 0.5\nprobe_interval_s = 3600\ntimeout_s = {timeout_s}\n"]
    for b in backends:
        models = ", ".join(f'"{m}"' for m in b.models)
        lines.append(f'[[backend]]\nname = "{b.name}"\nprovider = "{b.provider}"\nurl = "{sim.url(b.name)}"\nmodels = [{models}]\n')
    return "\n".join(lines)


@pytest.fixture
async def sim():
    backends = fleet()
    async with Simulator(backends) as simulator:
        yield simulator


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    return tmp_path / "llmtop.toml", tmp_path / "state.json"


@asynccontextmanager
async def running(sim: Simulator, files, *, size=SIZE, read_only=False, timeout_s=2.0, settle_heap=False):
    config_path, state_path = files
    if not config_path.exists():
        config_path.write_text(config_text(sim, list(sim.backends.values()), timeout_s))
    engine = Engine(load_config(config_path), StateStore(state_path))
    app = LlmtopApp(engine, config_path=config_path, read_only=read_only, settle_heap=settle_heap)
    async with app.run_test(size=size) as pilot:
        yield app, pilot
        await quit_app(app)


async def quit_app(app: LlmtopApp) -> None:
    """Quit as `q` does, and wait until the app has stopped, before run_test tears it down.

    run_test's teardown prunes the screens while the app's timers and message loop still run (a
    real quit stops those first), so a tick landing in between refreshed a FleetScreen whose
    widgets were gone: NoMatches 'FleetSummary', more often the more loaded the machine.
    """
    app.exit()
    deadline = time.monotonic() + 30  # outer bound only
    while app.is_running:
        assert time.monotonic() < deadline, "the app did not stop"
        await asyncio.sleep(0.01)


def screen_text(app: LlmtopApp) -> str:
    """What a terminal would show for the top screen (the compositor's strips, as plain text)."""
    return "\n".join(strip.text for strip in app.screen._compositor.render_strips())


async def wait_for(pilot, condition, timeout: float = 30.0, what: str = "condition") -> None:
    """Pause until condition() holds. The timeout is only the outer bound for a broken build (5 s
    was within reach of a loaded machine); a test that asserts speed says so with its own bound."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await pilot.pause(0.05)


async def settled(app, pilot) -> None:
    """Every backend has been polled and probed once, and the screen shows it."""
    # Asked of the engine, not of app.view: that is only rebuilt on the next tick (1 s), which
    # every TUI test then waited for; the refresh below shows the probes at once.
    await wait_for(pilot, lambda: all(b.probe is not None for b in app.local.snapshot().backends), what="first probes")
    app.refresh_fleet()
    await pilot.pause()


async def no_probe_pending(app, pilot) -> None:
    """No completion in flight and none due for a minute: the probes after this are the keys' own.

    A probe a key asks for while one is in flight is answered by that one, and a probe can be due
    again soon by itself (a retry); counting requests to see a key's probe needs neither.
    """
    engine = app.engine
    await wait_for(
        pilot,
        lambda: all(not t.busy and t.next_probe_at > engine.clock() + 60 for t in engine.trackers.values()),
        what="no probe pending",
    )


def table(app) -> FleetTable:
    return app.screen.query_one(FleetTable)


def row_names(app) -> list[str]:
    return table(app).names


async def writes_done(app, pilot) -> None:
    """The admin-state writes that keys asked for have finished, and the screen shows them.

    A write runs in a worker thread (a lock, a write, an fsync); a pause alone does not wait for
    it, and a loaded disk or CPU let the test read the file before the write was there.
    """
    await pilot.pause()  # the keys' handlers and confirmation callbacks have run: their workers exist
    await workers_done(app, "state-write")
    await pilot.pause()


async def workers_done(app, *groups: str) -> None:
    """Every worker of these groups has ended; one that failed fails the test."""
    for worker in [w for w in app.workers if w.group in groups]:
        with contextlib.suppress(WorkerCancelled):  # an exclusive group's older worker, replaced
            await worker.wait()


async def select(pilot, app, name: str) -> None:
    t = table(app)
    t.move_cursor(row=t.get_row_index(name))
    await pilot.pause()


# -- the table ------------------------------------------------------------------------------


async def test_rows_show_every_backend_with_symbols_and_figures(sim, files):
    async with running(sim, files) as (app, pilot):
        await settled(app, pilot)
        assert sorted(row_names(app)) == ["alpha", "beta", "gamma"]
        text = screen_text(app)
        assert "● healthy" in text and "3 backends" in text
        assert "closed" in text and "ms" in text


async def test_state_written_by_another_llmtop_shows_up(sim, files):
    async with running(sim, files) as (app, pilot):
        await settled(app, pilot)
        StateStore(files[1]).set_admin("gamma", "draining")  # as `llmtop drain gamma` in another shell
        await wait_for(pilot, lambda: "● draining" in screen_text(app), what="draining badge")
        assert app.view.fleet.backend("gamma").admin == "draining"


# -- p and P --------------------------------------------------------------------------------


async def test_p_probes_the_selected_backend_now(sim, files):
    async with running(sim, files) as (app, pilot):
        await settled(app, pilot)
        await select(pilot, app, "beta")
        await no_probe_pending(app, pilot)
        before = {n: b.requests["/api/chat"] + b.requests[COMPLETIONS] for n, b in sim.backends.items()}
        await pilot.press("p")
        await wait_for(pilot, lambda: sim.backends["beta"].requests["/api/chat"] > before["beta"], what="beta probed")
        assert sim.backends["alpha"].requests[COMPLETIONS] == before["alpha"]
        await wait_for(pilot, lambda: app.view.progress is None, what="round finished")


async def test_P_probes_every_backend_with_visible_progress(sim, files):
    async with running(sim, files, timeout_s=30) as (app, pilot):  # a held probe must not time out
        await settled(app, pilot)
        await no_probe_pending(app, pilot)
        # The round's completions are held until the test has looked at the progress: a slow
        # backend (it was a 400 ms TTFT) was over before a pause on a loaded machine returned.
        hold = asyncio.Event()
        for b in sim.backends.values():
            b.hold = hold
        before = {n: b.requests[COMPLETIONS] for n, b in sim.backends.items() if b.provider == "vllm"}
        await pilot.press("P")
        await pilot.pause()
        assert app.view.progress is not None and app.view.progress.total == 3
        assert "⟳ probing" in screen_text(app)
        await wait_for(pilot, lambda: all(sim.backends[n].requests[COMPLETIONS] > c for n, c in before.items()), what="probes sent")
        assert app.view.progress is not None  # still probing while they are held
        hold.set()
        await wait_for(pilot, lambda: app.view.progress is None, what="round finished")
        for name, count in before.items():
            assert sim.backends[name].requests[COMPLETIONS] > count
        assert "⟳ probing" not in screen_text(app)


# -- d and t --------------------------------------------------------------------------------


async def test_d_drains_after_confirmation_and_survives_a_restart(sim, files):
    state_path = files[1]
    async with running(sim, files) as (app, pilot):
        await settled(app, pilot)
        await select(pilot, app, "alpha")
        await pilot.press("d")
        assert isinstance(app.screen, ConfirmScreen)
        assert "Drain alpha?" in screen_text(app)
        await pilot.press("n")
        await writes_done(app, pilot)
        assert StateStore(state_path).admin("alpha") == "active"
        await pilot.press("d", "y")
        await writes_done(app, pilot)
        assert isinstance(app.screen, FleetScreen)
        assert StateStore(state_path).admin("alpha") == "draining"  # a fresh store: what a restart reads
        await wait_for(pilot, lambda: "● draining" in screen_text(app), what="draining badge")
        await pilot.press("d")
        assert "Undrain alpha?" in screen_text(app)
        await pilot.press("y")
        await writes_done(app, pilot)
        assert StateStore(state_path).admin("alpha") == "active"
    # A new app over the same state file starts with what the operator left.
    StateStore(state_path).set_admin("beta", "draining")
    async with running(sim, files) as (app, pilot):
        assert app.view.fleet.backend("beta").admin == "draining"


async def test_t_toggles_disabled_and_persists(sim, files):
    async with running(sim, files) as (app, pilot):
        await settled(app, pilot)
        await select(pilot, app, "gamma")
        await pilot.press("t")
        await writes_done(app, pilot)
        assert StateStore(files[1]).admin("gamma") == "disabled"
        assert "○ disabled" in screen_text(app)
        await pilot.press("t")
        await writes_done(app, pilot)
        assert StateStore(files[1]).admin("gamma") == "active"


async def test_read_only_turns_off_d_t_and_r_and_hides_them(sim, files):
    async with running(sim, files, read_only=True) as (app, pilot):
        await settled(app, pilot)
        await pilot.press("d", "t", "r")
        await writes_done(app, pilot)
        await workers_done(app, "config")  # a reload r started by mistake would have ended by now
        assert isinstance(app.screen, FleetScreen)  # no confirmation was asked
        assert StateStore(files[1]).admin(table(app).selected_name) == "active"
        assert not any(e.kind == "config" for e in app.local.snapshot().events)  # r did not reload
        text = screen_text(app)
        footer = text.splitlines()[-1]
        assert "Drain" not in footer and "On/off" not in footer and "Probe" in footer  # keys that do nothing are not offered
        assert "[read-only]" in text


# -- r and reloads --------------------------------------------------------------------------


async def test_r_reloads_an_edited_config(sim, files):
    async with running(sim, files) as (app, pilot):
        await settled(app, pilot)
        sim.backends["delta"] = SimBackend("delta", "vllm")
        config_path = files[0]
        config_path.write_text(config_text(sim, list(sim.backends.values())))
        await pilot.press("r")
        await wait_for(pilot, lambda: "delta" in row_names(app), what="new row")
        assert "delta" in screen_text(app)
        assert any(e.kind == "config" and "reloaded" in e.message for e in app.view.fleet.events)


async def test_r_with_a_broken_config_keeps_the_old_one_and_shows_the_error(sim, files):
    async with running(sim, files) as (app, pilot):
        await settled(app, pilot)
        config_path = files[0]
        config_path.write_text(config_path.read_text().replace('provider = "ollama"', 'provider = "olama"'))
        await pilot.press("r")
        await wait_for(pilot, lambda: app.local.snapshot().config_error is not None, what="config error")
        app.refresh_fleet()
        await pilot.pause()
        assert sorted(row_names(app)) == ["alpha", "beta", "gamma"]
        assert "unknown provider 'olama'" in app.local.snapshot().config_error
        # As words: the message wraps, and where depends on the length of its path (pytest's tmp
        # dir, longer under xdist), which split "unknown provider" over two lines.
        words = " ".join(screen_text(app).split())
        assert "config error" in words and "unknown provider 'olama'" in words
        assert any("olama" in n.message for n in app._notifications)
        assert any(e.kind == "config" and e.level == "error" for e in app.view.fleet.events)


async def test_a_changed_config_file_reloads_by_itself(sim, files):
    async with running(sim, files) as (app, pilot):
        await settled(app, pilot)
        backends = [b for b in sim.backends.values() if b.name != "gamma"]
        files[0].write_text(config_text(sim, backends))
        await wait_for(pilot, lambda: "gamma" not in row_names(app), what="automatic reload")


async def test_sighup_reloads(sim, files):
    async with running(sim, files) as (app, pilot):
        await settled(app, pilot)
        sim.backends["delta"] = SimBackend("delta", "vllm")
        files[0].write_text(config_text(sim, list(sim.backends.values())))
        os.kill(os.getpid(), signal.SIGHUP)
        # The reload that SIGHUP asked for, by its own notice: the file watcher (every 2 s) may
        # pick up the edit first, so the new row alone proves nothing, and a short deadline meant
        # to beat the watcher was a race on a loaded machine.
        await wait_for(
            pilot,
            lambda: any(n.message.startswith("config reloaded (SIGHUP)") for n in app._notifications),
            what="reload on SIGHUP",
        )
        assert "delta" in row_names(app)


# -- view keys ------------------------------------------------------------------------------


async def test_slash_filters_live_and_esc_clears(sim, files):
    async with running(sim, files) as (app, pilot):
        await settled(app, pilot)
        await pilot.press("slash", "o", "l", "l")
        await pilot.pause()
        assert row_names(app) == ["beta"]  # by provider: ollama
        assert "filter 'oll': 1 of 3" in screen_text(app)
        await pilot.press("escape")
        await pilot.pause()
        assert sorted(row_names(app)) == ["alpha", "beta", "gamma"]
        assert table(app).has_focus


async def test_s_cycles_the_sort_and_the_cursor_stays_on_its_backend(sim, files):
    from llmtop.tui.format import SORT_NAMES

    async with running(sim, files) as (app, pilot):
        await settled(app, pilot)
        await select(pilot, app, "beta")
        seen = []
        for _ in SORT_NAMES:
            await pilot.press("s")
            await pilot.pause()
            seen.append(table(app).sort_name)
            assert table(app).selected_name == "beta"
            app.refresh_fleet()  # a tick must not move it either
            await pilot.pause()
            assert table(app).selected_name == "beta"
        assert seen == [*SORT_NAMES[1:], SORT_NAMES[0]]  # every column, then back to status
        assert {"latency", "kv", "age", "models"} <= set(seen)
        await pilot.press("s", "s")  # name, then TTFT, slowest first
        await pilot.pause()
        # Slowest first, by the TTFTs the probes measured and the table shows (a probe that failed
        # on a loaded machine has none and sorts last). Not by the 30/80/150 ms configured: on a
        # loaded core a stall of the shared event loop lands in one probe's TTFT and reorders them,
        # and how true the measurement is belongs to test_integration and the benchmarks. What
        # holds under any load: no TTFT is shorter than the server's own delay.
        ttft = {b.name: b.probe.ttft_ms if b.probe and b.probe.ttft_ms is not None else -1 for b in app.view.fleet.backends}
        assert row_names(app) == sorted(ttft, key=lambda n: -ttft[n])
        configured = {b.name: b.ttft_ms for b in sim.backends.values()}
        assert all(ttft[n] >= configured[n] - 1 for n in ttft if ttft[n] >= 0), (ttft, configured)
        assert "sort: TTFT, slowest first" in screen_text(app)


async def test_g_shows_and_hides_the_gpu_panel(sim, files):
    async with running(sim, files) as (app, pilot):
        await settled(app, pilot)
        gpu = app.screen.query_one(GpuPanel)
        assert gpu.display
        await pilot.press("g")
        assert not gpu.display
        await pilot.press("g")
        assert gpu.display


async def test_enter_opens_details_and_esc_goes_back(sim, files):
    async with running(sim, files, size=(160, 50)) as (app, pilot):
        await settled(app, pilot)
        await select(pilot, app, "beta")
        await pilot.press("enter")
        await pilot.pause()
        assert isinstance(app.screen, DetailScreen) and app.screen.backend == "beta"
        text = screen_text(app)
        assert "beta" in text and "✓ llama3.2" in text and "tokens/hour" in text
        await pilot.press("escape")
        await pilot.pause()
        assert isinstance(app.screen, FleetScreen)
        assert table(app).selected_name == "beta"


async def test_details_draw_their_charts_after_the_first_frame_and_keep_them_for_the_same_backend(sim, files):
    async with running(sim, files, size=(160, 50)) as (app, pilot):
        await settled(app, pilot)
        await select(pilot, app, "beta")
        await pilot.press("enter")
        charts = list(app.screen.query(Chart))
        await wait_for(pilot, lambda: not any(c.pending for c in charts), what="charts drawn")
        assert "seconds ago" in screen_text(app)  # a real plot with its x axis, not the placeholder
        drawn = [c.version for c in charts]
        await pilot.press("escape")
        await pilot.press("enter")  # the same backend again: its charts are shown as drawn, at once
        assert isinstance(app.screen, DetailScreen) and not any(c.pending for c in charts)
        assert all(now >= before for now, before in zip((c.version for c in charts), drawn))
        await pilot.press("escape")
        await select(pilot, app, "alpha")
        await pilot.press("enter")  # another backend: its charts are drawn anew
        assert app.screen.backend == "alpha"
        await wait_for(pilot, lambda: not any(c.pending for c in charts), what="alpha's charts drawn")
        assert all(now > before for now, before in zip((c.version for c in charts), drawn))


async def test_the_mouse_picks_a_row_opens_it_and_sorts_by_a_header(sim, files):
    async with running(sim, files) as (app, pilot):
        await settled(app, pilot)
        t = table(app)
        second = t.names[1]
        # Offsets inside the table: its top border, the header, then one line per row.
        assert await pilot.click(FleetTable, offset=(20, 3))
        assert t.selected_name == second and isinstance(app.screen, FleetScreen)
        assert await pilot.click(FleetTable, offset=(20, 3))  # the row under the cursor: its details
        await wait_for(pilot, lambda: isinstance(app.screen, DetailScreen), what="details")
        assert app.screen.backend == second
        await pilot.press("escape")
        await wait_for(pilot, lambda: isinstance(app.screen, FleetScreen), what="back on the fleet")
        name_x = 1 + 10 + 2  # past the status column and its padding
        assert await pilot.click(FleetTable, offset=(name_x, 1))
        assert (t.sort_name, t.sort_reverse) == ("name", False) and t.names == sorted(t.names)
        assert await pilot.click(FleetTable, offset=(name_x, 1))  # the same header again: the other way
        assert t.sort_reverse and t.names == sorted(t.names, reverse=True)
        assert t.selected_name == second  # the cursor stayed on its backend through both sorts
        assert "name▲" in screen_text(app)


async def test_question_mark_lists_every_key(sim, files):
    async with running(sim, files) as (app, pilot):
        await pilot.press("question_mark")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        text = screen_text(app)
        for words in ("drain / undrain", "reload the config", "filter by", "sort by the next column", "reverse the sort",
                      "pause the screen", "GPU panel", "theme", "quit"):
            assert words in text
        await pilot.press("escape")
        assert isinstance(app.screen, FleetScreen)


async def test_every_help_line_is_whole_at_80_columns_read_only(sim, files):
    # The longest case: --read-only marks the keys it turns off with " [off]" after the words.
    from llmtop.tui.screens.help import KEYS

    async with running(sim, files, size=(80, 24), read_only=True) as (app, pilot):
        await pilot.press("question_mark")
        await pilot.pause()
        text = screen_text(app)
        for key, what, changes in KEYS:
            assert what + (" [off]" if changes else "") in text, what


async def test_T_cycles_the_theme(sim, files):
    async with running(sim, files) as (app, pilot):
        assert app.theme == "llmtop-dark"
        assert {"llmtop-dark", "llmtop-light", "llmtop-high-contrast"} <= set(app.llmtop_themes)
        seen = set()
        before = dict(table(app)._styles)
        for _ in app.llmtop_themes:
            await pilot.press("T")
            seen.add(app.theme)
            if app.theme == "llmtop-light":  # the table's colours follow the theme, not just the chrome
                assert table(app)._styles != before
        assert seen == set(app.llmtop_themes)
        assert app.theme == "llmtop-dark"


async def test_q_quits(sim, files):
    async with running(sim, files) as (app, pilot):
        await pilot.press("q")
        await pilot.pause()
        assert not app.is_running


async def test_once_the_first_round_is_in_the_details_are_built_ahead_and_the_heap_settles(sim, files):
    # At a quiet moment after the first round: the details screen is mounted before the first
    # Enter (which otherwise builds it, a visible moment), and the live screen's long-lived
    # objects leave the collector's view (heap.py). Both once.
    gc.unfreeze()
    try:
        async with running(sim, files, settle_heap=True) as (app, pilot):
            await wait_for(pilot, lambda: gc.get_freeze_count() > 0, what="the heap settled")
            assert app.local.first_round_pending() == 0
            assert app.is_screen_installed("detail")
            await wait_for(pilot, lambda: app.get_screen("detail").is_running, what="the details screen built")
            assert isinstance(app.screen, FleetScreen)  # built, not shown
            frozen = gc.get_freeze_count()
            app.refresh_fleet()
            # Once only: a second freeze would add the thousands of objects made since. (Fewer is
            # fine: the engine's thread frees frozen objects, old snapshots, as it goes on.)
            assert gc.get_freeze_count() <= frozen
            await select(pilot, app, "beta")
            await pilot.press("enter")
            await wait_for(pilot, lambda: isinstance(app.screen, DetailScreen) and "beta" in screen_text(app), what="beta's details")
    finally:
        gc.unfreeze()  # this process runs many more tests


async def test_a_screen_of_remote_agents_settles_once_they_have_answered_not_while_connecting(files):
    # No local backend: the first round is in at once, but the agents' rows are not. The heap
    # settles (and the details are built) once no agent is still connecting.
    agent = FixedSource("rack1", (), "connecting")
    gc.unfreeze()
    try:
        app = LlmtopApp(Engine(Config(), StateStore(files[1])), config_path=None, sources=[agent], settle_heap=True)
        async with app.run_test(size=SIZE) as pilot:
            for _ in range(3):  # ticks while the agent connects (a negative: nothing to wait for)
                app.refresh_fleet()
                await pilot.pause()
            assert gc.get_freeze_count() == 0 and not app.is_screen_installed("detail")
            agent.standing = "connected"
            app.refresh_fleet()
            assert gc.get_freeze_count() > 0 and app.is_screen_installed("detail")
            await quit_app(app)
    finally:
        gc.unfreeze()


# -- faults and sizes -----------------------------------------------------------------------


async def test_a_hung_backend_does_not_delay_keys(sim, files):
    sim.backends["gamma"].fault = "hang"
    async with running(sim, files, timeout_s=30) as (app, pilot):
        await wait_for(pilot, lambda: app.view and app.view.fleet.backend("alpha").probe is not None, what="alpha probed")
        await select(pilot, app, "gamma")
        await pilot.press("p")  # asks the hung backend for more; it answers nothing for 30 s
        # Each key takes effect while the hung request is still held (30 s): nothing waited for it.
        # (The timeouts below are only outer bounds for a broken build, kept under the 30 s.)
        for sort in ("name", "ttft"):
            await pilot.press("s")
            await wait_for(pilot, lambda: table(app).sort_name == sort, timeout=20)
        await select(pilot, app, "alpha")
        await pilot.press("t")
        await wait_for(pilot, lambda: "○ disabled" in screen_text(app), timeout=20, what="disabled badge")
        assert app.view.fleet.backend("gamma").probe is None  # still hanging, and nothing else waited


async def test_p_on_a_backend_that_does_not_answer_shows_it_down_once_its_timeout_passed(sim, files):
    async with running(sim, files, timeout_s=2.0) as (app, pilot):
        await settled(app, pilot)
        sim.backends["gamma"].fault = "hang"
        await select(pilot, app, "gamma")
        # Pressed while a poll of it is already hanging: the key sets off another the moment
        # that one fails, and the round used to wait for both.
        await wait_for(pilot, lambda: app.engine.trackers["gamma"].busy, what="a poll of gamma in flight")
        asked = time.monotonic()
        await pilot.press("p")
        await wait_for(pilot, lambda: app.view.fleet.backend("gamma").status == "down", timeout=10, what="gamma down")
        await wait_for(pilot, lambda: app.view.progress is None, timeout=2, what="the round to end with it")
        # One timeout (2 s), not one per poll the key set off (it took two or more, 4 s and up):
        # the status is on screen, not "probing".
        assert time.monotonic() - asked < 2 * 2.0 - 0.5
        assert "✖ down" in screen_text(app)


async def test_below_the_usable_size_it_says_so(sim, files):
    async with running(sim, files, size=(50, 12)) as (app, pilot):
        await pilot.pause()
        assert "terminal too small (need at least 60x15)" in screen_text(app)
        await pilot.resize_terminal(80, 24)
        await pilot.pause()
        assert "too small" not in screen_text(app)
        assert "3 backends" in screen_text(app)
        assert table(app).has_focus


async def test_compact_layout_fits_80x24(sim, files):
    async with running(sim, files, size=(80, 24)) as (app, pilot):
        await settled(app, pilot)
        header = next(line for line in screen_text(app).splitlines() if "status" in line and "name" in line)
        for column in ("TTFT", "tok/s", "queue", "KV", "models", "circuit"):
            assert column in header
        assert "provider" not in header
        await pilot.resize_terminal(200, 50)
        await pilot.pause()
        header = next(line for line in screen_text(app).splitlines() if "status" in line and "name" in line)
        for column in ("provider", "latency", "age", "TTFT trend"):
            assert column in header


async def test_run_tui_rejects_an_unknown_theme(capsys):
    from argparse import Namespace

    from llmtop.tui.run import run_tui

    args = Namespace(config=None, state=None, demo=False, theme="no-such-theme", read_only=False)
    assert await asyncio.to_thread(run_tui, args) == 2
    err = capsys.readouterr().err
    assert "unknown theme 'no-such-theme'" in err and "llmtop-dark" in err


async def test_run_tui_reports_a_broken_config_in_one_line(tmp_path, capsys):
    from argparse import Namespace

    from llmtop.tui.run import run_tui

    bad = tmp_path / "llmtop.toml"
    bad.write_text('[[backend]]\nname = "a"\nprovider = "vllm"\nurl = "not a url"\n')
    args = Namespace(config=str(bad), state=str(tmp_path / "s.json"), demo=False, theme=None, read_only=False)
    assert await asyncio.to_thread(run_tui, args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "backend 'a'.url" in err and "Traceback" not in err


async def test_a_bad_theme_file_is_skipped_with_its_name_and_key(tmp_path):
    from llmtop.tui.themes import load_themes

    (tmp_path / "mine.toml").write_text('name = "mine"\nprimary = "#123456"\nerror = "reddish"\n')
    (tmp_path / "ok.toml").write_text('name = "ok"\nprimary = "#123456"\n')
    loaded = load_themes((tmp_path,))
    assert loaded.names == ("ok",)
    assert "mine.toml" in loaded.errors[0] and "'error'" in loaded.errors[0]


# -- formatting (pure) ------------------------------------------------------------------------


def _snap(**kw):
    from llmtop.snapshot import BackendSnapshot

    base = dict(
        name="x", provider="vllm", url="http://h", status="healthy", status_reason=None, circuit="closed",
        admin="active", enabled=True, latency_ms=None, models=(), expected_models=(), missing_models=(),
        alerts=(), metrics=None, probe=None, error=None, error_rate=None, last_health_at=None,
        retry_after_at=None, probe_tokens_per_hour=0.0,
    )
    return BackendSnapshot(**{**base, **kw})


def test_every_state_reads_without_colour():
    from llmtop.tui import format as fmt

    for status in ("healthy", "degraded", "down", "loading", "unknown"):
        assert status in fmt.status_badge(_snap(status=status)).text
    # One meaning at every width: the symbol is health, the word the operator's state when set.
    assert fmt.status_badge(_snap(admin="draining")).text == "● draining"
    assert fmt.status_badge(_snap(admin="draining", status="down")).text == "✖ draining"
    assert fmt.status_badge(_snap(admin="disabled")).text == "○ disabled"
    assert [fmt.circuit_badge(_snap(circuit=c)).text for c in ("closed", "open", "half_open")] == ["closed", "OPEN", "half-open"]


def test_figures_past_their_alarm_level_are_marked():
    from llmtop.snapshot import Metrics, ProbeSummary
    from llmtop.tui import format as fmt

    probe = ProbeSummary("m", ttft_ms=6200, tokens_per_s=3.5, output_tokens=8, tokens_estimated=True, error=None, at=0)
    b = _snap(probe=probe, last_ok_probe=probe, metrics=Metrics(requests_waiting=12, kv_cache_usage=0.97),
              models=("a",), expected_models=("a", "b"), missing_models=("b",), stale_after_s=100)
    # Past the alarm level: "!!"; past the warning level: "!"; so neither needs colour.
    assert fmt.ttft_cell(b, slow_ms=5000, now=1) == fmt.Cell("6.2s!!", fmt.BAD)
    assert fmt.ttft_cell(b, slow_ms=8000, now=1) == fmt.Cell("6.2s!", fmt.WARN)
    assert fmt.tps_cell(b, now=1) == fmt.Cell("3.5~!!", fmt.BAD)
    assert fmt.queue_cell(b) == fmt.Cell("12!!", fmt.BAD)
    assert fmt.kv_cell(b) == fmt.Cell("97%!!", fmt.BAD)
    assert fmt.models_cell(b) == fmt.Cell("1/2!", fmt.WARN)
    assert fmt.ttft_cell(_snap(), slow_ms=5000, now=1) == fmt.NONE
    # Old figures (the backend is down now, or they outlived two probe intervals) are in parentheses.
    assert fmt.ttft_cell(_snap(**{**b.__dict__, "status": "down"}), slow_ms=5000, now=1) == fmt.Cell("(6.2s)", fmt.MUTED)
    assert fmt.tps_cell(b, now=1000) == fmt.Cell("(3.5~)", fmt.MUTED)
    # A list that could not be read is unknown, never "all served".
    assert fmt.models_cell(_snap(models=None, expected_models=("a", "b"))).text == "?/2"


def test_sorts_put_what_needs_attention_first():
    from llmtop.snapshot import Metrics, ProbeSummary
    from llmtop.tui import format as fmt

    def probed(name, ttft, tps, **kw):
        p = ProbeSummary("m", ttft, tps, 8, False, None, 0)
        return _snap(name=name, probe=p, last_ok_probe=p, **kw)

    fleet = [
        probed("a", 50, 100, metrics=Metrics(requests_waiting=0)),
        probed("b", 900, 20, status="degraded", metrics=Metrics(requests_waiting=7)),
        _snap(name="c", status="down"),
        probed("d", 300, 5, admin="draining"),
    ]
    order = {name: [b.name for b in sorted(fleet, key=fmt.SORT_KEYS[name])] for name in fmt.SORT_NAMES}
    assert order["status"] == ["c", "b", "d", "a"]
    assert order["ttft"] == ["b", "d", "a", "c"]  # slowest first, never-probed last
    assert order["tps"] == ["d", "b", "a", "c"]
    assert order["queue"] == ["b", "a", "c", "d"]
    assert order["circuit"] == ["a", "b", "c", "d"]  # all closed: by name


def test_shipped_themes_all_load():
    from llmtop.tui.themes import load_themes, shipped_themes_dir

    loaded = load_themes((shipped_themes_dir(),))
    assert loaded.errors == ()
    assert {"llmtop-dark", "llmtop-light", "llmtop-high-contrast"} <= set(loaded.names)


def test_theme_files_can_be_named_by_file_name(tmp_path):
    from llmtop.tui.themes import load_themes

    (tmp_path / "night-shift.toml").write_text('name = "My Night Shift"\nprimary = "#123456"\n')
    loaded = load_themes((tmp_path,))
    assert loaded.resolve("night-shift") == loaded.resolve("My Night Shift") == "My Night Shift"
    assert loaded.resolve("nope") is None


async def test_gpu_panel_shows_live_nvml_readings_and_their_history(sim, files, monkeypatch):
    import pynvml
    from fake_nvml_lib import FakeDevice, FakeDriver, install

    from llmtop.gpu import GpuReader

    config_path, state_path = files
    config_path.write_text(config_text(sim, list(sim.backends.values())))
    gpu = FakeDevice(util_gpu=87, temperature=61, power_mw=312_500)
    install(monkeypatch, FakeDriver([gpu]))  # the real pynvml, over a stand-in driver library
    engine = Engine(load_config(config_path), StateStore(state_path), gpu=GpuReader(nvml=pynvml, cache_s=0.1))
    app = LlmtopApp(engine, config_path=config_path)
    async with app.run_test(size=(200, 50)) as pilot:
        await wait_for(pilot, lambda: app.view is not None and app.view.fleet.gpu.gpus, what="a GPU reading")
        app.refresh_fleet()
        await pilot.pause()
        text = screen_text(app)
        assert "H100" in text and "87%" in text and "61°C" in text and "312" in text
        gpu.util_gpu = 12
        await wait_for(pilot, lambda: app.local.snapshot().gpu.gpus[0].utilization_pct == 12, what="the new GPU reading")
        app.refresh_fleet()
        await pilot.pause()
        assert "12%" in screen_text(app)
        history = app.view.gpu_history.util(0)
        assert 87.0 in history and history[-1] == 12.0
        assert app.view.gpu_history.memory(0)[-1] == 0.5  # 40 of 80 GiB: the memory history the details draw
        await quit_app(app)


async def test_the_gpu_panel_names_the_backends_whose_server_uses_each_gpu(sim, files, monkeypatch, tmp_path):
    """The simulator serving the configured backends listens in this very process; the stand-in
    driver lists this process on GPU 0. The panel names what it serves (owners.py, from the real
    /proc: the listening socket and its owner), and `check`'s JSON carries it per process."""
    import os

    import pynvml
    from fake_nvml_lib import FakeDevice, FakeDriver, FakeProcess, install

    from llmtop.gpu import GpuReader

    config_path, state_path = files
    backends = list(sim.backends.values())[:1]  # one backend: its name alone is shown
    config_path.write_text(config_text(sim, backends))
    root = tmp_path / "proc" / str(os.getpid())  # gpu.py's own check that the pid maps the GPU
    root.mkdir(parents=True)
    (root / "cmdline").write_bytes(b"python3\0-m\0vllm\0")
    (root / "maps").write_text("7f10 rw-s 00000000 00:05 7 /dev/nvidia0\n")
    install(monkeypatch, FakeDriver([FakeDevice(compute=[FakeProcess(os.getpid(), 30 * 1024**3)]), FakeDevice(name="NVIDIA A10")]))
    engine = Engine(load_config(config_path), StateStore(state_path), gpu=GpuReader(nvml=pynvml, cache_s=0.1, proc_root=str(tmp_path / "proc")))
    app = LlmtopApp(engine, config_path=config_path)
    async with app.run_test(size=(200, 50)) as pilot:
        await wait_for(pilot, lambda: app.view is not None and app.view.fleet.gpu.gpus, what="a GPU reading")
        app.refresh_fleet()
        name = backends[0].name
        await wait_for(pilot, lambda: f"{name} 30G" in screen_text(app), what="the GPU panel naming the backend")
        lines = [line for line in screen_text(app).splitlines() if "H100" in line or "A10" in line]
        assert any(f"{name} 30G" in line for line in lines if "H100" in line), lines
        assert not any(name in line for line in lines if "A10" in line), lines
        assert engine.gpu_status.gpus[0].processes[0].backend == name
        await select(pilot, app, name)
        await pilot.press("enter")  # details: the GPUs this backend's server uses, and what it holds there


        def metrics_panel() -> str:
            panels = app.screen.query("#fact-metrics")
            return str(panels.first().content) if panels else ""

        await wait_for(pilot, lambda: "this backend 30.0 GiB" in metrics_panel(), what="the GPU lines in details")
        line = next(line for line in metrics_panel().splitlines() if line.startswith("GPU 0"))
        assert line.startswith("GPU 0 H100 80GB HBM3: util 87% ") and " mem 40/80 GiB " in line
        assert any(c in "▁▂▃▄▅▆▇█" for c in line.split(" mem ")[1])  # the memory history's sparkline
        await quit_app(app)


# -- regressions found in review ------------------------------------------------------------------


async def test_markup_like_text_in_a_name_or_error_is_shown_not_parsed(sim, files):
    config_path, _ = files
    backends = list(sim.backends.values())
    config_path.write_text(config_text(sim, backends).replace('name = "alpha"', 'name = "gpu[/rack]"'))
    async with running(sim, files) as (app, pilot):
        await wait_for(pilot, lambda: app.view is not None and "gpu[/rack]" in row_names(app), what="the row")
        await select(pilot, app, "gpu[/rack]")
        await pilot.press("t")  # the notice quotes the name: it used to crash the app
        await wait_for(pilot, lambda: app.view.fleet.backend("gpu[/rack]").admin == "disabled", what="disabled")
        assert any("gpu[/rack]" in str(n.message) for n in app._notifications)
        # Shown as markup, "[/rack]" raised MarkupError when the toast rendered and ended the app.
        assert all(n.markup is False for n in app._notifications)


async def test_enter_in_the_drain_question_means_no(sim, files):
    async with running(sim, files) as (app, pilot):
        await settled(app, pilot)
        await select(pilot, app, "alpha")
        await pilot.press("d", "enter")
        await writes_done(app, pilot)
        assert StateStore(files[1]).admin("alpha") == "active"


async def test_keys_do_nothing_while_the_screen_is_too_small(sim, files):
    async with running(sim, files, size=(50, 12)) as (app, pilot):
        await wait_for(pilot, lambda: app.view is not None and all(b.probe for b in app.view.fleet.backends))
        await pilot.press("t", "d", "y")
        await writes_done(app, pilot)
        assert StateStore(files[1])._admin == {}
        assert "terminal too small" in screen_text(app)


async def test_a_stuck_state_file_lock_does_not_freeze_the_screen(sim, files):
    import fcntl

    state_path = files[1]
    async with running(sim, files) as (app, pilot):
        await settled(app, pilot)
        await select(pilot, app, "alpha")
        with open(state_path.with_name(state_path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another llmtop, mid-write
            await pilot.press("t")
            start = time.monotonic()
            await pilot.press("s")  # the UI still answers while the write waits for the lock
            await pilot.pause()
            assert time.monotonic() - start < 3.0  # the lock is held for good: a blocked loop would never get here
            assert StateStore(state_path)._admin == {}
        await wait_for(pilot, lambda: StateStore(state_path).admin("alpha") == "disabled", what="the write after the lock")


async def test_probe_all_on_an_empty_fleet_leaves_no_timer_running(sim, files):
    config_path, _ = files
    config_path.write_text("[settings]\nhealth_interval_s = 0.5\n")
    async with running(sim, files) as (app, pilot):
        await pilot.press("P")
        await pilot.pause()
        assert app._round_timer is None


async def test_a_held_screen_does_not_hold_the_engine(tmp_path):
    # The engine runs on a loop of its own (local.py): while the screen's loop is stuck (a slow
    # draw, a widget busy), polls and a probe asked for just before still go out and are read.
    # On the screen's loop, nothing at all was sent until it was let go.
    solo = SimBackend("solo", ttft_ms=5, gap_ms=5)
    sim = Simulator([solo]).start_in_thread()
    try:
        config_path = tmp_path / "llmtop.toml"
        config_path.write_text(config_text(sim, [solo]).replace("health_interval_s = 0.5", "health_interval_s = 0.1"))
        engine = Engine(load_config(config_path), StateStore(tmp_path / "state.json"))
        app = LlmtopApp(engine, config_path=config_path)
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: (b := app.local.snapshot().backend("solo")) is not None and b.probe is not None, what="a first probe")
            first = app.local.snapshot().backend("solo").probe.at

            def served(kind: str) -> int:
                return sum(n for path, n in list(solo.requests.items()) if ("completions" in path) == (kind == "probe"))

            polls, probes = served("poll"), served("probe")
            app.local.call_soon(engine.force_probe, ["solo"])
            held_until = time.monotonic() + 30  # outer bound only: on the screen's loop this ran out
            while (served("poll") < polls + 3 or served("probe") <= probes) and time.monotonic() < held_until:
                time.sleep(0.01)  # holding this loop is the point: nothing on it runs meanwhile
            assert served("poll") >= polls + 3 and served("probe") > probes
            await wait_for(pilot, lambda: app.local.snapshot().backend("solo").probe.at != first, what="the probe read")
            await quit_app(app)
    finally:
        sim.stop_thread()


@pytest.mark.parametrize("listen", [None, "127.0.0.1:0"], ids=["plain", "serving"])
async def test_quitting_does_not_wait_on_a_stuck_engine(sim, files, listen, monkeypatch):
    # The engine's loop stuck in a long call (a parse, a driver call gone wrong): q still ends the
    # screen, closing what it can (serve's site too: it lives on that loop) within local.CLOSE_S;
    # the stuck thread is a daemon and goes with the process. (Shorter bounds: the same code, sooner.)
    monkeypatch.setattr(local, "CLOSE_S", 0.5)
    monkeypatch.setattr(loopthread, "STOP_S", 0.3)
    stuck = threading.Event()
    config_path, state_path = files
    config_path.write_text(config_text(sim, list(sim.backends.values())))
    app = LlmtopApp(Engine(load_config(config_path), StateStore(state_path)), config_path=config_path, listen=listen)

    async def quit_while_stuck() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await settled(app, pilot)
            app.local.call_soon(stuck.wait)
            await pilot.press("q")
        # run_test returns once the app has ended, on_unmount and all

    ending = asyncio.ensure_future(quit_while_stuck())
    try:
        done, _ = await asyncio.wait({ending}, timeout=30)  # outer bound only: unbounded, it never ended
    finally:
        stuck.set()  # lets a failed run end, rather than hang the suite
    assert ending in done
    await ending


async def test_a_stuck_engine_is_said_and_keys_and_reloads_go_on(sim, files, monkeypatch):
    # Its figures are not current: the screen says so, and says when it is back. Meanwhile a
    # reload (r, SIGHUP, an edited file) must not hold the keys behind the stuck loop.
    monkeypatch.setattr(local, "STALL_S", 0.3)
    stuck = threading.Event()
    try:
        async with running(sim, files) as (app, pilot):
            await settled(app, pilot)

            app.local.call_soon(stuck.wait)
            said = len(app._notifications)  # only what is said from here on counts (a loaded machine may stall briefly before)

            def told(words: str) -> bool:
                return any(words in n.message for n in list(app._notifications)[said:])

            await wait_for(pilot, lambda: told("engine has not answered"), what="the stall said")
            app.reload_config("r")
            await wait_for(pilot, lambda: any(w.group == "config-apply" for w in app.workers), what="the reload under way")
            before = table(app).sort_name
            await pilot.press("s")
            await wait_for(pilot, lambda: table(app).sort_name != before, what="a key taken while the engine is stuck")
            stuck.set()
            await wait_for(pilot, lambda: told("config reloaded (r)"), what="the reload, once the engine is back")
            await wait_for(pilot, lambda: told("engine is answering again"), what="the recovery said")
    finally:
        stuck.set()
