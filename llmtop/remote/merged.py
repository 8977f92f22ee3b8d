"""One fleet out of many sources: the local engine's backends and every remote source's, as the FleetSnapshot the faces read, with actions routed back.

Names: a backend keeps its own name unless another source has one of the same name; then every
row of that name from a remote source is shown as `agent/name`, never merged with the other.
Events: each source's new events are taken in the order they arrive here (the events log reads
on from the last one it showed), a remote one named `agent/backend`.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections import Counter, deque
from typing import Callable

from llmtop.remote import ActionRefused, Source, SourceState
from llmtop.snapshot import BackendSnapshot, Event, FleetSnapshot, GpuStatus

EVENTS_KEPT = 500


class MergedFleet:
    def __init__(self, local: Callable[[], FleetSnapshot] | None, sources: list[Source], *, clock: Callable[[], float] = time.time):
        self.local = local  # the local engine's snapshot (Engine.snapshot), if this process watches backends itself
        self.sources = list(sources)
        self._clock = clock
        self._routes: dict[str, tuple[Source | None, str]] = {}
        self._renamed: dict[tuple[int, str], tuple[BackendSnapshot, BackendSnapshot]] = {}
        self._plain: dict[int, tuple[list[str], dict[str, tuple[Source | None, str]]]] = {}  # per source with no clash: its names, its routes
        self._rows: tuple[BackendSnapshot, ...] | None = None  # the rows last shown
        self._events: deque[Event] = deque(maxlen=EVENTS_KEPT)
        self._seen_event: dict[int, Event | None] = {}
        self._event_copies: dict[int, tuple[Event, Event]] = {}

    async def start(self) -> None:
        for source in self.sources:
            await source.start()

    async def stop(self) -> None:
        for source in self.sources:
            await source.stop()

    def states(self) -> tuple[SourceState, ...]:
        return tuple(s.state() for s in self.sources)

    def read_only(self, name: str) -> str | None:
        """Why the backend shown as `name` cannot be acted on from here; None when it can."""
        source, _ = self._routes.get(name, (None, name))
        if source is None:
            return None
        state = source.state()
        return None if state.can_act else _why_read_only(source, state)

    def route(self, name: str) -> tuple[Source | None, str]:
        """(the source, its own name for the backend) of a row as shown; (None, name) for a local one."""
        return self._routes.get(name, (None, name))

    async def act(self, name: str, action: str) -> str:
        source, own = self.route(name)
        if source is None:
            raise ActionRefused("a local backend: act on it through the engine")
        return await source.act(own, action)

    async def probe(self, names: list[str]) -> list[tuple[str, str | ActionRefused]]:
        """Probe these rows: one request to an agent all of whose rows are named (`P`), else
        one per row. [(what was asked: a row or an agent's name, its answer or refusal)]."""
        by_source: dict[int, tuple[Source, list[tuple[str, str]]]] = {}
        for name in names:
            source, own = self.route(name)
            if source is None:
                raise ActionRefused("a local backend: act on it through the engine")
            by_source.setdefault(id(source), (source, []))[1].append((name, own))
        answers: list[tuple[str, str | ActionRefused]] = []
        for source, rows in by_source.values():
            if {own for _, own in rows} >= {b.name for b in source.backends()}:
                asked = [(source.state().name, source.probe_all)]
            else:
                asked = [(name, functools.partial(source.act, own, "probe")) for name, own in rows]
            for what, call in asked:
                try:
                    answers.append((what, await call()))
                except ActionRefused as exc:
                    answers.append((what, exc))
        return answers

    def snapshot(self) -> FleetSnapshot:
        local = self.local() if self.local is not None else None
        remote = [(s, s.backends()) for s in self.sources]
        local_rows = local.backends if local else ()
        names = Counter(b.name for b in local_rows)
        own_names: dict[int, list[str]] = {}
        for source, backends in remote:
            own_names[id(source)] = [b.name for b in backends]
            names.update(own_names[id(source)])
        clashes = len(names) < sum(names.values())
        routes: dict[str, tuple[Source | None, str]] = {}
        rows: list[BackendSnapshot] = []
        renamed: dict[tuple[int, str], tuple[BackendSnapshot, BackendSnapshot]] = {}
        plain: dict[int, tuple[list[str], dict[str, tuple[Source | None, str]]]] = {}
        for b in local_rows:
            routes[b.name] = (None, b.name)
            rows.append(b)
        for source, backends in remote:
            source_names = own_names[id(source)]
            if not clashes:
                # No name is shown twice: every row keeps its own name, and the routes stay as
                # they were while the source's names do (the common case, with no work per row).
                cached = self._plain.get(id(source))
                if cached is None or cached[0] != source_names:
                    cached = (source_names, {name: (source, name) for name in source_names})
                plain[id(source)] = cached
                routes.update(cached[1])
                rows.extend(backends)
                continue
            for b in backends:
                own = b.name
                shown = own if names[own] == 1 else f"{b.agent}/{own}"
                if shown in routes:  # `agent/name` taken by a backend literally named so: keep both
                    shown = f"{shown}#{len(routes)}"
                if shown != own:
                    key = (id(source), own)
                    cached = self._renamed.get(key)
                    if cached is None or cached[0] is not b or cached[1].name != shown:
                        cached = (b, dataclasses.replace(b, name=shown))
                    renamed[key] = cached
                    b = cached[1]
                routes[shown] = (source, own)
                rows.append(b)
        self._routes, self._renamed, self._plain = routes, renamed, plain
        if self._rows is None or len(self._rows) != len(rows) or any(a is not b for a, b in zip(self._rows, rows)):
            self._rows = tuple(rows)  # else the same tuple as last time: a face can tell nothing changed
        self._take_events(local, remote)
        now = self._clock()
        return FleetSnapshot(
            at=local.at if local else now,
            backends=self._rows,
            gpu=self._gpus(local),
            events=tuple(self._events),
            config_path=local.config_path if local else None,
            config_error=local.config_error if local else None,
        )

    def _gpus(self, local: FleetSnapshot | None) -> GpuStatus:
        found = list(local.gpu.gpus) if local else []
        for source in self.sources:
            state = source.state()
            found += [dataclasses.replace(g, agent=state.name) for g in source.gpus().gpus]
        message = local.gpu.message if local and not found else None
        return GpuStatus(gpus=tuple(found), message=message if found or local else "no GPU on this machine or its agents")

    def _take_events(self, local: FleetSnapshot | None, remote) -> None:
        feeds: list[tuple[int, tuple[Event, ...], str | None]] = []
        if local is not None:
            feeds.append((0, local.events, None))
        for source, _ in remote:
            feeds.append((id(source), source.events(), source.state().name))
        for key, events, agent in feeds:
            last = self._seen_event.get(key)
            start = 0
            if last is not None:
                for i in range(len(events) - 1, -1, -1):
                    if events[i] is last:
                        start = i + 1
                        break
            for e in events[start:]:
                self._events.append(e if agent is None else dataclasses.replace(e, backend=f"{agent}/{e.backend}" if e.backend else agent))
            if events:
                self._seen_event[key] = events[-1]


def _why_read_only(source: Source, state: SourceState) -> str:
    token_env = getattr(source, "token_env", None)
    if token_env:
        return f"read-only: set {token_env} to {state.name}'s admin token"
    return f"read-only: {state.name} takes no actions from here"
