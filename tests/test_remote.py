"""Remote agents as a source: real `llmtop serve` processes over loopback, read by AgentSource, merged, acted on, lost and found again."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest
from agents import MODEL, TOKEN, TOKEN_ENV, Agent

from llmtop.remote import ActionRefused
from llmtop.remote.agents import AgentSource
from llmtop.remote.merged import MergedFleet

QUICK = (0.05, 0.3)  # backoff in tests: an agent back is seen at once


async def until(condition, what: str, timeout: float = 30.0):
    """Wait for a condition the code under test will reach (an outer bound; returns as soon as true)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.fixture
def agents(tmp_path):
    made: list[Agent] = []

    def make(label: str, names: tuple[str, ...], faults=None) -> Agent:
        agent = Agent(tmp_path, label, names, faults).start()
        made.append(agent)
        return agent

    yield make
    for agent in made:
        agent.close()


def shown(fleet, name):
    return next(b for b in fleet.backends if b.name == name)


async def test_an_agents_rows_go_stale_when_it_is_lost_never_down_and_recover_by_themselves(agents):
    agent = agents("rack1", ("a", "b"), faults={"b": "reset"})
    source = AgentSource(agent.url, name="rack1", backoff=QUICK)
    merged = MergedFleet(None, [source])
    await source.start()
    try:
        await until(lambda: source.state().standing == "connected", "the first fleet")
        truth = {b["name"]: b for b in agent.fleet()["backends"]}
        fleet = merged.snapshot()
        assert {b.name for b in fleet.backends} == {"a", "b"} and {b.agent for b in fleet.backends} == {"rack1"}
        await until(lambda: shown(merged.snapshot(), "b").status == "down", "b down, as the agent says")
        assert truth["b"]["status"] in ("down", "unknown")

        agent.kill()
        await until(lambda: source.state().standing == "stale", "the agent lost")
        fleet = merged.snapshot()
        a, b = shown(fleet, "a"), shown(fleet, "b")
        assert a.stale_since is not None and a.status == "healthy"  # as it was: not down, not fresh
        assert not a.figures_current(fleet.at)
        assert fleet.counts()["stale"] == 2 and fleet.counts()["down"] == 0
        assert any("lost" in e.message for e in fleet.events)

        await asyncio.to_thread(agent.start)
        await until(lambda: source.state().standing == "connected", "the agent back")
        fleet = merged.snapshot()
        assert shown(fleet, "a").stale_since is None and fleet.counts()["stale"] == 0
        assert any("connected again" in e.message for e in merged.snapshot().events)
    finally:
        await source.stop()


async def test_actions_need_the_agents_token_and_reach_its_state_file_and_readiness(agents, monkeypatch):
    agent = agents("rack1", ("a",))
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    source = AgentSource(agent.url, name="rack1", token_env=TOKEN_ENV, backoff=QUICK)
    merged = MergedFleet(None, [source])
    await source.start()
    try:
        await until(lambda: source.state().standing == "connected", "the first fleet")
        merged.snapshot()
        assert merged.read_only("a") == f"read-only: set {TOKEN_ENV} to rack1's admin token"
        with pytest.raises(ActionRefused, match=f"read-only: set {TOKEN_ENV}"):
            await merged.act("a", "drain")
        monkeypatch.setenv(TOKEN_ENV, "wrong-token-0123456789")
        with pytest.raises(ActionRefused, match="refused \\(401\\)") as refused:
            await merged.act("a", "drain")
        assert "wrong-token" not in str(refused.value)
        monkeypatch.setenv(TOKEN_ENV, TOKEN)
        assert merged.read_only("a") is None
        assert await merged.act("a", "drain") == "rack1: active -> draining"
        assert json.loads(agent.state.read_text())["admin"] == {"a": "draining"}
        assert agent.ready("a").status_code == 503
        await until(lambda: shown(merged.snapshot(), "a").admin == "draining", "the drain seen back over the stream")
        assert await merged.act("a", "undrain") == "rack1: draining -> active"
        assert agent.ready("a").status_code == 200
    finally:
        await source.stop()


async def test_probing_all_of_an_agents_rows_is_one_request_and_a_few_of_them_one_each(agents, monkeypatch):
    rack1, rack2 = agents("rack1", ("a", "b")), agents("rack2", ("c", "d"))
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    sources = [AgentSource(a.url, name=a.label, token_env=TOKEN_ENV, backoff=QUICK) for a in (rack1, rack2)]
    merged = MergedFleet(None, sources)
    for source in sources:
        await source.start()
    try:
        await until(lambda: all(s.state().standing == "connected" for s in sources), "both fleets")
        merged.snapshot()
        sims = {"a": rack1.sim, "b": rack1.sim, "c": rack2.sim, "d": rack2.sim}

        def probes(name: str) -> int:
            return sims[name].backends[name].requests["/v1/chat/completions"]

        def settled(name: str) -> bool:
            # Probed, and no retry to come: a probe read too late to time (a loaded core) is
            # tried once more at the next poll; after that the hour's interval holds.
            b = next((b for b in merged.snapshot().backends if b.name == name), None)
            return b is not None and b.probe is not None and not b.in_flight and (b.probe.untimed is None or probes(name) >= 2)

        await until(lambda: all(settled(n) for n in sims), "the first probes")
        before = {n: probes(n) for n in sims}
        answers = await merged.probe(["a", "b", "c"])  # all of rack1's rows (`P`), one of rack2's
        assert answers == [("rack1", "rack1: probing 2 backends"), ("c", "rack2: probing")]
        await until(lambda: all(probes(n) > before[n] for n in "abc"), "the asked probes")
        assert probes("d") == before["d"]  # not asked, next due in an hour
        monkeypatch.setenv(TOKEN_ENV, "wrong-token-0123456789")
        (what, refused), = await merged.probe(["c", "d"])
        assert what == "rack2" and isinstance(refused, ActionRefused) and "refused (401)" in str(refused)
    finally:
        for source in sources:
            await source.stop()


