"""The terminal under the app: Textual's Linux driver, made to end cleanly when the terminal goes away."""

from __future__ import annotations

import asyncio
import errno
import sys
from typing import IO, Callable

from textual.drivers.linux_driver import LinuxDriver


def terminal_hung_up() -> bool:
    """Whether our terminal has gone (an SSH drop, a closed tmux pane), as opposed to never being one."""
    import termios

    try:
        termios.tcgetattr(sys.__stdin__.fileno())
    except termios.error as exc:
        # A hung-up tty answers terminal ioctls with EIO; a pipe or file (tests, headless) with ENOTTY.
        return exc.args[0] == errno.EIO
    except (OSError, ValueError, AttributeError):
        return False
    return False


class _LossTolerantStream:
    """The stream Textual's writer thread writes the screen to, for a terminal that may vanish.

    Textual's writer thread dies on the first failed write (EIO from a hung-up tty); after that the
    app's writes fill its queue and the next one blocks the event loop for ever, while the input
    thread spins on end-of-file at a full core. Here a failed write drops the output, and the first
    one calls `lost` (once), which ends the app.
    """

    def __init__(self, stream: IO[str], lost: Callable[[], None]) -> None:
        self._stream = stream
        self._lost = lost
        self.gone = False

    def _fail(self) -> None:
        if not self.gone:
            self.gone = True
            self._lost()

    def write(self, text: str) -> None:
        if self.gone:
            return
        try:
            self._stream.write(text)
        except (OSError, ValueError):  # ValueError: the stream was closed under us
            self._fail()

    def flush(self) -> None:
        if self.gone:
            return
        try:
            self._stream.flush()
        except (OSError, ValueError):
            self._fail()

    def fileno(self) -> int:
        return self._stream.fileno()

    def isatty(self) -> bool:
        return not self.gone and self._stream.isatty()


class LlmtopDriver(LinuxDriver):
    """LinuxDriver that survives the loss of its terminal long enough to exit.

    A hangup (SSH drop, tmux session killed) sends SIGHUP and SIGCONT together. Textual takes the
    SIGCONT for the end of a Ctrl-Z suspension and starts application mode a second time: a second
    writer thread, on a terminal that fails every write. So a SIGCONT resumes only after our own
    SIGTSTP, and writes that fail end the app instead of wedging it (_LossTolerantStream).
    """

    def __init__(self, app, **kwargs) -> None:
        super().__init__(app, **kwargs)
        loop = asyncio.get_running_loop()  # the driver is made inside the app's running loop

        def lost() -> None:  # called from the writer thread
            try:
                loop.call_soon_threadsafe(app.exit, None, 128 + 1)  # as a SIGHUP would
            except RuntimeError:  # the loop has closed: the app is gone already
                pass

        self._file = _LossTolerantStream(self._file, lost)

    def _sigcont_application(self, *args) -> None:
        if getattr(self, "_must_signal_resume", True):  # set by _sigtstp_application: we did suspend
            super()._sigcont_application(*args)
