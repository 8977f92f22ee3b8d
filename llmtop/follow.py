"""Following the files a running llmtop reads: the config (reload on change or SIGHUP, keeping the running one if broken) and the state file."""

from __future__ import annotations

import asyncio
from pathlib import Path

from llmtop.config import ConfigError, load_config
from llmtop.engine import Engine
from llmtop.snapshot import Event
from llmtop.state import StateError

CONFIG_CHECK_S = 2.0
STATE_CHECK_S = 1.0  # a drain from the CLI or another screen reaches this one within a second


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


class Follower:
    """Runs beside a headless engine (serve): picks up edits of the config file and of the state
    file, and reloads on request (SIGHUP). The files are read in threads: a config on a slow or
    network filesystem must not hold the event loop."""

    def __init__(self, engine: Engine, config_path: Path | None):
        self.engine = engine
        self.config_path = config_path
        self._stamp = _stamp(config_path) if config_path else None
        self._asked: str | None = None
        self._wake = asyncio.Event()
        self._state_error: str | None = None
        self._last_failure: str | None = None

    def reload(self, why: str) -> None:
        """Reload now (SIGHUP), even if the file looks unchanged."""
        self._asked = why
        self._wake.set()

    async def run(self) -> None:
        config_due = 0.0
        loop = asyncio.get_running_loop()
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), STATE_CHECK_S)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            try:
                await self._follow_state()
                if self.config_path is not None and (self._asked or loop.time() >= config_due):
                    config_due = loop.time() + CONFIG_CHECK_S
                    await self._follow_config()
            except Exception as exc:  # noqa: BLE001 - following must outlive any one bad read, and say what it was
                message = f"following the config and state files: {type(exc).__name__}: {exc}"
                if message != self._last_failure:
                    self.engine.emit(Event(self.engine.wall(), None, "state", message, "error"))
                self._last_failure = message
            else:
                self._last_failure = None

    async def _follow_state(self) -> None:
        try:
            await self.engine.refresh_state()
        except StateError as exc:
            if str(exc) != self._state_error:
                self.engine.note_state_error(str(exc))
            self._state_error = str(exc)
        else:
            self._state_error = None

    async def _follow_config(self) -> None:
        why, self._asked = self._asked, None
        stamp = await asyncio.to_thread(_stamp, self.config_path)
        if why is None and stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            config = await asyncio.to_thread(load_config, self.config_path)
        except ConfigError as exc:
            self.engine.note_config_error(str(exc))
            return
        self.engine.reload(config)
