"""The demo fleet: the simulator in a child process, and the config that watches it."""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


class DemoFleet:
    """`with DemoFleet() as demo:` serves the demo fleet on 127.0.0.1 until the block ends;
    `demo.config_path` watches it, and `demo.state_path` keeps the demo's drains apart from the
    user's own state file.

    A child process rather than a thread: a simulator sharing this interpreter's GIL would add
    milliseconds of thread hand-off to every latency and TTFT the demo shows. The child goes with
    us on every way out: told to stop on a normal one, and, should we die without a word
    (SIGKILL), it sees its stdin pipe close, stops, and deletes the temporary directory itself.
    """

    def __init__(self) -> None:
        try:
            self.dir = Path(tempfile.mkdtemp(prefix="llmtop-demo-"))
        except OSError as exc:
            raise RuntimeError(
                f"{tempfile.gettempdir()}: cannot make the demo's temporary directory ({exc.strerror}); "
                "point TMPDIR at a writable directory"
            ) from None
        self.config_path = self.dir / "demo-config.toml"
        self.state_path = self.dir / "state.json"
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> DemoFleet:
        try:
            self._proc = subprocess.Popen(
                [
                    sys.executable, "-m", "llmtop.simulator", "--demo", "--config-out", str(self.config_path),
                    "--parent-pipe", "--remove-on-exit", str(self.dir),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                # Its own session: a terminal's signals (Ctrl-C in cooked mode, the hangup of a
                # closed SSH session) are ours to handle, and we stop the child in order.
                start_new_session=True,
            )
        except OSError as exc:
            self.__exit__(None, None, None)
            raise RuntimeError(f"the demo simulator did not start: {exc}") from None
        line = self._proc.stderr.readline()  # "listening on ..." once the config is written
        if not line.startswith("listening on") or not self.config_path.exists():
            rest = self._proc.stderr.read() if self._proc.poll() is not None else ""
            self.__exit__(None, None, None)
            detail = " ".join((line + rest).split())[:200] or "no output"
            raise RuntimeError(f"the demo simulator did not start: {detail}")
        return self

    def __exit__(self, *exc) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.terminate()
            if not _exited(proc, 5.0):
                proc.kill()
            proc.wait()
            proc.stdin.close()
            proc.stderr.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _exited(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait for the child to exit, waking the moment it does: Popen.wait(timeout) polls, with
    sleeps of up to 50 ms that every quit of the demo would pay."""
    pidfd_open = getattr(os, "pidfd_open", None)  # Linux 5.3+
    if pidfd_open is not None:
        try:
            fd = pidfd_open(proc.pid)
        except OSError:
            pass  # an old kernel, or a sandbox without it
        else:
            try:
                select.select([fd], [], [], timeout)
            finally:
                os.close(fd)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return False
    return True
