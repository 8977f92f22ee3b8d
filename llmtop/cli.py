"""Command line: the TUI by default, plus check, serve, drain/undrain/disable/enable and init."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from pathlib import Path

from llmtop import __version__
from llmtop.config import DEFAULT_LISTEN, Config, ConfigError, load_config, resolve_config_path, split_address
from llmtop.paths import default_state_path
from llmtop.sanitize import for_terminal
from llmtop.state import ADMIN_COMMANDS, LIFTS, StateError, StateStore

# Beyond these a number is a typo (or inf), not a plan: an interval of a day, a million rounds, and
# more check processes than any machine has cores.
MAX_INTERVAL_S = 86400.0
MAX_ROUNDS = 1_000_000
MAX_WORKERS = 1024
ADMIN_HELP = {
    "drain": "drain a backend: no completion probes, shown as draining everywhere",
    "undrain": "lift a drain (a disabled backend stays disabled)",
    "disable": "disable a backend: no requests at all",
    "enable": "lift a disable (a draining backend stays draining)",
}

ADD_A_BACKEND = (
    'add a [[backend]] table with name, provider and url (e.g. name = "gpu1", provider = "vllm", '
    'url = "http://10.0.0.5:8000"), or try `llmtop --demo`'
)


class UsageError(Exception):
    """A problem with how llmtop was invoked; one line, exit code 2."""


def _shared_options(parser: argparse.ArgumentParser, *, demo: bool, suppress: bool) -> None:
    """--config, --state (and --demo where it means something), on the main parser and again on
    each subcommand, so `llmtop --config X check` and `llmtop check --config X` mean the same, as
    `git -C` users expect. The subcommand's copies default to SUPPRESS: one not given there leaves
    what the main parser read alone instead of overwriting it with None."""
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument(
        "--config", metavar="PATH", default=default,
        help="config file (default: $LLMTOP_CONFIG, else ~/.config/llmtop/config.toml)",
    )
    parser.add_argument(
        "--state", metavar="PATH", default=default,
        help="admin state file (default: the user state dir; with --demo, one in the demo's temporary dir)",
    )
    if demo:
        parser.add_argument(
            "--connect", metavar="URL", action="append", default=default,
            help="also show the fleet of the llmtop agent (`llmtop serve`) at URL; repeat for more ([[remote]] in the config does the same)",
        )
        parser.add_argument(
            "--prometheus", metavar="URL", default=default,
            help="also show every backend llmtop agents export to this Prometheus-compatible query API (read-only; "
            "credentials from $LLMTOP_PROMETHEUS_TOKEN, or $LLMTOP_PROMETHEUS_USER and $LLMTOP_PROMETHEUS_PASSWORD)",
        )
        parser.add_argument(
            "--selector", metavar="MATCHERS", default=default,
            help='with --prometheus: the series to read, e.g. \'{job="llmtop"}\' (default: every llmtop_ series)',
        )
        parser.add_argument(
            "--demo", action="store_true", default=argparse.SUPPRESS if suppress else False,
            help="watch a built-in simulated fleet on 127.0.0.1",
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmtop", description="A terminal monitor for fleets of LLM inference backends.")
    _shared_options(parser, demo=True, suppress=False)
    parser.add_argument("--version", action="version", version=f"llmtop {__version__}")
    parser.add_argument(
        "--theme", metavar="NAME",
        help="colour theme: dark, light, high-contrast, or a file name in ~/.config/llmtop/themes/ (T cycles in the app)",
    )
    parser.add_argument("--read-only", action="store_true", help="disable the keys that change state (drain, toggle, reload)")
    _listen_options(parser, suppress=False, what="also serve serve's HTTP endpoints while the screen runs (off unless given)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    check = sub.add_parser("check", help="poll and probe every backend once, print a table or JSON")
    _shared_options(check, demo=True, suppress=True)
    check.add_argument("--json", action="store_true", help="print JSON (shape in the README)")
    check.add_argument("--rounds", type=int, default=1, metavar="N", help=f"rounds to run (default 1, at most {MAX_ROUNDS})")
    check.add_argument(
        "--interval", type=float, default=1.0, metavar="S", help=f"seconds between rounds (default 1, at most {MAX_INTERVAL_S:g})",
    )
    check.add_argument(
        "--workers", type=int, default=None, metavar="N",
        help=f"processes to split the fleet over (default: one per CPU core, for fleets big enough to need them; at most {MAX_WORKERS})",
    )

    serve = sub.add_parser(
        "serve", help="run headless: readiness for load balancers, Prometheus metrics, the live fleet and an admin API",
    )
    _shared_options(serve, demo=True, suppress=True)
    _listen_options(serve, suppress=True, what=f"where to answer HTTP (default: [serve] listen, else {DEFAULT_LISTEN})")
    serve.add_argument(
        "--log-format", choices=("text", "json"), default=None,
        help="event log lines on stderr (default: [serve] log_format, else text)",
    )

    for command in ADMIN_COMMANDS:
        p = sub.add_parser(command, help=ADMIN_HELP[command])
        _shared_options(p, demo=False, suppress=True)
        p.add_argument("name", help="backend name from the config")

    init = sub.add_parser("init", help="write a commented starter config (with local servers found)")
    _shared_options(init, demo=False, suppress=True)
    init.add_argument("--force", action="store_true", help="overwrite an existing file")
    return parser


def _listen_options(parser: argparse.ArgumentParser, *, suppress: bool, what: str) -> None:
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument("--listen", metavar="HOST:PORT", default=default, help=what)
    parser.add_argument(
        "--agent-listen", metavar="HOST:PORT", default=default,
        help="answer HAProxy's agent-check on this TCP port (default: [serve] agent_listen, else off)",
    )


def _check_scope(args) -> None:
    """An option that the command would ignore is a mistake to say, not to swallow."""
    if args.demo and args.config:
        raise UsageError("--demo watches its own simulated fleet; leave out --config (or --demo)")
    if args.command is None:
        return
    allowed = {"--demo": ("check", "serve"), "--listen": ("serve",), "--agent-listen": ("serve",), "--connect": ("check",),
               "--prometheus": ("check",), "--selector": ("check",)}
    where = {
        "--prometheus": "the live screen and `check`",
        "--selector": "the live screen and `check`",
        "--connect": "the live screen and `check`",
        "--demo": "the live screen, `check` and `serve`",
        "--listen": "the live screen and `serve`",
        "--agent-listen": "the live screen and `serve`",
    }
    flags = (("--theme", args.theme), ("--read-only", args.read_only), ("--demo", args.demo),
             ("--listen", args.listen), ("--agent-listen", args.agent_listen), ("--connect", args.connect),
             ("--prometheus", args.prometheus), ("--selector", args.selector))
    if args.selector and not args.prometheus:
        raise UsageError("--selector chooses series in a Prometheus: give --prometheus URL too")
    for flag, given in flags:
        if given and args.command not in allowed.get(flag, ()):
            place = where.get(flag, "the live screen (llmtop with no command)")
            raise UsageError(f"{flag} applies to {place}, not to `{args.command}`; leave it out")


def _load(args, optional: bool = False) -> Config:
    """The config; with `optional` (agents given with --connect), none at the default path is an empty fleet."""
    path = resolve_config_path(args.config)
    if optional and not path.exists() and not args.config and not os.environ.get("LLMTOP_CONFIG"):
        return Config()
    if not path.exists():
        raise ConfigError(f"{path}: no config file; run `llmtop init` to write one, or try `llmtop --demo`")
    return load_config(path)


def _state(args, default: Path | None = None) -> StateStore:
    return StateStore(Path(args.state).expanduser() if args.state else (default or default_state_path()))


def _out(text: str) -> None:
    """Print to stdout; a reader that went away (`llmtop check | head -1`) is not an error."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        _stdout_gone()


