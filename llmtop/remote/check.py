"""`llmtop check --connect/--prometheus`: each remote source read once, merged with the local check's, and the sources that could not be read."""

from __future__ import annotations

import asyncio

from llmtop.remote import Source
from llmtop.remote.merged import MergedFleet
from llmtop.snapshot import FleetSnapshot


def check_agents(local: FleetSnapshot | None, sources: list[Source]) -> tuple[FleetSnapshot, list[str]]:
    """(the merged fleet, one line per source that could not be read, naming it and why)."""

    async def read_once(source) -> None:
        try:
            once = getattr(source, "fetch_once", None) or source.refresh  # an agent's fleet, or one Prometheus refresh
            await once()
        finally:
            await source.stop()  # closes its HTTP client

    async def read() -> None:
        await asyncio.gather(*(read_once(s) for s in sources))

    asyncio.run(read())
    merged = MergedFleet((lambda: local) if local is not None else None, list(sources))
    fleet = merged.snapshot()
    lost = []
    for source in sources:
        state = source.state()
        if state.standing != "connected":
            what = "Prometheus" if state.name == "prometheus" else f"agent {state.name}"
            lost.append(f"{what} ({state.url}): {state.standing}: {state.detail or 'no answer'}")
    return fleet, lost
