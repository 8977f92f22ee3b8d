"""The live screen as a terminal runs it: a real `llmtop --demo` in a pseudo-terminal, and every way
it can end (q, Ctrl-C, SIGTERM, SIGINT, SIGKILL, a terminal that goes away), what it leaves behind,
and keys that arrive together."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

if sys.platform != "linux":  # pragma: no cover - pseudo-terminals and /proc
    pytest.skip("needs Linux: pseudo-terminals and /proc", allow_module_level=True)

import fcntl
import pty
import select
import termios

ALT_SCREEN_OFF = b"\x1b[?1049l"
MOUSE_OFF = b"\x1b[?1000l"
DRAWN = b"healthy"  # a status word in the table: the first snapshot is on screen
START_S = 60.0  # generous: a cold start on a loaded 2-core CI machine


class Terminal:
    """A program on a pseudo-terminal of 120x40, as under tmux or an SSH session.

    With `leader_ignores_hup`, a small Python parent owns the terminal session and ignores SIGHUP,
    as a wrapper script or a shell that does not pass the hangup on would: when the terminal goes,
    the kernel signals that parent, and llmtop learns of it only from the terminal itself.
    """

    LEADER = (
        "import signal, subprocess, sys; signal.signal(signal.SIGHUP, signal.SIG_IGN); "
        "p = subprocess.Popen(sys.argv[1:], preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL)); "
        "print('LLMTOP-PID', p.pid, flush=True); p.wait(); signal.pause()"
    )

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path, *, leader_ignores_hup: bool = False) -> None:
        if leader_ignores_hup:
            argv = [sys.executable, "-c", self.LEADER, *argv]
        self.out = bytearray()
        self.closed = False
        self.reaped = False
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: size the terminal before the program can ask, then become it
            try:
                fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
                os.chdir(cwd)
                os.execve(argv[0], argv, env)
            finally:
                os._exit(127)
        self.llmtop_pid = self.pid
        if leader_ignores_hup:
            try:
                digits = self.wait_for(b"LLMTOP-PID ")
                self.llmtop_pid = int(self.out[digits : self.wait_for(b"\n", since=digits)])
            except BaseException:
                self.close()
                raise

    def _read(self, timeout: float) -> bool:
        if self.closed or not select.select([self.fd], [], [], max(timeout, 0))[0]:
            return False
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: every process has let go of the terminal
            data = b""
        if not data:
            self.closed = True
            return False
        self.out += data
        return True

    def wait_for(self, text: bytes, since: int = 0, timeout: float = START_S) -> int:
        """Read until `text` appears after offset `since`; return where it ends."""
        deadline = time.monotonic() + timeout
        while (at := self.out.find(text, since)) < 0:
            left = deadline - time.monotonic()
            if left <= 0 or (not self._read(left) and self.closed):
                raise AssertionError(f"{text!r} not on screen after {timeout:g} s; last output: {bytes(self.out[-600:])!r}")
        return at + len(text)

    def send(self, keys: bytes) -> None:
        os.write(self.fd, keys)  # one write: the keys arrive together, as from tmux or a fast typist

    def wait_exit(self, timeout: float) -> int | None:
        """The exit code of the program started, draining the terminal meanwhile; None if still running."""
        deadline = time.monotonic() + timeout
        while True:
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                self.reaped = True
                while self._read(0):
                    pass
                return os.waitstatus_to_exitcode(status)
            if time.monotonic() > deadline:
                return None
            self._read(0.02)

    def hang_up(self) -> None:
        """The terminal goes away: what a dropped SSH connection or a killed tmux pane does."""
        os.close(self.fd)
        self.closed = True

    def close(self) -> None:
        if not self.reaped:
            # The child leads a session and a process group of its own (pty.fork), llmtop with it
            # under a leader; not yet reaped, so the group's id cannot belong to anyone else.
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(self.pid, 0)
            self.reaped = True
        if not self.closed:
            os.close(self.fd)
            self.closed = True


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line holds `text` (the demo's simulator names its temporary dir)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()):
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline and alive(int(entry.name)):
                found.append(int(entry.name))
    return found


def eventually(condition, timeout: float = 5.0) -> bool:
    """Poll for a condition that another process makes true (its exit, its cleanup)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture
