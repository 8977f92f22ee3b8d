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
from llmtop.paths import default_config_path, default_state_path
from llmtop.sanitize import for_terminal
from llmtop.state import StateError, StateStore
from llmtop.tui.app import LlmtopApp
from llmtop.tui.themes import load_themes


def _fail(message: str) -> int:
    print(f"llmtop: {for_terminal(message, 2000)}", file=sys.stderr)
    return 2


def _discovered(config_path: Path) -> tuple[Config, str]:
    """A config made of whatever answers on the usual local ports, and the hint that says so."""
    from llmtop.discover import as_backends, discover

    found = asyncio.run(discover())
    hint = (
        f"no config at {config_path}: showing {len(found)} server(s) found on local ports; "
        "`llmtop init` writes a config, `llmtop --demo` shows a simulated fleet"
    )
    return Config(backends=tuple(as_backends(found))), hint


def run_tui(args) -> int:
    theme = None
    if args.theme:
        loaded = load_themes()
        theme = loaded.resolve(args.theme)
        if theme is None:
            return _fail(f"unknown theme '{args.theme}'; available: {', '.join(loaded.names) or 'none found'}")
    try:
        state = StateStore(Path(args.state).expanduser() if args.state else default_state_path())
    except StateError as exc:
        return _fail(str(exc))

    hint = None
    try:
        with ExitStack() as stack:
            if args.demo:
                # A real config file (so `r` and the file watcher work on the demo too) and the
                # simulator in a child process, which costs this one no CPU and no GIL.
                try:
                    config_path = stack.enter_context(DemoFleet())
                except RuntimeError as exc:  # the simulator could not start; its message says why
                    return _fail(str(exc))
                config = load_config(config_path)
            else:
                config_path = resolve_config_path(args.config)
                # A path the user named (--config, $LLMTOP_CONFIG) must exist; only the default may be absent.
                if config_path.exists() or config_path != default_config_path():
                    config = load_config(config_path)
                else:
                    config, hint = _discovered(config_path)
                    config_path = None
            engine = Engine(config, state, gpu=GpuReader())
            app = LlmtopApp(engine, config_path=config_path, read_only=args.read_only, theme=theme, hint=hint)
            app.run()
            return app.return_code or 0
    except ConfigError as exc:
        return _fail(str(exc))
