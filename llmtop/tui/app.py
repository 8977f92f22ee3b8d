"""The Textual app: shows a snapshot (its own engine's backends, run on a thread of their own by local.py, and remote agents') each tick, and turns keys into engine or agent calls."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

from textual import constants, events, work
from textual.app import App
from textual.binding import Binding
from textual.message import Message
from textual.screen import Screen

from llmtop import heap
from llmtop.config import Config, ConfigError, load_config
from llmtop.engine import Engine
from llmtop.local import LocalEngine
from llmtop.remote import ActionRefused, Source, SourceState
from llmtop.remote.merged import MergedFleet
from llmtop.sanitize import for_terminal
from llmtop.snapshot import FleetSnapshot, TerminalView
from llmtop.state import LIFTS, StateError, admin_after
from llmtop.tui.messages import READ_ONLY_ACTIONS, AdminRequested, DetailsRequested, ProbeRequested
from llmtop.tui.screens.confirm import ConfirmScreen
from llmtop.tui.screens.detail import DetailScreen
from llmtop.tui.screens.fleet import FleetScreen
from llmtop.tui.screens.help import HelpScreen
from llmtop.tui.terminal import terminal_hung_up
from llmtop.tui.themes import DEFAULT_THEME, load_themes, save_theme
from llmtop.tui.view import FleetView, GpuHistory, Progress
from llmtop.tui.widgets.filter_bar import FilterBar
from llmtop.tui.widgets.too_small import MIN_HEIGHT, MIN_WIDTH

TICK_S = 1.0
ROUND_TICK_S = 0.25  # while a requested probe round runs, so its progress moves visibly
CONFIG_CHECK_S = 2.0
READ_ONLY = "read-only mode: drain, enable/disable and reload are turned off"
STALL_SAID_S = 30.0  # a stalled engine is said this often, for as long as it lasts
WRITES_BEFORE_EXIT_S = 5.0  # how long quitting waits for a state or prefs write still under way
LIFT_KEYS = {"undrain": "d undrains it", "enable": "t enables it"}

Stamp = tuple[int, int] | None


def _safe_state(state: SourceState) -> SourceState:
    """A source's name and reason as they may be printed (a reason may quote an agent)."""
    return dataclasses.replace(
        state, name=for_terminal(state.name, 40), url=for_terminal(state.url, 120),
        detail=None if state.detail is None else for_terminal(state.detail, 160),
    )


def _stamp(path: Path) -> Stamp:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def no_backends_hint(config_path: Path) -> str:
    return f"no backends in {config_path}: add a [[backend]] with name, provider and url, then r reloads"


class ConfigLoaded(Message):
    def __init__(self, config: Config, stamp: Stamp, why: str) -> None:
        super().__init__()
        self.config, self.stamp, self.why = config, stamp, why


class ConfigFailed(Message):
    def __init__(self, error: str, stamp: Stamp, why: str) -> None:
        super().__init__()
        self.error, self.stamp, self.why = error, stamp, why


