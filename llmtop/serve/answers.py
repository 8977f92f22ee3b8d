"""The words of serve's readiness answers, shared by serve's HTTP site and its readiness front (front.py)."""

from __future__ import annotations

import time

STALL_S = 5.0  # no tick of the engine's loop for this long: what was published is not current


def stalled_for(beat: float) -> float | None:
    """Seconds since the engine's loop last ticked (time.monotonic() `beat`), past STALL_S; else None."""
    late = time.monotonic() - beat
    return late if late > STALL_S else None


def readyz(stalled: float | None, pending: int) -> tuple[int, str]:
    if stalled is not None:
        return 503, f"the event loop missed its heartbeat for {stalled:.1f}s\n"
    if pending:
        return 503, f"first round not done: {pending} backends not polled yet\n"
    return 200, "ready\n"


def backend_ready(stalled: float | None, answer: tuple[bool, str] | None) -> tuple[int, str]:
    """`answer`: the published (ready, reason), None for a name not in the config."""
    if stalled is not None:  # what the table says is that old: not an answer
        return 503, f"llmtop's engine has not ticked for {stalled:.1f}s: its answers are not current\n"
    if answer is None:
        return 404, "no such backend in llmtop's config\n"
    ready, reason = answer
    return (200 if ready else 503), reason.rstrip("\n") + "\n"
