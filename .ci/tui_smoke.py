"""Start the live screen in a pseudo-terminal, wait until the fleet table is drawn, press q, and
expect exit code 0 within a few seconds. Usage: python tui_smoke.py LLMTOP [ARGS...]"""

from __future__ import annotations

import os
import pty
import select
import struct
import sys
import time

try:
    import fcntl
    import termios
except ImportError:  # pragma: no cover - not on Windows
    raise SystemExit("tui_smoke.py needs a POSIX pseudo-terminal")

DRAWN = b"healthy"  # a status word: the table has rows
START_S, QUIT_S = 60.0, 5.0


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    pid, fd = pty.fork()
    if pid == 0:  # the child: a session of its own on the pty, as under a terminal emulator
        os.execvpe(argv[0], argv, {**os.environ, "TERM": "xterm-256color"})
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    seen = b""
    deadline = time.monotonic() + START_S
    while DRAWN not in seen:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            print(f"tui smoke: no table within {START_S:g} s; the screen said: {seen[-500:]!r}", file=sys.stderr)
            os.kill(pid, 9)
            return 1
        try:
            seen += os.read(fd, 65536)
        except OSError:  # EIO: the child closed the terminal, so it has exited
            print(f"tui smoke: exited before drawing: {seen[-500:]!r}", file=sys.stderr)
            return 1
    pressed = time.monotonic()
    os.write(fd, b"q")
    while True:  # keep draining the pty so the child never blocks on a full terminal
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() - pressed > QUIT_S:
            print(f"tui smoke: still running {QUIT_S:g} s after q", file=sys.stderr)
            os.kill(pid, 9)
            return 1
        if select.select([fd], [], [], 0.05)[0]:
            try:
                os.read(fd, 65536)
            except OSError:
                pass
    took = time.monotonic() - pressed
    code = os.waitstatus_to_exitcode(status)
    print(f"tui smoke: table drawn, q quit in {took * 1000:.0f} ms, exit code {code}")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