async def test_the_same_name_on_two_agents_is_two_rows_named_by_agent(agents, monkeypatch):
    one, two = agents("rack1", ("gpu", "only1")), agents("rack2", ("gpu",))
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    sources = [AgentSource(one.url, "rack1", TOKEN_ENV, backoff=QUICK), AgentSource(two.url, "rack2", TOKEN_ENV, backoff=QUICK)]
    merged = MergedFleet(None, sources)
    for s in sources:
        await s.start()
    try:
        await until(lambda: all(s.state().standing == "connected" for s in sources), "both agents")
        names = sorted(b.name for b in merged.snapshot().backends)
        assert names == ["only1", "rack1/gpu", "rack2/gpu"]
        assert merged.route("rack2/gpu") == (sources[1], "gpu")
        assert await merged.act("rack2/gpu", "drain") == "rack2: active -> draining"
        assert two.ready("gpu").status_code == 503 and one.ready("gpu").status_code == 200
    finally:
        for s in sources:
            await s.stop()


def test_check_connect_prints_the_merged_fleet_and_names_an_agent_it_cannot_reach(agents, tmp_path):
    agent = agents("rack1", ("a",))
    gone = f"http://127.0.0.1:{__import__('agents').free_port()}"
    run = [sys.executable, "-m", "llmtop", "check", "--connect", agent.url]
    done = subprocess.run([*run, "--json"], capture_output=True, text=True, timeout=60, env={"HOME": str(tmp_path), "PATH": ""})
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert [(b["name"], b["agent"], b["status"]) for b in doc["backends"]] == [("a", "127.0.0.1:" + str(agent.port), "healthy")]
    assert doc["agents"][0]["standing"] == "connected" and doc["backends"][0]["expected_models"] == [MODEL]
    done = subprocess.run([*run, "--connect", gone], capture_output=True, text=True, timeout=60, env={"HOME": str(tmp_path), "PATH": ""})
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and gone in done.stderr and "cannot connect" in done.stderr
    assert "AGENT" in done.stdout.splitlines()[0] and "Traceback" not in done.stderr


async def test_the_screen_shows_three_agents_marks_a_lost_one_stale_and_drains_through_another(agents, tmp_path, monkeypatch):
    from llmtop.config import Config
    from llmtop.engine import Engine
    from llmtop.state import StateStore
    from llmtop.tui.app import LlmtopApp
    from llmtop.tui.widgets.fleet_table import FleetTable
    from llmtop.tui.widgets.summary import FleetSummary

    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    racks = [agents(f"rack{i}", (f"r{i}a", f"r{i}b")) for i in (1, 2, 3)]
    sources = [AgentSource(a.url, a.label, TOKEN_ENV, backoff=QUICK) for a in racks]
    app = LlmtopApp(Engine(Config(), StateStore(tmp_path / "local.json")), config_path=None, sources=sources)
    async with app.run_test(size=(120, 40)) as pilot:

        def rows() -> dict[str, str]:
            table = app.screen.query_one(FleetTable)
            return {name: table.cells(name)["status"].text for name in table.names}

        async def until_screen(condition, what):
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while not condition():
                assert loop.time() < deadline, f"timed out waiting for {what}: {rows()} {[n.message for n in app._notifications]} {app.screen_stack}"
                app.refresh_fleet()
                await pilot.pause(0.05)

        names = {f"r{i}{x}" for i in (1, 2, 3) for x in "ab"}
        await until_screen(lambda: set(rows()) == names and all("healthy" in s for s in rows().values()), "six healthy rows")

        racks[1].kill()
        await until_screen(lambda: all("stale" in rows()[n] for n in ("r2a", "r2b")), "rack2's rows stale")
        assert all("healthy" in rows()[n] for n in names - {"r2a", "r2b"})  # the others go on
        summary = str(app.screen.query_one(FleetSummary).render())
        assert "rack2 stale since" in summary and "◷ 2 stale" in summary and "down" not in summary.split("agents")[1]

        await asyncio.to_thread(racks[1].start)
        await until_screen(lambda: all("healthy" in rows()[n] for n in ("r2a", "r2b")), "rack2 back")

        table = app.screen.query_one(FleetTable)
        table.move_cursor(row=table.get_row_index("r3a"))
        await pilot.press("d", "y")
        await until_screen(lambda: "draining" in rows()["r3a"], "the drain shown")
        assert json.loads(racks[2].state.read_text())["admin"] == {"r3a": "draining"}
        assert racks[2].ready("r3a").status_code == 503
        await pilot.press("q")
