"""`llmtop` with no subcommand: pick the fleet (config, --demo, or local discovery), then run the app."""

from __future__ import annotations

import asyncio
import sys
from contextlib import ExitStack
from pathlib import Path

from llmtop.config import Config, ConfigError, load_config, resolve_config_path
from llmtop.demo import DemoFleet
from llmtop.engine import Engine
from llmtop.gpu import GpuReader
from llmtop.paths import default_config_path, default_state_path, ui_prefs_path
from llmtop.sanitize import for_terminal
from llmtop.state import StateError, StateStore
from llmtop.tui.app import LlmtopApp, no_backends_hint
from llmtop.tui.themes import LoadedThemes, load_saved_theme, load_themes


NO_TERMINAL = (
    "the live screen needs a terminal on stdin and stderr (over SSH: ssh -t HOST llmtop); "
    "`llmtop check` prints a report without one"
)


def _on_a_terminal() -> bool:
    """Whether Textual has a terminal to read keys from (stdin) and draw on (stderr). Without one
    it drew escape codes into a pipe or file for ever, its input thread spinning on end-of-file."""
    streams = (sys.__stdin__, sys.__stderr__)
    return all(stream is not None and stream.isatty() for stream in streams)


def _fail(message: str) -> int:
    print(f"llmtop: {for_terminal(message, 2000)}", file=sys.stderr)
    return 2


def _discovered(config_path: Path) -> tuple[Config, str]:
    """A config made of whatever answers on the usual local ports, and the hint that says so."""
    from llmtop.discover import as_backends, discover

    found = asyncio.run(discover())
    if found:
        hint = (
            f"no config at {config_path}: showing {len(found)} server(s) found on local ports; "
            "`llmtop init` writes a config, `llmtop --demo` shows a simulated fleet"
        )
    else:
        hint = (
            f"no config at {config_path} and no server on the usual local ports: `llmtop init` writes a "
            "config to add your backends to, `llmtop --demo` shows a simulated fleet"
        )
    return Config(backends=tuple(as_backends(found))), hint


def _agents(args, config: Config):
    """The remote sources to show (or why not, a line)."""
    from llmtop.remote.sources import remote_sources

    try:
        return remote_sources(args, config)
    except ValueError as exc:
        return str(exc)


def pick_theme(wanted: str | None, loaded: LoadedThemes, prefs_path: Path | None) -> str | None:
    """--theme if given (ValueError when unknown), else the one last chosen with T, else the default (None)."""
    if wanted:
        theme = loaded.resolve(wanted)
        if theme is None:
            raise ValueError(f"unknown theme '{wanted}'; available: {', '.join(loaded.names) or 'none found'}")
        return theme
    saved = load_saved_theme(prefs_path) if prefs_path is not None else None
    return loaded.resolve(saved) if saved else None  # a theme file since removed: the default


def run_tui(args) -> int:
    prefs_path = ui_prefs_path()
    try:
        theme = pick_theme(args.theme, load_themes(), prefs_path)
    except ValueError as exc:
        return _fail(str(exc))

    hint = None
    try:
        with ExitStack() as stack:
            state_path = Path(args.state).expanduser() if args.state else default_state_path()
            if args.demo:
                # A real config file (so `r` and the file watcher work on the demo too) and the
                # simulator in a child process, which costs this one no CPU and no GIL.
                try:
                    demo = stack.enter_context(DemoFleet())
                except RuntimeError as exc:  # the simulator could not start; its message says why
                    return _fail(str(exc))
                config_path = demo.config_path
                # A drain pressed in the demo stays in the demo, not in the user's own state file.
                state_path = Path(args.state).expanduser() if args.state else demo.state_path
                config = load_config(config_path)
            else:
                config_path = resolve_config_path(args.config)
                # A path the user named (--config, $LLMTOP_CONFIG) must exist; only the default may be absent.
                if (getattr(args, "connect", None) or getattr(args, "prometheus", None)) and not config_path.exists() and config_path == default_config_path():
                    config, config_path = Config(), None  # only the agents: no local discovery
                elif config_path.exists() or config_path != default_config_path():
                    config = load_config(config_path)
                    if not config.backends:
                        hint = no_backends_hint(config_path)
                else:
                    config, hint = _discovered(config_path)
                    config_path = None
            state = StateStore(state_path)
            if not _on_a_terminal():
                return _fail(NO_TERMINAL)
            sources = _agents(args, config)
            if isinstance(sources, str):
                return _fail(sources)
            engine = Engine(config, state, gpu=GpuReader())
            app = LlmtopApp(
                engine, config_path=config_path, read_only=args.read_only, theme=theme, hint=hint, prefs_path=prefs_path,
                listen=getattr(args, "listen", None), agent_listen=getattr(args, "agent_listen", None), sources=sources,
                settle_heap=True,
            )
            app.run()
            return app.return_code or 0
    except (ConfigError, StateError) as exc:
        return _fail(str(exc))
