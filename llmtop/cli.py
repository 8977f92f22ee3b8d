"""Command line: the TUI by default, plus check, drain/undrain/disable/enable and init."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from pathlib import Path

from llmtop import __version__
from llmtop.config import Config, ConfigError, load_config, resolve_config_path
from llmtop.paths import default_state_path
from llmtop.state import StateError, StateStore

ADMIN_COMMANDS = {"drain": "draining", "undrain": "active", "disable": "disabled", "enable": "active"}


class UsageError(Exception):
    """A problem with how llmtop was invoked; one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH", help="config file (default: $LLMTOP_CONFIG, else ~/.config/llmtop/config.toml)")
    common.add_argument("--state", metavar="PATH", help="admin state file (default: the user state dir)")

    parser = argparse.ArgumentParser(
        prog="llmtop",
        description="A terminal monitor for fleets of LLM inference backends.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"llmtop {__version__}")
    parser.add_argument("--demo", action="store_true", help="watch a built-in simulated fleet on 127.0.0.1")
    parser.add_argument("--theme", metavar="NAME", help="colour theme: a file name in themes/ or ~/.config/llmtop/themes/ (T cycles in the app)")
    parser.add_argument("--read-only", action="store_true", help="disable the keys that change state (drain, toggle, reload)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    check = sub.add_parser("check", parents=[common], help="poll and probe every backend once, print a table or JSON")
    check.add_argument("--json", action="store_true", help="print JSON (shape in the README)")
    check.add_argument("--rounds", type=int, default=1, metavar="N", help="rounds to run (default 1)")
    check.add_argument("--interval", type=float, default=1.0, metavar="S", help="seconds between rounds (default 1)")
    check.add_argument("--demo", action="store_true", help="check the built-in simulated fleet")
    check.add_argument(
        "--workers", type=int, default=None, metavar="N",
        help="processes to split the fleet over (default: one per CPU core, for fleets big enough to need them)",
    )

    for command, state in ADMIN_COMMANDS.items():
        p = sub.add_parser(command, parents=[common], help=f"set a backend's admin state to {state}")
        p.add_argument("name", help="backend name from the config")

    init = sub.add_parser("init", parents=[common], help="write a commented starter config (with local servers found)")
    init.add_argument("--force", action="store_true", help="overwrite an existing file")
    return parser


def _load(args) -> Config:
    path = resolve_config_path(args.config)
    if not path.exists():
        raise ConfigError(f"{path}: no config file; run `llmtop init` to write one, or try `llmtop --demo`")
    return load_config(path)


def _state(args, default: Path | None = None) -> StateStore:
    return StateStore(Path(args.state).expanduser() if args.state else (default or default_state_path()))


def cmd_check(args) -> int:
    from llmtop.check import CheckWorkerError, check_fleet, exit_code, render_table, to_json
    from llmtop.gpu import GpuReader

    if args.rounds < 1:
        raise UsageError("--rounds must be at least 1")
    if args.interval < 0:
        raise UsageError("--interval must not be negative")
    if args.workers is not None and args.workers < 1:
        raise UsageError("--workers must be at least 1")
    gpu = GpuReader()
    with contextlib.ExitStack() as stack:
        if args.demo:
            from llmtop.demo import DemoFleet

            # The demo's drains live and die with the demo, never in the user's own state file.
            demo = stack.enter_context(DemoFleet())
            config, state = load_config(demo.config_path), _state(args, demo.state_path)
        else:
            config, state = _load(args), _state(args)
        try:
            snapshot = check_fleet(config, state, args.rounds, args.interval, gpu, args.workers)
        except CheckWorkerError as exc:  # a worker process failed: one line, exit 2
            raise UsageError(" ".join(str(exc).split())[:300]) from None
    print(to_json(snapshot) if args.json else render_table(snapshot))
    return exit_code(snapshot)


def cmd_admin(args) -> int:
    target = ADMIN_COMMANDS[args.command]
    config = _load(args)
    if config.backend(args.name) is None:
        names = ", ".join(b.name for b in config.backends) or "none"
        raise UsageError(f"{config.path}: no backend named '{args.name}' (known: {names})")
    state = _state(args)
    before = state.admin(args.name)
    state.set_admin(args.name, target)
    note = "" if config.backend(args.name).enabled else " (note: enabled = false in the config still keeps it off)"
    print(f"{args.name}: {before} -> {target}{note}")
    return 0


def cmd_init(args) -> int:
    from llmtop.discover import discover
    from llmtop.starter import starter_config

    path = resolve_config_path(args.config)
    if path.exists() and not args.force:
        raise UsageError(f"{path}: already exists; pass --force to overwrite it")
    found = asyncio.run(discover())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(starter_config(found), encoding="utf-8")
    what = ", ".join(f"{f.provider} at {f.url}" for f in found) or "no local servers (an example is commented out)"
    print(f"wrote {path}: {what}")
    return 0


def cmd_tui(args) -> int:
    from llmtop.tui.run import run_tui

    return run_tui(args)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "check":
            return cmd_check(args)
        if args.command in ADMIN_COMMANDS:
            return cmd_admin(args)
        if args.command == "init":
            return cmd_init(args)
        return cmd_tui(args)
    except (ConfigError, StateError, UsageError) as exc:
        print(f"llmtop: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - the last line of defence against a traceback
        if os.environ.get("LLMTOP_DEBUG"):
            raise
        message = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        print(f"llmtop: internal error, please report it (LLMTOP_DEBUG=1 shows where): {message}", file=sys.stderr)
        return 2