class LlmtopApp(App):
    CSS_PATH = "app.tcss"
    TITLE = "llmtop"
    ENABLE_COMMAND_PALETTE = False  # every action has its own key, and the footer has no room to spare at 80 columns
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (MIN_WIDTH, "-medium"), (140, "-wide")]
    VERTICAL_BREAKPOINTS = [(0, "-short"), (MIN_HEIGHT, "-middling"), (36, "-tall")]
    BINDINGS = [
        Binding("q", "quit", "Quit"),
        Binding("ctrl+c", "quit", show=False, priority=True),  # what a terminal user's fingers do; not a copy here
        Binding("question_mark", "help", "Help"),
        Binding("P", "probe_all", "Probe all", show=False),
        Binding("r", "reload", "Reload", show=False),
        Binding("T", "cycle_theme", "Theme", show=False),
        Binding("space", "pause", "Pause", show=False),
    ]

    def __init__(
        self,
        engine: Engine,
        *,
        config_path: Path | None,
        read_only: bool = False,
        theme: str | None = None,
        live: bool = True,
        hint: str | None = None,
        prefs_path: Path | None = None,
        listen: str | None = None,
        agent_listen: str | None = None,
        sources: list[Source] | None = None,
        settle_heap: bool = False,
    ) -> None:
        super().__init__()
        self.engine = engine
        # The engine runs on a loop of its own (local.py): the UI reads what it publishes and asks
        # it to act through `local`, never calling into it from this loop.
        self.local = LocalEngine(engine)
        # What the screen shows: the engine's own backends and those of each remote source (--connect).
        self.fleet_source = MergedFleet(self.local.snapshot, list(sources or ()))
        # serve's endpoints while the screen runs (--listen, --agent-listen): a balancer or a
        # Prometheus sees what this screen sees, and a `d` here drains it there.
        self._listen, self._agent_listen = listen, agent_listen
        self._served: list = []
        self.config_path = config_path
        self.read_only = read_only
        self.live = live
        self.hint = hint
        loaded = load_themes()
        for t in loaded.themes:
            self.register_theme(t)
        self.llmtop_themes = loaded.names
        self._theme_errors = loaded.errors
        fallback = DEFAULT_THEME if DEFAULT_THEME in self.llmtop_themes else "textual-dark"
        self.theme = theme or fallback
        self.view: FleetView | None = None
        # A probe round the operator asked for: name -> when it was last polled and probed when
        # asked (times, not objects: screens get copies), to see it answer.
        self._round: dict[str, tuple[float | None, float | None] | None] = {}  # None: waiting for the engine to say
        self._round_total = 0
        self._round_deadline = 0.0
        self._round_timer = None
        self._config_stamp: Stamp = _stamp(config_path) if config_path else None
        self._state_error: str | None = None
        # The one place snapshots become what screens show: every text from a backend or the
        # config made safe to print (snapshot.TerminalView, sanitize.py).
        self._terminal_view = TerminalView()
        self._gpu_history = GpuHistory()
        self.paused = False
        self.prefs_path = prefs_path  # where the theme chosen with T is remembered; None: nowhere
        # Admin changes and prefs writes run one at a time, in the order of the keys that asked for
        # them, each deciding against the state the previous one left (`t t` toggles twice).
        self._write_lock = asyncio.Lock()
        self._writes_pending = 0
        self._writes_done = asyncio.Event()
        self._writes_done.set()
        self._quitting = False
        # Once the first round is in (or heap.SETTLE_AFTER_S has passed), at a quiet moment: the
        # details screen is built ahead of the first Enter, and (the live screen's choice, not a
        # test's, whose process outlives many apps) the long-lived objects leave the collector's view.
        self._settle_heap = settle_heap
        self._first_round_by: float | None = None
        self._engine_stalled: float | None = None  # when a stalled engine was last said

    def get_driver_class(self):
        if sys.platform == "win32" or constants.DRIVER is not None:
            return super().get_driver_class()
        from llmtop.tui.terminal import LlmtopDriver

        return LlmtopDriver

    def notify(self, message: str, *, markup: bool = False, **kwargs) -> None:
        """Plain, printable text unless asked: messages quote backend names, config errors and
        theme files, where a "[/x]" read as markup crashed the app and an escape sequence would
        reach the terminal."""
        super().notify(message if markup else for_terminal(message, 400), markup=markup, **kwargs)

    def get_default_screen(self) -> Screen:
        return FleetScreen()

    def on_details_requested(self, message: DetailsRequested) -> None:
        detail = self._details_screen()
        detail.select(message.backend, self.view)
        self.push_screen(detail)

    def _details_screen(self, build: bool = False) -> DetailScreen:
        """The one DetailScreen, installed and reused: a popped installed screen stays built, so
        reopening is quick. `build`: mount its widgets now, before it is first shown: the first
        Enter then takes 56-100 ms at 300 backends instead of 304-498 ms (benchmarks/bench_tui.py).
        Textual has no public call for that; without it the first Enter just builds it then."""
        if not self.is_screen_installed("detail"):
            self.install_screen(DetailScreen(), "detail")
        detail = self.get_screen("detail")
        mount = getattr(self, "_get_screen", None)  # registers and mounts an installed screen, shows nothing
        if build and mount is not None and not detail.is_running:
            mount("detail")
        return detail

    def on_load(self) -> None:
        # Before the terminal goes into application mode, so no signal finds it half set up.
        if self.live:
            self._install_signals()

    async def on_mount(self) -> None:
        # Screens take this first view themselves when they mount; ticks push the later ones.
        self.view = self._build_view()
        for error in self._theme_errors:
            self.notify(error, severity="warning", timeout=10)
        if self.live:
            await self.local.start()
            self._first_round_by = time.monotonic() + heap.SETTLE_AFTER_S
            await self.fleet_source.start()
            self.set_interval(TICK_S, self.refresh_fleet)
            if self.config_path is not None:
                self.set_interval(CONFIG_CHECK_S, self._check_config_file)
            await self._start_serving()

    async def _start_serving(self) -> None:
        if self._listen is None and self._agent_listen is None:
            # Nothing to serve: not even an import. serve.http brings aiohttp, whose import makes
            # its TLS contexts: 0.2 s of CPU at every start of a screen that serves nothing.
            return
        from llmtop.serve.agent import AgentServer
        from llmtop.serve.http import ServeSite

        for make, address, what in ((ServeSite, self._listen, "HTTP"), (AgentServer, self._agent_listen, "HAProxy agent-check")):
            if address is None:
                continue
            server = make(self.engine, address)
            try:
                await self.local.run(server.start)  # on the engine's loop, whose snapshots it answers from
            except OSError as exc:
                self.notify(f"not serving {what}: {exc.strerror or exc}", severity="error", timeout=15)
                continue
            self._served.append(server)
            self.notify(f"serving {what} on {address.rpartition(':')[0]}:{server.port}")

    async def on_unmount(self) -> None:
        if self.live:
            self._remove_signals()
            await self.fleet_source.stop()
            # serve's servers live on the engine's loop: stopped there, first, within the same bound.
            await self.local.stop(*(server.stop for server in self._served))

    # -- the tick ---------------------------------------------------------------------------

    def refresh_fleet(self) -> None:
        """Take a snapshot and show it on every screen that shows one (cheap: snapshots are cached per backend)."""
        if not self.is_running:
            return  # shutting down: a last tick would query widgets already removed from their screens
        if self.live:
            self._refresh_state()
            self._check_engine()
        if self._first_round_by is not None and (self._first_round_in() or time.monotonic() >= self._first_round_by):
            self._first_round_by = None
            self._details_screen(build=True)
            if self._settle_heap:
                heap.settle()
        if self.paused:
            return  # the screen holds still; the engine goes on
        self.view = self._build_view()
        for screen in self.screen_stack:
            show = getattr(screen, "show_fleet", None)
            if show is not None:
                show(self.view)

    def _check_engine(self) -> None:
        """Say when the engine's loop has stopped publishing (its figures are not current any
        more), and when it is back."""
        stalled = self.local.stalled()
        now = time.monotonic()
        if stalled is not None and (self._engine_stalled is None or now - self._engine_stalled >= STALL_SAID_S):
            # Said again while it lasts: a notice times out, and the figures stay old.
            why = f" ({for_terminal(self.local.error, 200)})" if self.local.error else ""
            self.notify(f"llmtop's engine has not answered for {stalled:.0f} s{why}: the figures shown are not current", severity="error", timeout=STALL_SAID_S)
            self._engine_stalled = now
        elif stalled is None and self._engine_stalled is not None:
            self.notify("llmtop's engine is answering again")
            self._engine_stalled = None

    def _first_round_in(self) -> bool:
        """Every local backend polled once, and every remote source past connecting (its rows in,
        or its failure known)."""
        return not self.local.first_round_pending() and all(s.standing != "connecting" for s in self.fleet_source.states())

    def _build_view(self) -> FleetView:
        fleet = self._terminal_view(self.fleet_source.snapshot())
        probing = self._round_progress(fleet)
        self._gpu_history.add(fleet.gpu)
        return FleetView(
            gpu_history=self._gpu_history,
            sources=tuple(_safe_state(s) for s in self.fleet_source.states()),
            fleet=fleet,
            settings=self.local.settings,
            probing=probing,
            progress=Progress(self._round_total - len(probing), self._round_total) if self._round else None,
            read_only=self.read_only,
            hint=self.hint,
            paused=self.paused,
        )

    def _refresh_state(self) -> None:
        """Pick up a `llmtop drain X` run from another shell (the file is read off the loop)."""
        # The method, not a coroutine: one never started (the app quitting) is never left unawaited.
        self.run_worker(self._read_state, group="state-read", exclusive=True, exit_on_error=False)

    async def _read_state(self) -> None:
        try:
            await self.local.run(self.engine.refresh_state)
        except StateError as exc:
            if str(exc) != self._state_error:
                self.notify(str(exc), severity="error", timeout=10)
            self._state_error = str(exc)
        else:
            self._state_error = None

    # -- probe rounds -----------------------------------------------------------------------

    def on_probe_requested(self, message: ProbeRequested) -> None:
        fleet = self.fleet_source.snapshot()
        backends = {b.name: b for b in fleet.backends}
        names = list(backends) if message.names is None else [n for n in message.names if n in backends]
        if message.names is not None and len(names) == 1:
            b = backends[names[0]]
            # Say up front what the engine will skip, rather than show a probe that never comes.
            if b.admin == "disabled":
                self.notify(f"{b.name} is disabled: nothing is sent to it (t enables it)", severity="warning")
                return
            if b.admin == "draining":
                self.notify(f"{b.name} is draining: health, models and metrics only, no completion probe")
        if not names:
            return  # nothing to probe (an empty fleet, or a backend a reload removed)
        if not self._round:
            self._round_total = 0
        for name in names:
            if name not in self._round:
                probe = backends[name].probe
                self._round[name] = (backends[name].last_health_at, probe.at if probe else None)
                self._round_total += 1
        settings = self.local.settings
        self._round_deadline = time.monotonic() + 2 * settings.timeout_s + settings.health_interval_s
        local = [n for n in names if self.fleet_source.route(n)[0] is None]
        if local:
            # The baselines above come from a published snapshot (up to 0.1 s old): a poll that
            # lands in between would read as the answer. So a local row waits (None) for the
            # engine's own baseline, taken as it forces the round.
            for name in local:
                if name in self._round:
                    self._round[name] = None
            self.run_worker(partial(self._force_local, local), group="probe", exit_on_error=False)
        remote = [n for n in names if self.fleet_source.route(n)[0] is not None]
        if remote:
            self._act_remote(remote, "probe", quiet=message.names is None)
        if self._round_timer is None:
            self._round_timer = self.set_interval(ROUND_TICK_S, self.refresh_fleet)
        self.refresh_fleet()

    async def _force_local(self, names: list[str]) -> None:
        baselines = await self.local.call(self._force_round, names)
        for name, baseline in baselines.items():
            if name in self._round:
                self._round[name] = baseline

    def _force_round(self, names: list[str]) -> dict[str, tuple[float | None, float | None]]:
        """On the engine's loop: force a round for these backends; what each was as it started."""
        self.engine.force_probe(names)
        trackers = self.engine.trackers
        return {
            n: (t.last_health_at, t.probe.at if t.probe else None) for n in names if (t := trackers.get(n)) is not None
        }

    def action_probe_all(self) -> None:
        self.post_message(ProbeRequested(None))

    def _round_progress(self, fleet: FleetSnapshot) -> frozenset[str]:
        """Drop the backends that answered since they were asked; what is left is still probing."""
        if not self._round:
            if self._round_timer is not None:
                self._round_timer.stop()
                self._round_timer = None
            return frozenset()
        for name, baseline in list(self._round.items()):
            b = fleet.backend(name)
            if baseline is None:  # the engine has not said yet where this row's round starts
                if b is None:
                    del self._round[name]
                continue
            health_at, probe_at = baseline
            answered = b is None or (b.probe.at if b.probe else None) != probe_at  # a completion came back
            if not answered and b.last_health_at != health_at:
                # A poll came back. When it says no completion can follow (down, loading, open
                # circuit, nothing to probe), that is the answer: "down" shows as soon as the
                # timeout has passed, not behind "probing" while the next poll hangs too.
                answered = not b.in_flight or b.status in ("down", "loading") or b.circuit == "open" or (
                    b.admin != "active" or b.probe_note is not None or b.retry_after_at is not None
                )
            # A disabled or rate-limited backend is skipped by the engine, so it will never answer.
            if answered or b.admin == "disabled" or b.retry_after_at is not None:
                del self._round[name]
        if not self._round or time.monotonic() > self._round_deadline:
            self._round.clear()
            if self._round_timer is not None:
                self._round_timer.stop()
                self._round_timer = None
        return frozenset(self._round)

    # -- admin state ------------------------------------------------------------------------

    def on_admin_requested(self, message: AdminRequested) -> None:
        if self.read_only:
            self.notify(READ_ONLY, severity="warning")
            return
        b = self.fleet_source.snapshot().backend(message.backend)
        if b is None:
            return
        name = b.name
        refused = self.fleet_source.read_only(name)
        if refused:
            self.notify(f"{name}: {refused}", severity="warning")
            return
        if message.action == "toggle":
            if not b.enabled:
                self.notify(f"{name} has enabled = false in the config; edit the config to turn it on", severity="warning")
                return
            self._set_admin(name, "toggle")
            return
        if b.admin == "draining":
            command, question = "undrain", f"Undrain {name}? Completion probes resume."
        else:
            command = "drain"
            question = (
                f"Drain {name}? Completion probes stop (health, models and metrics go on) and it shows as "
                "draining here, in `llmtop check` and to any llmtop sharing this state file."
            )

        def answered(yes: bool | None) -> None:
            if yes:
                self._set_admin(name, command)

        self.push_screen(ConfirmScreen(question), answered)

    def _set_admin(self, name: str, command: str) -> None:
        """Queue an operator command (drain, undrain, toggle) for `name`; it runs after those before it."""
        self._run_write(partial(self._write_admin, name, command))

    def _run_write(self, write: Callable[[], Awaitable[None]]) -> None:
        self._writes_pending += 1
        self._writes_done.clear()
        # Callables, not coroutines: one never started (the app quitting) is never left unawaited.
        self.run_worker(partial(self._serialised, write), group="state-write", exit_on_error=False)

    async def _serialised(self, write: Callable[[], Awaitable[None]]) -> None:
        try:
            async with self._write_lock:  # FIFO: writes land in the order they were asked for
                await write()
        finally:
            self._writes_pending -= 1
            if not self._writes_pending:
                self._writes_done.set()

    def _act_remote(self, names: list[str], action: str, quiet: bool = False) -> None:
        """Send an action to the agents that watch these rows; each answer or refusal is one toast."""

        async def send() -> None:
            refusals: dict[str, str] = {}
            if action == "probe":  # one request per agent when all its rows are asked (`P`)
                answers = await self.fleet_source.probe(names)
            else:
                answers = []
                for name in names:
                    try:
                        answers.append((name, await self.fleet_source.act(name, action)))
                    except ActionRefused as exc:
                        answers.append((name, exc))
            for name, answer in answers:
                if isinstance(answer, ActionRefused):
                    refusals.setdefault(str(answer).split(":", 1)[0], f"{name}: {answer}")
                elif not quiet:
                    self.notify(answer)
            for line in refusals.values():  # one per agent, not one per row
                self.notify(line, severity="warning", timeout=8)
            self.refresh_fleet()

        self.run_worker(send, group="remote-action", exit_on_error=False)

    async def _write_admin(self, name: str, command: str) -> None:
        b = self.fleet_source.snapshot().backend(name)
        if b is None:
            return  # a reload removed it while the question was open
        if self.fleet_source.route(name)[0] is not None:
            if command == "toggle":
                command = "enable" if b.admin == "disabled" else "disable"
            try:
                self.notify(await self.fleet_source.act(name, command))
            except ActionRefused as exc:
                self.notify(f"{name}: {exc}", severity="warning", timeout=8)
            self.refresh_fleet()
            return
        try:
            changed = await self.local.run(self._change_admin, name, command)
        except StateError as exc:
            self.notify(str(exc), severity="error", timeout=10)
            return
        if changed is None:
            self.notify(f"{name} is no longer in the config: nothing changed", severity="warning")
            return
        command, before, after = changed
        if after == before:
            if command in LIFTS and before != "active":
                self.notify(f"{name} is {before}, not {LIFTS[command]}: left {before} ({LIFT_KEYS[command]})")
            return
        b = self.local.snapshot().backend(name)
        if b is not None:
            self.notify(f"{name}: {b.admin}")
        self.refresh_fleet()

    async def _change_admin(self, name: str, command: str) -> tuple[str, str, str] | None:
        """On the engine's loop: (the command, with a toggle turned into enable or disable; the
        admin state before; after); None when a reload removed the backend meanwhile."""
        if name not in self.engine.trackers:
            return None
        # Decide against the file as it is now, not the snapshot the key saw: the write of a key
        # pressed just before may have landed since, or another llmtop may have written.
        await self.engine.refresh_state()
        before = self.engine.state.admin(name)
        if command == "toggle":
            command = "enable" if before == "disabled" else "disable"
        after = admin_after(before, command)
        if after != before:
            await self.engine.set_admin(name, after)
        return command, before, after

    # -- quitting ---------------------------------------------------------------------------

    def action_quit(self) -> None:
        self.quit()

    def quit(self, return_code: int = 0) -> None:
        """Exit once the keys that came before have had their effect (q, Ctrl-C, SIGTERM, SIGINT).

        `t q` from tmux or a fast typist arrive together: the `t` becomes a message that its
        screen handles and passes up to the app, and an admin write after that. So the exit goes
        through each screen's queue, then the app's, and then waits for the writes.
        """
        if self._quitting:
            return
        self._quitting = True
        self._quit_after([*self.screen_stack], return_code)

    def _quit_after(self, screens: list[Screen], return_code: int) -> None:
        while screens:
            screen = screens.pop(0)
            # Runs after whatever this screen has queued; what that posts to the app is queued before ours.
            if screen.call_later(self.call_later, self._quit_after, screens, return_code):
                return
        self.run_worker(partial(self._quit_when_written, return_code), group="quit", exit_on_error=False)

    async def _quit_when_written(self, return_code: int) -> None:
        try:
            await asyncio.wait_for(self._writes_done.wait(), WRITES_BEFORE_EXIT_S)
        except asyncio.TimeoutError:
            pass  # a state file on a hung disk must not keep the operator from quitting
        self.exit(return_code=return_code)

    # -- config reload ----------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        if action in READ_ONLY_ACTIONS and self.read_only:
            return False  # --read-only hides the keys it turns off
        return super().check_action(action, parameters)

    def action_pause(self) -> None:
        """Freeze the screen to read it (space again resumes); polls and probes go on meanwhile."""
        self.paused = not self.paused
        if not self.paused:
            self.refresh_fleet()
            return
        self.view = self._build_view()  # says "paused" in the header, with the figures of now
        for screen in self.screen_stack:
            show = getattr(screen, "show_fleet", None)
            if show is not None:
                show(self.view)

    def action_reload(self) -> None:
        if self.read_only:
            self.notify(READ_ONLY, severity="warning")
            return
        self.reload_config("r")

    def reload_config(self, why: str) -> None:
        if self.config_path is None:
            self.notify("no config file to reload: these are servers found on local ports (`llmtop init` writes one)")
            return
        self._load_config(why, only_if_changed=False)

    def _check_config_file(self) -> None:
        # Also in --read-only: following an edit someone made to the file changes nothing on its own.
        # Not while a load is under way (SIGHUP's, r's, or one stuck on a slow filesystem): an
        # exclusive worker here cancelled a SIGHUP's load before its thread began, and the reload
        # it asked for was lost whenever the file had not changed.
        if any(w.group == "config" and not w.is_finished for w in self.workers):
            return
        self._load_config("file changed", only_if_changed=True)

    @work(thread=True, group="config", exit_on_error=False)
    def _load_config(self, why: str, only_if_changed: bool) -> None:
        # A thread, because the config may sit on a network filesystem and the UI must not wait on it.
        stamp = _stamp(self.config_path)
        if only_if_changed and stamp == self._config_stamp:
            return
        try:
            config = load_config(self.config_path)
        except ConfigError as exc:
            self.post_message(ConfigFailed(str(exc), stamp, why))
        else:
            self.post_message(ConfigLoaded(config, stamp, why))

    def on_config_loaded(self, message: ConfigLoaded) -> None:
        self._config_stamp = message.stamp
        # In a worker: waited for here, the app's messages (keys, q) would queue behind a busy engine loop.
        self.run_worker(partial(self._apply_config, message), group="config-apply", exit_on_error=False)

    async def _apply_config(self, message: ConfigLoaded) -> None:
        try:
            await self.local.call(self.engine.reload, message.config)
        except Exception as exc:  # noqa: BLE001 - a bug in the engine's reload: said, not swallowed by the worker
            self.notify(f"config not applied ({message.why}): {type(exc).__name__}: {for_terminal(str(exc), 200)}", severity="error", timeout=15)
            return
        # An empty fleet says how to add a backend, and stops saying it once there is one.
        empty = no_backends_hint(self.config_path)
        if not message.config.backends:
            self.hint = empty
        elif self.hint == empty:
            self.hint = None
        self.notify(f"config reloaded ({message.why}): {len(message.config.backends)} backends")
        self.refresh_fleet()

    def on_config_failed(self, message: ConfigFailed) -> None:
        self._config_stamp = message.stamp  # retry only when the file changes again
        self.local.call_soon(self.engine.note_config_error, message.error)  # in the events log with the next publication
        self.notify(f"config not reloaded ({message.why}): {message.error}", severity="error", timeout=15)
        self.refresh_fleet()

    def _install_signals(self) -> None:
        """SIGHUP reloads (or ends us when the terminal is gone); SIGTERM and SIGINT (a `kill`, not
        a key: the terminal is in raw mode) end the app the normal way, which restores the terminal
        and stops the demo's simulator."""
        handlers = {"SIGHUP": self._on_sighup, "SIGTERM": self._on_terminate, "SIGINT": self._on_terminate}
        loop = asyncio.get_running_loop()
        for name, handler in handlers.items():
            if hasattr(signal, name):  # Windows has no SIGHUP
                try:
                    sig = getattr(signal, name)
                    loop.add_signal_handler(sig, handler, sig)
                except (NotImplementedError, RuntimeError, ValueError):
                    pass  # not the main thread (tests), or a loop without signal support

    def _remove_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for name in ("SIGHUP", "SIGTERM", "SIGINT"):
            if hasattr(signal, name):
                try:
                    loop.remove_signal_handler(getattr(signal, name))
                except (NotImplementedError, RuntimeError, ValueError):
                    pass

    def _on_terminate(self, sig: int) -> None:
        self.quit(128 + sig)

    def _on_sighup(self, sig: int) -> None:
        # SIGHUP means "reload" to a daemon but "your terminal is gone" to a terminal program; tell them apart.
        if terminal_hung_up():
            self.quit(128 + sig)
        else:
            self.reload_config("SIGHUP")

    # -- the rest ---------------------------------------------------------------------------

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen(self.read_only))

    async def on_event(self, event: events.Event) -> None:
        if isinstance(event, events.Key) and event.key == "slash" and not event.is_forwarded and self._open_filter_now():
            return
        await super().on_event(event)

    def _open_filter_now(self) -> bool:
        """`/` opens the filter with the focus in it at once.

        Textual sends each key to whatever has the focus when the app reads it, and focus() takes
        effect only after the keys already read: `/fast` typed quickly went to the table instead,
        where `s` re-sorted and `t` disabled the selected backend. So the app moves the focus
        itself, before it reads the next key. (A binding would do it too, but would take `/ Filter`
        out of the footer.)
        """
        screen = self.screen
        if not isinstance(screen, FleetScreen) or isinstance(self.focused, FilterBar) or not screen.check_action("filter", ()):
            return False  # not the fleet's `/`, or blind while too small: the key goes its usual way
        screen.action_filter()
        screen.set_focus(screen.query_one(FilterBar))
        return True

    def action_cycle_theme(self) -> None:
        names = self.llmtop_themes or (self.theme,)
        index = names.index(self.theme) if self.theme in names else -1
        self.theme = names[(index + 1) % len(names)]
        self.notify(f"theme: {self.theme}")
        if self.prefs_path is not None:
            self._run_write(self._save_theme)

    async def _save_theme(self) -> None:
        try:  # the theme at the time of writing: after `T T` the last write holds the last choice
            await asyncio.to_thread(save_theme, self.prefs_path, self.theme)
        except OSError as exc:
            self.notify(f"{self.prefs_path}: theme not remembered ({exc.strerror})", severity="warning")