def home(tmp_path: Path) -> Path:
    for sub in ("home", "config", "state", "tmp"):
        (tmp_path / sub).mkdir()
    return tmp_path


def environment(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLMTOP_", "XDG_", "TEXTUAL"))}
    env.update(
        HOME=str(home / "home"), XDG_CONFIG_HOME=str(home / "config"), XDG_STATE_HOME=str(home / "state"),
        TMPDIR=str(home / "tmp"), TERM="xterm-256color",
    )
    env.pop("NO_COLOR", None)
    return env


@pytest.fixture
def start(home: Path):
    started: list[Terminal] = []

    def start(*args: str, leader_ignores_hup: bool = False) -> Terminal:
        argv = [sys.executable, "-m", "llmtop", *args]
        term = Terminal(argv, environment(home), home, leader_ignores_hup=leader_ignores_hup)
        started.append(term)
        return term

    yield start
    for term in started:
        term.close()


def demo_left_behind(home: Path) -> tuple[list[int], list[str]]:
    """The demo's simulator processes and temporary files still there."""
    return processes_mentioning(str(home / "tmp")), sorted(p.name for p in (home / "tmp").iterdir())


def assert_nothing_left(home: Path) -> None:
    assert eventually(lambda: demo_left_behind(home) == ([], [])), demo_left_behind(home)


# -- ways out -------------------------------------------------------------------------------


def test_q_quits_at_once_restores_the_terminal_and_stops_the_demo(start, home):
    term = start("--demo")
    after = term.wait_for(DRAWN)
    procs, files = demo_left_behind(home)
    assert len(procs) == 1 and len(files) == 1  # the simulator child and its temporary dir, while running
    pressed = time.monotonic()
    term.send(b"q")
    assert term.wait_exit(timeout=10) == 0
    took = time.monotonic() - pressed
    # ~0.3 s measured on a 2-core machine (most of it Textual stopping its input thread); the
    # bound leaves room for a loaded CI machine and still catches a quit that waits on something.
    assert took < 1.5, f"q took {took:.2f} s"
    tail = bytes(term.out[after:])
    assert ALT_SCREEN_OFF in tail and MOUSE_OFF in tail
    # The parent waits for its child: gone by the time llmtop has exited, no polling needed.
    assert demo_left_behind(home) == ([], [])


def test_ctrl_c_quits(start, home):
    term = start("--demo")
    after = term.wait_for(DRAWN)
    term.send(b"\x03")
    assert term.wait_exit(timeout=10) == 0
    tail = bytes(term.out[after:])
    assert ALT_SCREEN_OFF in tail and MOUSE_OFF in tail and b"[b]" not in tail
    assert demo_left_behind(home) == ([], [])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_and_sigint_restore_the_terminal_and_stop_the_demo(start, home, sig):
    term = start("--demo")
    after = term.wait_for(DRAWN)
    os.kill(term.pid, sig)
    assert term.wait_exit(timeout=10) == 128 + sig
    tail = bytes(term.out[after:])
    assert ALT_SCREEN_OFF in tail and MOUSE_OFF in tail
    assert demo_left_behind(home) == ([], [])


def test_sigkill_still_stops_the_demo_simulator_and_removes_its_files(start, home):
    term = start("--demo")
    term.wait_for(DRAWN)
    os.kill(term.pid, signal.SIGKILL)
    assert term.wait_exit(timeout=10) == -signal.SIGKILL
    # Nobody told the child: it sees its stdin pipe close, stops, and deletes its own directory.
    assert_nothing_left(home)


@pytest.mark.parametrize("leader_ignores_hup", [False, True], ids=["llmtop-leads-the-session", "no-sighup-reaches-llmtop"])
def test_losing_the_terminal_ends_llmtop(start, home, leader_ignores_hup):
    """An SSH drop or a killed tmux pane. llmtop used to stay on under PID 1 at most of a core:
    Textual's writer thread died on the first failed write, every later write blocked the app on
    its full queue, and the input thread spun on end-of-file."""
    term = start("--demo", leader_ignores_hup=leader_ignores_hup)
    term.wait_for(DRAWN)
    pid = term.llmtop_pid
    term.hang_up()
    if not eventually(lambda: not alive(pid), timeout=10):
        before = cpu_ticks(pid)
        eventually(lambda: False, timeout=1.0)
        pytest.fail(f"llmtop still running 10 s after its terminal went, using {cpu_ticks(pid) - before} CPU ticks a second")
    assert_nothing_left(home)


# -- keys -----------------------------------------------------------------------------------


def admin_written(state: Path) -> dict[str, str]:
    return json.loads(state.read_text())["admin"]


@pytest.mark.parametrize("keys, disabled", [(b"tq", 1), (b"ttq", 0)], ids=["t-q", "t-t-q"])
def test_keys_that_arrive_together_each_take_effect(start, home, keys, disabled):
    state = home / "fleet-state.json"
    term = start("--demo", "--state", str(state))
    term.wait_for(DRAWN)
    term.send(keys)  # about the selected backend: the table does not move between keys read together
    assert term.wait_exit(timeout=10) == 0
    # Written before exit (t q), and toggled twice (t t q), not disabled twice from one stale snapshot.
    admin = admin_written(state)
    assert len(admin) == disabled and set(admin.values()) <= {"disabled"}, admin


def test_text_typed_right_after_slash_goes_into_the_filter(start, home):
    """`/fast` typed at speed used to reach the table, whose `s` re-sorted and whose `t` disabled
    the selected backend, because the focus moved to the filter only after those keys."""
    state = home / "fleet-state.json"
    term = start("--demo", "--state", str(state))
    after = term.wait_for(DRAWN)
    term.send(b"/vllm-fast")
    term.wait_for(b"filter 'vllm-fast': 1 of ", since=after)  # one row of the demo's fleet
    term.send(b"\x03")
    assert term.wait_exit(timeout=10) == 0
    assert not state.exists()  # nothing was toggled


def test_the_demo_keeps_its_drains_out_of_the_users_state_file(start, home):
    term = start("--demo")
    after = term.wait_for(DRAWN)
    term.send(b"t")
    term.wait_for(b": disabled", since=after)
    term.send(b"q")
    assert term.wait_exit(timeout=10) == 0
    assert not (home / "state" / "llmtop" / "state.json").exists()
    assert demo_left_behind(home) == ([], [])


def test_the_theme_chosen_with_T_is_remembered(start, home):
    term = start("--demo")
    after = term.wait_for(DRAWN)
    term.send(b"T")
    term.wait_for(b"theme: llmtop-high-contrast", since=after)  # the one after the default, llmtop-dark
    term.send(b"q")
    assert term.wait_exit(timeout=10) == 0
    prefs = home / "state" / "llmtop" / "ui.json"
    assert json.loads(prefs.read_text()) == {"theme": "llmtop-high-contrast"}
    # The next run starts in it: one more T moves on to the theme after it.
    term = start("--demo")
    after = term.wait_for(DRAWN)
    term.send(b"T")
    term.wait_for(b"theme: llmtop-light", since=after)
    term.send(b"q")
    assert term.wait_exit(timeout=10) == 0


def test_an_empty_config_says_how_to_add_a_backend(start, home):
    (home / "empty.toml").write_text("[settings]\ntimeout_s = 3\n")
    term = start("--config", "empty.toml", "--state", "s.json")  # relative (cwd is home): the hint fits on a line
    term.wait_for(b"add a [[backend]]")
    term.send(b"q")
    assert term.wait_exit(timeout=10) == 0


def test_a_killed_check_demo_leaves_nothing_behind(home):
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmtop", "check", "--demo", "--rounds", "1000", "--interval", "1"],
        env=environment(home), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        assert eventually(lambda: demo_left_behind(home)[0] != [], timeout=START_S)  # its simulator is up
        proc.kill()
        proc.wait()
        assert_nothing_left(home)
    finally:
        proc.kill()
        proc.wait()


def test_without_a_terminal_the_live_screen_says_so_instead_of_spinning(home):
    """`ssh host llmtop` without -t, or `llmtop < /dev/null`: Textual drew escape codes into a pipe
    for ever, its input thread spinning on end-of-file at most of a core."""
    r = subprocess.run(
        [sys.executable, "-m", "llmtop", "--demo"], env=environment(home), cwd=home,
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("llmtop: the live screen needs a terminal") and r.stderr.count("\n") == 1
    assert_nothing_left(home)
