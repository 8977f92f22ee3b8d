"""`llmtop check --connect`: each agent's fleet read once, merged with the local check's, and the agents that could not be read."""

from __future__ import annotations

import asyncio

from llmtop.remote.agents import AgentSource
from llmtop.remote.merged import MergedFleet
from llmtop.snapshot import FleetSnapshot


def check_agents(local: FleetSnapshot | None, agents: list[AgentSource]) -> tuple[FleetSnapshot, list[str]]:
    """(the merged fleet, one line per agent that could not be read, naming it and why)."""

    async def read() -> None:
        await asyncio.gather(*(agent.fetch_once() for agent in agents))

    asyncio.run(read())
    merged = MergedFleet((lambda: local) if local is not None else None, list(agents))
    fleet = merged.snapshot()
    lost = []
    for agent in agents:
        state = agent.state()
        if state.standing != "connected":
            lost.append(f"agent {state.name} ({state.url}): {state.standing}: {state.detail or 'no answer'}")
    return fleet, lost
