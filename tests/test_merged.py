"""MergedFleet's naming and routing as sources come and go (pure: in-memory sources, no sockets)."""

from __future__ import annotations

from llmtop.remote import SourceState
from llmtop.remote.merged import MergedFleet
from llmtop.snapshot import BackendSnapshot, GpuStatus


def _snap(name: str, agent: str) -> BackendSnapshot:
    return BackendSnapshot(
        name=name, provider="vllm", url="http://h", status="healthy", status_reason=None, circuit="closed",
        admin="active", enabled=True, latency_ms=None, models=(), expected_models=(), missing_models=(),
        alerts=(), metrics=None, probe=None, error=None, error_rate=None, last_health_at=None,
        retry_after_at=None, probe_tokens_per_hour=0.0, agent=agent,
    )


class ListSource:
    """A remote source whose rows a test sets."""

    def __init__(self, name: str, rows: list[str]) -> None:
        self.name = name
        self.set(rows)

    def set(self, rows: list[str]) -> None:
        self._rows = tuple(_snap(n, self.name) for n in rows)

    def state(self) -> SourceState:
        return SourceState(self.name, f"http://{self.name}", "connected", 0.0, backends=len(self._rows))

    def backends(self) -> tuple[BackendSnapshot, ...]:
        return self._rows

    def gpus(self) -> GpuStatus:
        return GpuStatus()

    def events(self) -> tuple:
        return ()


def test_names_stay_plain_until_two_sources_share_one_then_both_are_agent_slash_name_and_back():
    rack1, rack2 = ListSource("rack1", ["a", "b"]), ListSource("rack2", ["c"])
    merged = MergedFleet(None, [rack1, rack2], clock=lambda: 0.0)
    assert [b.name for b in merged.snapshot().backends] == ["a", "b", "c"]
    assert merged.route("c") == (rack2, "c")

    rack2.set(["c", "a"])  # a clash: neither `a` is merged with the other
    assert [b.name for b in merged.snapshot().backends] == ["rack1/a", "b", "c", "rack2/a"]
    assert merged.route("rack1/a") == (rack1, "a") and merged.route("rack2/a") == (rack2, "a")
    assert merged.route("a") == (None, "a")  # no longer a row of that name

    rack2.set(["c"])  # gone again: plain names, routes as before
    assert [b.name for b in merged.snapshot().backends] == ["a", "b", "c"]
    assert merged.route("a") == (rack1, "a") and merged.route("rack1/a") == (None, "rack1/a")


def test_the_same_rows_come_back_as_the_same_tuple_and_a_changed_row_as_a_new_one():
    rack1 = ListSource("rack1", ["a", "b"])
    merged = MergedFleet(None, [rack1], clock=lambda: 0.0)
    first = merged.snapshot().backends
    assert merged.snapshot().backends is first  # nothing changed: a face can tell by identity
    rack1.set(["a", "b"])  # new snapshots of the same names
    again = merged.snapshot().backends
    assert again is not first and again == rack1.backends()
