"""The demo fleet: the simulator in a child process, and the config that watches it."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path


class DemoFleet:
    """`with DemoFleet() as config_path:` serves the demo fleet on 127.0.0.1 until the block ends.

    A child process rather than a thread: a simulator sharing this interpreter's GIL would add
    milliseconds of thread hand-off to every latency and TTFT the demo shows.
    """

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="llmtop-demo-")
        self.config_path = Path(self._dir.name) / "demo-config.toml"
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> Path:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "llmtop.simulator", "--demo", "--config-out", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = self._proc.stderr.readline()  # "listening on ..." once the config is written
        if not line.startswith("listening on") or not self.config_path.exists():
            rest = self._proc.stderr.read() if self._proc.poll() is not None else ""
            self.__exit__(None, None, None)
            detail = " ".join((line + rest).split())[:200] or "no output"
            raise RuntimeError(f"the demo simulator did not start: {detail}")
        return self.config_path

    def __exit__(self, *exc) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc.stderr.close()
            self._proc = None
        self._dir.cleanup()
