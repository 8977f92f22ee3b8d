"""The operator's admin state per backend (active, draining, disabled), persisted atomically in a JSON file."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
import threading
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, last writer wins
    fcntl = None

from llmtop.snapshot import ADMIN_STATES

FIX_PATH = "name a file in a writable directory with --state"


# What each operator command asks for. undrain lifts a drain and enable lifts a disable, and
# neither the other: `undrain` must not switch on a backend someone disabled (admin_after).
ADMIN_COMMANDS = {"drain": "draining", "undrain": "active", "disable": "disabled", "enable": "active"}
LIFTS = {"undrain": "draining", "enable": "disabled"}


def admin_after(current: str, command: str) -> str:
    """The admin state `command` leads to from `current`: undrain of a disabled backend leaves it
    disabled, enable of a draining one leaves it draining."""
    lifted = LIFTS.get(command)
    if lifted is not None and current != lifted:
        return current
    return ADMIN_COMMANDS[command]


class StateError(Exception):
    """The state file cannot be read or written; phrased for the operator."""


class StateStore:
    """{"admin": {"backend name": "draining" | "disabled"}}; active backends are simply absent.

    Every change is written through a temporary file and os.replace, so a crash never leaves a
    half-written file, and another llmtop (the TUI and a `llmtop drain` in another shell) sees
    the change on its next `refresh()`.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._admin: dict[str, str] = {}
        self._stamp: tuple[int, int] | None = None
        # The TUI calls refresh() (each tick) and set_admin() (a key) from worker threads at once.
        # Unserialised, a refresh that found no file yet could land during the first write and
        # reset what it recorded, after the write had marked the new file as read: the store
        # then kept showing the old state for good.
        self._mutex = threading.Lock()
        self.refresh()

    def refresh(self) -> bool:
        """Re-read the file if it changed on disk; True when it did."""
        with self._mutex:
            return self._refresh()

    def _refresh(self) -> bool:
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            changed = bool(self._admin)
            self._admin, self._stamp = {}, None
            return changed
        except OSError as exc:
            raise StateError(f"{self.path}: cannot read state file ({exc.strerror}); {FIX_PATH}") from None
        if not stat.S_ISREG(st.st_mode):
            # A directory, or a device such as /dev/null, which os.replace would swap for a file.
            what = "a directory" if stat.S_ISDIR(st.st_mode) else "a device or other special file"
            raise StateError(f"{self.path}: is {what}, not a state file; {FIX_PATH}")
        if stamp == self._stamp:
            return False
        try:
            text = self.path.read_text(encoding="utf-8")
        except UnicodeDecodeError:  # a stray byte: a bad editor save, disk garbage
            raise self._corrupt("not UTF-8 text") from None
        except OSError as exc:
            raise StateError(f"{self.path}: cannot read state file ({exc.strerror}); {FIX_PATH}") from None
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as exc:  # RecursionError: "[[[[...", nested past the parser's limit
            what = "nested too deeply" if isinstance(exc, RecursionError) else f"not JSON: {exc}"
            raise self._corrupt(what) from None
        admin = data.get("admin", {}) if isinstance(data, dict) else None
        if not isinstance(admin, dict):
            raise self._corrupt('expected {"admin": {"backend name": "draining" or "disabled"}}')
        self._admin = {str(k): str(v) for k, v in admin.items() if v in ADMIN_STATES and v != "active"}
        self._stamp = stamp
        return True

    def _corrupt(self, what: str) -> StateError:
        return StateError(f"{self.path}: state file is corrupt ({what}); delete it to reset every backend to active")

    def admin(self, name: str) -> str:
        return self._admin.get(name, "active")

    def apply(self, name: str, command: str) -> tuple[str, str]:
        """Run an operator command (drain, undrain, disable, enable) against the state on disk, under
        the lock, and return (before, after); after == before when there was nothing to change."""
        with self._lock(), self._mutex:
            self._refresh()
            before = self.admin(name)
            after = admin_after(before, command)
            if after != before:
                self._set(name, after)
            return before, after

    def set_admin(self, name: str, state: str) -> None:
        if state not in ADMIN_STATES:
            raise ValueError(f"unknown admin state {state!r}")
        # The file lock first: another process may hold it a long time, and a refresh in this one
        # must not wait on that (the TUI's state reads would pile up behind it).
        with self._lock(), self._mutex:
            self._refresh()  # keep changes another process made since we last looked
            self._set(name, state)

    def _set(self, name: str, state: str) -> None:
        """Change one backend's state and write the file (both locks held)."""
        if state == "active":
            self._admin.pop(name, None)
        else:
            self._admin[name] = state
        self._write()

    @contextlib.contextmanager
    def _lock(self):
        """Read-modify-write under an exclusive lock: `for b in a b c; do llmtop drain $b & done`
        must drain all three, not whichever wrote last."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(self.path.with_name(self.path.name + ".lock"), "a")
        except OSError as exc:
            raise StateError(f"{self.path}: cannot lock state file ({exc.strerror}); {FIX_PATH}") from None
        with handle:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_EX)
            yield

    def _write(self) -> None:
        data = json.dumps({"admin": dict(sorted(self._admin.items()))}, indent=2) + "\n"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".state-", suffix=".tmp", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            raise StateError(f"{self.path}: cannot write state file ({exc.strerror}); {FIX_PATH}") from None
        st = self.path.stat()
        self._stamp = (st.st_mtime_ns, st.st_size)
