"""A remote source with fixed rows and a standing the test sets: the merged screen's input without an agent process."""

from __future__ import annotations

import dataclasses

from llmtop.remote import SourceState
from llmtop.snapshot import GpuStatus


class FixedSource:
    """Rows (the engine's, as another agent's) and a standing that stay as given until a test
    changes `standing`."""

    def __init__(self, name: str, backends, standing: str, since: float | None = None, detail: str | None = None):
        self.name, self.standing, self.since, self.detail = name, standing, since, detail
        self._backends = tuple(dataclasses.replace(b, agent=name, stale_since=since if standing == "stale" else None) for b in backends)

    def state(self) -> SourceState:
        return SourceState(
            self.name, f"http://{self.name}:9850", self.standing, self.since, self.detail, can_act=False, backends=len(self._backends)
        )

    def backends(self):
        return self._backends

    def gpus(self):
        return GpuStatus()

    def events(self):
        return ()

    async def start(self):
        pass

    async def stop(self):
        pass

    async def act(self, backend, action):
        raise AssertionError("a fixed source takes no action")
