"""What the app hands its screens each tick: the snapshot plus the app's own state around it."""

from __future__ import annotations

from dataclasses import dataclass

from llmtop.config import Settings
from llmtop.remote import SourceState
from llmtop.snapshot import FleetSnapshot


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