def _err(line: str) -> None:
    if sys.stderr is None:  # started with fd 2 closed (`2>&-`): print(file=None) would write to stdout
        return
    with contextlib.suppress(OSError):  # a dead pipe: the exit code still says it
        print(line, file=sys.stderr, flush=True)


def _stdout_gone() -> None:
    # Point fd 1 at /dev/null so the interpreter's last flush at exit does not raise again.
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _check_numbers(args) -> None:
    if not 1 <= args.rounds <= MAX_ROUNDS:
        raise UsageError(f"--rounds must be from 1 to {MAX_ROUNDS}, got {args.rounds}")
    if not 0 <= args.interval <= MAX_INTERVAL_S:  # also false for nan
        raise UsageError(f"--interval must be a number of seconds from 0 to {MAX_INTERVAL_S:g}, got {args.interval}")
    if args.workers is not None and args.workers < 1:
        raise UsageError("--workers must be at least 1")
    if args.workers is not None and args.workers > MAX_WORKERS:
        raise UsageError(f"--workers must be at most {MAX_WORKERS}, got {args.workers}")


def cmd_check(args) -> int:
    from llmtop.check import CheckWorkerError, check_fleet, exit_code, render_table, to_json
    from llmtop.gpu import GpuReader

    _check_numbers(args)
    with contextlib.ExitStack() as stack:
        if args.demo:
            from llmtop.demo import DemoFleet

            # The demo's drains live and die with the demo, never in the user's own state file.
            try:
                demo = stack.enter_context(DemoFleet())
            except RuntimeError as exc:  # the simulator could not start; its message says why
                raise UsageError(str(exc)) from None
            config, state = load_config(demo.config_path), _state(args, demo.state_path)
        else:
            config, state = _load(args, optional=bool(args.connect or args.prometheus)), _state(args)
        agents = _agents(args, config)
        if not config.backends and not agents:
            # Zero backends checked is not "every backend is healthy": a script must not read it as success.
            raise UsageError(f"{config.path}: no backends to check; {ADD_A_BACKEND}")
        snapshot = None
        if config.backends:
            try:
                snapshot = check_fleet(config, state, args.rounds, args.interval, GpuReader(), args.workers)
            except CheckWorkerError as exc:  # a worker process failed: one line, exit 2
                raise UsageError(" ".join(str(exc).split())[:300]) from None
    if agents:
        from llmtop.remote.check import check_agents

        snapshot, lost = check_agents(snapshot, agents)
        for line in lost:
            _err(f"llmtop: {for_terminal(line, 300)}")
    _out(to_json(snapshot, agents) if args.json else render_table(snapshot))
    return 1 if agents and any(a.state().standing != "connected" for a in agents) else exit_code(snapshot)


