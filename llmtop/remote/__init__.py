"""Sources of backends other than this process's own engine: other llmtop agents (agents.py) and a Prometheus query API (prometheus.py).

A face never knows which source it reads (DESIGN.md, "Sources and faces"). Each source gives
backends as BackendSnapshots (with `agent` set to whose they are, and `stale_since` set while
the source is lost), says how it stands (SourceState, one line in the TUI's header), and acts on
a backend when it can (a Prometheus source never can; an agent only with its token).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol

import httpx

from llmtop.snapshot import BackendSnapshot, Event, GpuStatus

STANDINGS = ("connecting", "connected", "stale", "unauthorized", "error")


class ActionRefused(Exception):
    """An action the source did not carry out; str() is the one line to show (sanitised by the face)."""


@dataclass(frozen=True)
class SourceState:
    name: str  # how the faces name it: the agent's name, or "prometheus"
    url: str  # without credentials
    standing: str  # one of STANDINGS
    since: float | None  # wall time of the last change of standing
    detail: str | None = None  # why (the error, "set LLMTOP_TOKEN"), one line
    can_act: bool = False  # whether actions (drain, probe) can be sent at all
    backends: int = 0


class Source(Protocol):
    def state(self) -> SourceState: ...

    def backends(self) -> tuple[BackendSnapshot, ...]: ...

    def gpus(self) -> GpuStatus: ...

    def events(self) -> tuple[Event, ...]: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def act(self, backend: str, action: str) -> str:
        """drain | undrain | disable | enable | probe; the source's answer in one line, or ActionRefused."""
        ...

    async def probe_all(self) -> str:
        """Every backend of the source probed now, in one request; its answer, or ActionRefused."""
        ...


async def stop_following(task: asyncio.Task | None, client: httpx.AsyncClient | None) -> None:
    """What a source's stop() does: cancel its follow task, wait for it, close its client."""
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    if client is not None:
        await client.aclose()
