"""The operator's admin state per backend (active, draining, disabled), persisted atomically in a JSON file."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, last writer wins
    fcntl = None

from llmtop.snapshot import ADMIN_STATES


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
            raise StateError(f"{self.path}: cannot read state file: {exc.strerror}") from None
        if stamp == self._stamp:
            return False
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            admin = data.get("admin", {})
            if not isinstance(admin, dict):
                raise ValueError("'admin' is not an object")
        except (ValueError, OSError, AttributeError) as exc:
            raise StateError(
                f"{self.path}: state file is corrupt ({exc}); delete it to reset every backend to active"
            ) from None
        self._admin = {str(k): str(v) for k, v in admin.items() if v in ADMIN_STATES and v != "active"}
        self._stamp = stamp
        return True

    def admin(self, name: str) -> str:
        return self._admin.get(name, "active")

    def set_admin(self, name: str, state: str) -> None:
        if state not in ADMIN_STATES:
            raise ValueError(f"unknown admin state {state!r}")
        # The file lock first: another process may hold it a long time, and a refresh in this one
        # must not wait on that (the TUI's state reads would pile up behind it).
        with self._lock(), self._mutex:
            self._refresh()  # keep changes another process made since we last looked
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
            raise StateError(f"{self.path}: cannot lock state file: {exc.strerror}") from None
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
            raise StateError(f"{self.path}: cannot write state file: {exc.strerror}") from None
        st = self.path.stat()
        self._stamp = (st.st_mtime_ns, st.st_size)
