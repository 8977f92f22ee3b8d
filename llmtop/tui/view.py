"""What the app hands its screens each tick: the snapshot plus the app's own state around it."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from llmtop.config import Settings
from llmtop.remote import SourceState
from llmtop.snapshot import FleetSnapshot, GpuStatus

GPU_HISTORY = 60  # readings kept per GPU: about a minute at the engine's 1 s NVML cache


class GpuHistory:
    """Each GPU's recent utilization and memory use (a fraction of its total), one reading per
    new GpuStatus: the GPU panel's and the details' sparklines read the same history."""

    def __init__(self, keep: int = GPU_HISTORY) -> None:
        self._keep = keep
        self._last: GpuStatus | None = None
        self._util: dict[int, deque[float]] = {}
        self._memory: dict[int, deque[float]] = {}

    def add(self, status: GpuStatus) -> None:
        if status is self._last:  # the engine replaces the object on each NVML read
            return
        self._last = status
        for gpu in status.gpus:
            if gpu.utilization_pct is not None:
                self._util.setdefault(gpu.index, deque(maxlen=self._keep)).append(gpu.utilization_pct)
            if gpu.memory_used_mib is not None and gpu.memory_total_mib:
                self._memory.setdefault(gpu.index, deque(maxlen=self._keep)).append(gpu.memory_used_mib / gpu.memory_total_mib)

    def util(self, index: int) -> tuple[float, ...]:
        return tuple(self._util.get(index, ()))

    def memory(self, index: int) -> tuple[float, ...]:
        return tuple(self._memory.get(index, ()))


@dataclass(frozen=True)
class Progress:
    """A probe round the operator asked for: how many of its backends have answered."""

    done: int
    total: int


@dataclass(frozen=True)
class FleetView:
    fleet: FleetSnapshot
    settings: Settings
    probing: frozenset[str] = frozenset()  # backends in a round the operator asked for, not yet answered
    progress: Progress | None = None
    read_only: bool = False
    hint: str | None = None
    paused: bool = False  # the operator froze the screen (space); the engine goes on
    sources: tuple[SourceState, ...] = ()  # remote agents (and Prometheus) this screen reads, and how each stands
    gpu_history: GpuHistory = field(default_factory=GpuHistory, compare=False)  # the app's, kept across views
