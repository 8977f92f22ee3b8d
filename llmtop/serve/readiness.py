"""Whether a backend should take traffic now, and why not: the one rule the HTTP endpoint and the HAProxy agent share."""

from __future__ import annotations

from typing import NamedTuple

from llmtop.sanitize import for_terminal
from llmtop.snapshot import BackendSnapshot

# An HAProxy agent reply is one line; its reason is what `show stat` and the logs print.
REASON_MAX = 120


class Readiness(NamedTuple):
    ready: bool
    reason: str  # one line: "ready", "draining", "down: /health: HTTP 503", ...
    known: bool = True  # False before the backend was ever polled: nothing to tell a balancer yet


def readiness(b: BackendSnapshot, ready_when: tuple[str, ...]) -> Readiness:
    """From the latest snapshot, never a live call. The operator's state comes first (a drained
    backend is drained whatever its health), then what the engine knows of its health."""
    if b.admin == "disabled":
        return Readiness(False, "disabled")
    if b.admin == "draining":
        return Readiness(False, "draining")
    if b.status == "unknown":
        return Readiness(False, "not yet probed", known=False)
    if b.circuit == "open":
        return Readiness(False, _why("circuit open", b))
    if b.status in ("down", "loading"):
        return Readiness(False, _why(b.status, b))
    if b.retry_after_at is not None:
        return Readiness(False, "rate limited (429)")
    if b.status not in ready_when:
        return Readiness(False, _why(b.status, b))
    return Readiness(True, "ready")


def _why(state: str, b: BackendSnapshot) -> str:
    reason = b.status_reason
    return for_terminal(f"{state}: {reason}" if reason and reason != state else state, REASON_MAX)


def agent_reply(b: BackendSnapshot, ready_when: tuple[str, ...]) -> str | None:
    """The line HAProxy's agent-check reads (its grammar: an admin word, a health word, `#` then a
    description, a newline), or None when there is nothing to say yet (HAProxy keeps the state
    it had: an llmtop restart must not take a fleet out of service).

    - ready        -> "ready up"
    - drained, rate limited, or a status ready_when excludes -> "drain up": no new traffic, the
      server stays up (its sessions finish)
    - disabled     -> "maint": no traffic at all
    - down, loading, circuit open -> "ready down": out until llmtop says up again
    Both words are always sent, so each reply sets the whole state and undoes the last one."""
    r = readiness(b, ready_when)
    if not r.known:
        return None
    if r.ready:
        return "ready up\n"
    description = " ".join(r.reason.replace("#", " ").split())
    if b.admin == "disabled":
        return f"maint # {description}\n"
    if b.admin == "draining":
        health = "down" if b.status in ("down", "loading") or b.circuit == "open" else "up"
        return f"drain {health} # {description}\n"
    if b.circuit == "open" or b.status in ("down", "loading"):
        return f"ready down # {description}\n"
    return f"drain up # {description}\n"
