"""The fleet document read back (wire.py): what an agent says of its backends is what a remote face shows, and nothing an agent sends breaks the reader."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st
from test_properties import JSON, PROPERTY
from test_serve import first_round, serving, until

from llmtop import wire
from llmtop.serve.http import fleet_document


async def test_a_fleet_document_reads_back_as_the_same_snapshots(tmp_path):
    async with serving(tmp_path) as (engine, _client, _agent, _sim):
        await first_round(engine)
        engine.force_probe()
        await until(_probed(engine), "a probe of ok")
        await engine.set_admin("partial", "draining")
        fleet = engine.snapshot()
        doc = json.loads(json.dumps(fleet_document(fleet)))
        at, backends, gpus = wire.fleet(doc, agent=None)
        assert at == round(fleet.at, 3)
        assert [b.name for b in backends] == [b.name for b in fleet.backends]
        for mine, theirs in zip(fleet.backends, backends):
            assert theirs.to_json(fleet.at) == json.loads(json.dumps(mine.to_json(fleet.at)))
            assert theirs.figures_current(fleet.at) == mine.figures_current(fleet.at)
            assert theirs.models_summary() == mine.models_summary()
        ok = next(b for b in backends if b.name == "ok")
        assert ok.probe is not None and ok.probe.ttft_ms is not None and ok.probe is ok.last_ok_probe
        # Read as another agent's rows: the name of the agent goes with each.
        _, named, _ = wire.fleet(doc, agent="rack1")
        assert {b.agent for b in named} == {"rack1"}


def _probed(engine):
    async def done():
        b = engine.snapshot().backend("ok")
        return b.probe is not None and b.probe.ttft_ms is not None

    return done


def test_a_document_of_another_schema_is_refused_with_the_reason():
    try:
        wire.fleet({"schema": 2, "at": 1.0, "backends": []}, agent="a")
    except wire.WireError as exc:
        assert "schema" in str(exc) and "upgrade" in str(exc)
    else:
        raise AssertionError("schema 2 was read")


def test_hostile_fields_read_as_absent_or_bounded():
    doc = {
        "schema": 1,
        "at": 1e300,
        "backends": [],
    }
    try:
        wire.fleet(doc, agent="a")
        raise AssertionError("a time past 9999 was read")
    except wire.WireError:
        pass
    doc = {
        "schema": 1,
        "at": 1000.0,
        "backends": [
            {"name": "b", "status": "splendid", "latency_ms": "fast", "models": ["m"] * 10_000, "metrics": {"kv_cache_usage": -1},
             "probe": {"at": 999.0, "ttft_ms": float("nan")}, "admin": "king", "up": "yes", "last_health_at": 1e308},
            {"name": "b", "status": "down"},  # the same name twice: the first stands
            {"status": "healthy"},  # no name: not a backend
            "nonsense",
        ],
        "gpus": [{"index": -1}, {"index": 0, "name": "H100", "temperature_c": float("inf")}],
    }
    _, backends, gpus = wire.fleet(doc, agent="a")
    (b,) = backends
    assert (b.status, b.admin, b.latency_ms, b.up, b.last_health_at) == ("unknown", "active", None, None, None)
    assert len(b.models) == wire.MODELS_MAX
    assert b.metrics.kv_cache_usage is None and b.probe.ttft_ms is None
    assert [g.index for g in gpus.gpus] == [0] and gpus.gpus[0].temperature_c is None


@PROPERTY
@given(doc=JSON, backends=st.lists(JSON, max_size=4))
def test_anything_an_agent_sends_reads_as_a_fleet_or_a_wire_error(doc, backends):
    for candidate in (doc, {"schema": 1, "at": 5.0, "backends": backends}, {"schema": 1, "at": 5.0, "backends": [doc]}):
        try:
            _, read, _ = wire.fleet(candidate, agent="a")
        except wire.WireError:
            continue
        for b in read:
            json.dumps(b.to_json(5.0), allow_nan=False)  # what a face prints of it is valid, strict JSON
    for item in (doc, *backends):
        wire.event(item, "a")
        wire.gpus(item)