def _agents(args, config: Config) -> list:
    """The remote sources to read: --connect URLs, the config's [[remote]] tables, and --prometheus."""
    from llmtop.remote.sources import remote_sources

    try:
        return remote_sources(args, config, sparklines=False)  # a check prints no history: none is fetched
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def cmd_serve(args) -> int:
    from llmtop.serve.runner import run

    with contextlib.ExitStack() as stack:
        if args.demo:
            from llmtop.demo import DemoFleet

            try:
                demo = stack.enter_context(DemoFleet())
            except RuntimeError as exc:
                raise UsageError(str(exc)) from None
            config, state = load_config(demo.config_path), _state(args, demo.state_path)
        else:
            config, state = _load(args), _state(args)
        if not config.backends:
            raise UsageError(f"{config.path}: no backends to serve; {ADD_A_BACKEND}")
        listen = args.listen or config.serve.listen
        agent_listen = args.agent_listen or config.serve.agent_listen
        for flag, value in (("--listen", listen), ("--agent-listen", agent_listen)):
            if value is not None:
                try:
                    split_address(value)
                except ValueError as exc:
                    raise UsageError(f"{flag}: {exc}") from None
        return run(config, config.path, state, listen=listen, agent_listen=agent_listen, log_format=args.log_format or config.serve.log_format)


def cmd_admin(args) -> int:
    command = args.command
    config = _load(args)
    backend = config.backend(args.name)
    if backend is None:
        names = ", ".join(b.name for b in config.backends) or "none"
        raise UsageError(f"{config.path}: no backend named '{args.name}' (known: {names})")
    before, after = _state(args).apply(args.name, command)
    if command in LIFTS and before not in (LIFTS[command], "active"):
        # undrain of a disabled backend, enable of a draining one: say which command would lift it.
        lift = next(c for c, lifted in LIFTS.items() if lifted == before)
        line = f"{args.name}: {before}, not {LIFTS[command]}; left {before} (`llmtop {lift} {args.name}` {lift}s it)"
    else:
        line = f"{args.name}: {before} -> {after}"
        if not backend.enabled:
            line += " (note: enabled = false in the config still keeps it off)"
    _out(line)
    return 0


def cmd_init(args) -> int:
    from llmtop.discover import discover
    from llmtop.starter import starter_config

    path = resolve_config_path(args.config)
    if path.is_dir():
        raise UsageError(f"{path}: is a directory; name the file to write, e.g. --config {path / 'config.toml'}")
    if path.exists() and not args.force:
        raise UsageError(f"{path}: already exists; pass --force to overwrite it")
    found = asyncio.run(discover())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(starter_config(found), encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"{path}: cannot write the config ({exc.strerror}); name a writable path with --config") from None
    what = ", ".join(f"{f.provider} at {f.url}" for f in found) or "no local servers (an example is commented out)"
    _out(f"wrote {path}: {what}")
    return 0


def cmd_tui(args, program: bool = False) -> int:
    from llmtop.tui.run import run_tui

    code = run_tui(args)
    if program:
        # Everything is put away by now: the terminal restored, the demo's simulator stopped and its
        # files gone, every state write landed. What is left is the interpreter freeing the objects
        # of Textual and the app one by one, some 130 ms of CPU between `q` and the prompt; the
        # operating system frees them at once.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _ended(code: int, program: bool) -> int:
    """As the program, end the process now: a thread still stuck in a stalled NVML call or a
    hung file read must not keep a stopped serve alive (SIGTERM to exit within 2 s)."""
    if program:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def entry() -> None:
    """The `llmtop` program (console script and `python -m llmtop`)."""
    raise SystemExit(main(program=True))


def main(argv: list[str] | None = None, *, program: bool = False) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)  # --help and --version print, then raise SystemExit
        _check_scope(args)
        if args.command == "check":
            return cmd_check(args)
        if args.command == "serve":
            return _ended(cmd_serve(args), program)
        if args.command in ADMIN_COMMANDS:
            return cmd_admin(args)
        if args.command == "init":
            return cmd_init(args)
        return cmd_tui(args, program)
    except (ConfigError, StateError, UsageError) as exc:
        # The message may quote the config's own text (a key, a value): printable, one line.
        _err(f"llmtop: {for_terminal(str(exc), 2000)}")
        return 2
    except BrokenPipeError:  # `llmtop --help | head -1`: the reader has what it wanted
        _stdout_gone()
        return 0
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - the last line of defence against a traceback
        if os.environ.get("LLMTOP_DEBUG"):
            raise
        message = for_terminal(f"{type(exc).__name__}: {exc}", 300)
        _err(f"llmtop: internal error, please report it (LLMTOP_DEBUG=1 shows where): {message}")
        return 2
