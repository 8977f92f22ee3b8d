"""The Prometheus source (llmtop/remote/prometheus.py): a real Prometheus scraping two real `llmtop serve`
agents shows the same backends as each agent's /api/v1/fleet; a tiny fake query API serves it
every hostile answer there is; and no JSON at all makes its parser raise anything but its own error."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import socket
import subprocess
import sys
import time
from collections import defaultdict
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st
import loopback
from real import needs
from test_properties import JSON, PROPERTY, finite_everywhere

from llmtop import cli, wire
from llmtop.config import Config
from llmtop.remote import ActionRefused
from llmtop.remote.prometheus import GAUGES, HISTORY_POINTS, LISTS, STATESETS, NAME_MAX, PrometheusError, PrometheusSource, assemble, parse_answer, snapshot_of
from llmtop.remote.sources import remote_sources
from llmtop.simulator import SimBackend, Simulator

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def until(condition, what: str, timeout: float = 60.0, why=lambda: ""):
    """Wait for a condition the system will reach: an outer bound only, it returns as soon as true."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}: {why()}"
        await asyncio.sleep(0.2)


# -- a real Prometheus over two real agents ------------------------------------------------------------


class Agent:
    """One `llmtop serve` process over a simulator of its own, with its own config and state file."""

    def __init__(self, tmp: Path, name: str, backends: list[SimBackend], expected: dict[str, tuple[str, ...]]):
        self.dir = tmp / name
        self.dir.mkdir()
        self.sim = Simulator(backends)
        self.backends = backends
        self.expected = expected
        self.port = free_port()
        self.config = self.dir / "fleet.toml"
        self.state = self.dir / "state.json"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.sim.start_in_thread()
        # Nothing is polled again for an hour: every figure stays what the first round measured, so
        # what Prometheus scraped and what the agent's /api/v1/fleet says are the same figures.
        text = "[settings]\ntimeout_s = 5\nhealth_interval_s = 3600\nprobe_interval_s = 3600\n"
        for b in self.backends:
            models = ", ".join(json.dumps(m) for m in self.expected.get(b.name, (MODEL,)))
            text += f'[[backend]]\nname = "{b.name}"\nprovider = "{b.provider}"\nurl = "{self.sim.url(b.name)}"\nmodels = [{models}]\n'
            text += 'labels = {team = "ml"}\n' if b.name == "ok" else ""
        self.config.write_text(text)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llmtop", "serve", "--config", str(self.config), "--state", str(self.state), "--listen", f"127.0.0.1:{self.port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )

    @property
    def instance(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        self.kill()
        self.sim.stop_thread()


@asynccontextmanager
async def prometheus(tmp: Path, targets: list[str]):
    port = free_port()
    (tmp / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"scrape_configs:\n  - job_name: llmtop\n    static_configs: [{{targets: {json.dumps(targets)}}}]\n"
    )
    proc = subprocess.Popen(
        ["prometheus", f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with loopback.AsyncClient(trust_env=False, timeout=5) as client:

            async def ready() -> bool:
                assert proc.poll() is None, proc.stderr.read().decode()
                try:
                    return (await client.get(url + "/-/ready")).status_code == 200
                except httpx.HTTPError:
                    return False

            await until(ready, "Prometheus to start")
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def close(a: float | None, b: float | None, tol: float) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and abs(a - b) <= tol)


def from_fleet(doc: dict) -> dict[str, tuple]:
    """What the fleet table shows of each backend, as the agent itself tells it."""
    out = {}
    for data in doc["backends"]:
        b = wire.backend(data, None)
        ttft = data["probe"]["phases"]["ttft_ms"] if data["probe_current"] else None
        out[b.name] = (b.status, b.admin, b.circuit, b.models_summary(), b.latency_ms, ttft)
    return out


def from_source(source: PrometheusSource, agent: str) -> dict[str, tuple]:
    return {
        b.name: (b.status, b.admin, b.circuit, b.models_summary(), b.latency_ms, None if b.probe is None else b.probe.ttft_ms)
        for b in source.backends()
        if b.agent == agent
    }


def models_alike(shown: str, told: str) -> bool:
    """The same models summary; while the model list is unknown Prometheus has no expected
    models either (model_missing is absent then), so "?/1" is "?" there: unknown all the same."""
    return shown == told or (told.startswith("?/") and shown == "?")


def same(shown: dict[str, tuple], told: dict[str, tuple]) -> bool:
    """The same rows and words; latency and TTFT to the digits the fleet document keeps."""
    return shown.keys() == told.keys() and all(
        shown[n][:3] == told[n][:3] and models_alike(shown[n][3], told[n][3])
        and close(shown[n][4], told[n][4], 0.051) and close(shown[n][5], told[n][5], 0.0051)
        for n in told
    )


@needs("prometheus")
async def test_a_real_prometheus_over_two_agents_shows_their_fleets_a_drain_and_a_lost_agent_as_stale(tmp_path):
    one = Agent(tmp_path, "one", [SimBackend("ok"), SimBackend("partial"), SimBackend("shared")], {"partial": (MODEL, "not-served")})
    two = Agent(tmp_path, "two", [SimBackend("shared"), SimBackend("dead", fault="reset"), SimBackend("any")], {"any": ()})
    agents = (one, two)
    source = None
    try:
        for agent in agents:
            agent.start()
        async with prometheus(tmp_path, [a.instance for a in agents]) as url, loopback.AsyncClient(trust_env=False, timeout=5) as client:
            source = PrometheusSource(url, '{job="llmtop"}', refresh_s=1.0, stale_after_s=30.0)

            async def fleet(agent: Agent) -> dict:
                return (await client.get(f"http://{agent.instance}/api/v1/fleet")).json()

            async def first_rounds_done() -> bool:
                for agent in agents:
                    assert agent.proc.poll() is None, agent.proc.stderr.read().decode()
                    try:
                        if (await client.get(f"http://{agent.instance}/readyz")).status_code != 200:
                            return False
                    except httpx.HTTPError:
                        return False
                return True

            await until(first_rounds_done, "both agents' first rounds")
            told: dict[str, dict] = {}

            async def shows_both() -> bool:
                # What each agent tells now (it settles after its first round: nothing is polled again
                # for an hour), and what Prometheus has scraped of it.
                told.update({a.instance: from_fleet(await fleet(a)) for a in agents})
                state = await source.refresh()
                return state.standing == "connected" and all(same(from_source(source, a), told[a]) for a in told)

            await until(shows_both, "the source to show both agents' fleets",
                        why=lambda: f"{source.state()}\nshown {[from_source(source, a) for a in told]}\ntold {told}")
            assert told[two.instance]["dead"][0] == "down" and told[one.instance]["partial"][0] == "degraded"
            # TTFT is compared where the agent has a current one (on a loaded machine a probe may be
            # untimed, llmtop having read its first token late: then both say none).
            rows = {(b.agent, b.name): b for b in source.backends()}
            assert len(rows) == 6 and (one.instance, "shared") in rows and (two.instance, "shared") in rows  # a name on two agents: two rows
            assert rows[(one.instance, "partial")].missing_models == ("not-served",)
            assert rows[(two.instance, "any")].models_summary() == "1"  # no expected model: the count the agent reads
            assert rows[(one.instance, "ok")].labels == (("team", "ml"),)
            assert rows[(two.instance, "dead")].up is False and rows[(one.instance, "ok")].up is True
            assert rows[(two.instance, "dead")].models is None and rows[(two.instance, "dead")].models_error
            assert all(b.stale_since is None for b in rows.values())
            assert not source.state().can_act

            # A drain on agent one (its own CLI, through its state file) shows in Prometheus' rows.
            drain = await asyncio.to_thread(
                subprocess.run, [sys.executable, "-m", "llmtop", "drain", "ok", "--config", str(one.config), "--state", str(one.state)],
                capture_output=True, text=True, timeout=60,
            )
            assert drain.returncode == 0, drain.stderr

            async def drained() -> bool:
                await source.refresh()
                row = next(b for b in source.backends() if (b.agent, b.name) == (one.instance, "ok"))
                return row.admin == "draining"

            await until(drained, "the drain to reach the source")
            assert (await fleet(one))["backends"][0]["admin"] == "draining"

            # `check --prometheus` prints the same fleet, an agent per backend; 1 since some are not healthy.
            checked = await asyncio.to_thread(
                subprocess.run, [sys.executable, "-m", "llmtop", "check", "--prometheus", url, "--selector", '{job="llmtop"}', "--json"],
                capture_output=True, text=True, timeout=60, env={**os.environ, "HOME": str(tmp_path)},
            )
            assert checked.returncode == 1 and checked.stderr == "", checked.stderr
            doc = json.loads(checked.stdout)
            # A name on two agents is two rows, each named agent/name.
            assert {b["name"] for b in doc["backends"]} >= {f"{one.instance}/shared", f"{two.instance}/shared"}
            shown = {(b["agent"], b["name"].removeprefix(f'{b["agent"]}/')): (b["status"], b["admin"]) for b in doc["backends"]}
            assert set(shown) == set(rows) and shown[(one.instance, "ok")][1] == "draining"
            assert shown[(two.instance, "dead")][0] == "down" and doc["agents"][0]["standing"] == "connected"

            # Agent two is lost: its rows stay, as they were, stale since their last sample.
            before = {b.name: b for b in source.backends() if b.agent == two.instance}
            two.kill()

            async def only_two_is_stale() -> bool:
                # (Agent one's rows too would be stale for a second if a scrape of it timed out on a loaded machine.)
                await source.refresh()
                return all((b.stale_since is not None) == (b.agent == two.instance) for b in source.backends())

            await until(only_two_is_stale, "agent two's rows (and only those) to turn stale",
                        why=lambda: str([(b.agent, b.name, b.stale_since) for b in source.backends()]))
            after = {b.name: b for b in source.backends() if b.agent == two.instance}
            assert after.keys() == before.keys()
            assert all(after[n].status == before[n].status and after[n].admin == before[n].admin for n in after)  # not down
            assert source.state().standing == "connected"
            history = await source.history(one.instance, "ok", 120)
            now_shown = next(b for b in source.backends() if (b.agent, b.name) == (one.instance, "ok"))
            assert history["latency"] and history["latency"][-1][1] == pytest.approx(now_shown.latency_ms, abs=0.01)
            assert now_shown.latency_history and now_shown.latency_history[-1][1] == pytest.approx(now_shown.latency_ms, abs=0.01)
    finally:
        if source is not None:
            await source.stop()
        for agent in agents:
            agent.stop()


# -- a fake query API, for every answer a real one should not give -------------------------------------


class FakeApi:
    """/api/v1/query and /api/v1/query_range on 127.0.0.1, answering from `self.series` (the
    llmtop families of a small fleet: "seen" for the timestamps, else by family, "history:" and
    the family for query_range) or from `self.override` (a status and a body) when set."""

    def __init__(self):
        self.series: dict[str, list[dict]] = defaultdict(list)
        self.override: tuple[int, bytes] | None = None
        self.stream: int | None = None  # answer this many bytes of endless JSON, in 64 KiB chunks
        self.hold_ranges: asyncio.Event | None = None  # when set, query_range answers wait for it
        self.range_status: int | None = None  # when set, query_range answers this status
        self.range_takes_s = 0.0  # the clock (`now`) moves on by this when a query_range comes in
        self.headers: list[dict] = []
        self.paths: list[str] = []
        self.now = 1_800_000_000.0
        self.port: int | None = None
        self._runner: web.AppRunner | None = None

    @staticmethod
    def which(query: str) -> str:
        """The family a query asks for: the first llmtop name in it (the one it selects)."""
        family = re.search(r"llmtop_[a-z_]+", query).group(0)
        return "seen" if query.startswith("timestamp(") else family

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.headers.append(dict(request.headers))
        self.paths.append(request.path)
        if self.stream is not None:
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            await response.prepare(request)
            await response.write(b'{"status":"success","data":{"resultType":"vector","result":["')
            chunk = b"x" * 65536
            for _ in range(self.stream // len(chunk)):
                await response.write(chunk)
            return response
        if self.override is not None:
            status, body = self.override
            return web.Response(status=status, body=body, content_type="application/json")
        query = request.query.get("query", "")
        if request.path.endswith("query_range"):
            self.now += self.range_takes_s
            self.range_takes_s = 0.0
            if self.hold_ranges is not None:
                await self.hold_ranges.wait()
            if self.range_status is not None:
                return web.Response(status=self.range_status, text="overloaded")
            result_type, result = "matrix", self.series[f"history:{self.which(query)}"]
        else:
            result_type, result = "vector", self.series[self.which(query)]
        return web.Response(text=json.dumps({"status": "success", "data": {"resultType": result_type, "result": result}}),
                            content_type="application/json")

    async def __aenter__(self) -> "FakeApi":
        app = web.Application()
        app.router.add_get("/api/v1/query", self.handle)
        app.router.add_get("/api/v1/query_range", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def __aexit__(self, *exc) -> None:
        await self._runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def backend(self, name: str, instance: str = "agent-1:9850", age_s: float = 1.0, **gauges) -> None:
        """A healthy backend with the given gauge values (family suffix -> value as a string)."""
        ident = {"instance": instance, "backend": name}
        self.series["seen"].append({"metric": {**ident, "job": "llmtop", "provider": "vllm"}, "value": [self.now, str(self.now - age_s)]})
        for family, state in (("status", "healthy"), ("circuit", "closed"), ("admin", "active")):
            family = f"llmtop_backend_{family}"
            self.series[family].append({"metric": {**ident, family: state}, "value": [self.now, "1"]})
        values = {"llmtop_backend_up": "1", "llmtop_backend_model_list_known": "1", "llmtop_backend_health_latency_seconds": "0.003",
                  "llmtop_probe_last_ttft_seconds": "0.15", "llmtop_probe_last_decode_tokens_per_second": "90",
                  "llmtop_probe_last_success_timestamp_seconds": str(self.now - 5)}
        values.update({k if k.startswith("llmtop_") else f"llmtop_backend_{k}": v for k, v in gauges.items()})
        for family, value in values.items():
            if value is not None:
                self.series[family].append({"metric": ident, "value": [self.now, value]})
        self.series["llmtop_backend_model_missing"].append({"metric": {**ident, "model": MODEL}, "value": [self.now, "0"]})

    def drop(self, name: str) -> None:
        for kind, series in self.series.items():
            self.series[kind] = [s for s in series if s["metric"].get("backend") != name]


def clocked(api: FakeApi, **kwargs) -> PrometheusSource:
    return PrometheusSource(api.url, '{job="llmtop"}', clock=lambda: api.now, **kwargs)


async def test_rows_carry_what_the_families_say_and_unknowns_stay_unknown():
    async with FakeApi() as api:
        api.backend("ok")
        api.backend("no-list", model_list_known="0", llmtop_probe_last_ttft_seconds=None, llmtop_probe_last_decode_tokens_per_second=None)
        api.backend("no-families", model_list_known=None, up=None)
        source = clocked(api)
        try:
            state = await source.refresh()
            assert state.standing == "connected" and state.backends == 3 and state.detail is None
            rows = {b.name: b for b in source.backends()}
            ok = rows["ok"]
            assert ok.status == "healthy" and ok.agent == "agent-1:9850" and ok.provider == "vllm" and ok.labels == ()
            assert ok.latency_ms == pytest.approx(3.0) and ok.probe.ttft_ms == pytest.approx(150.0) and ok.probe.tokens_per_s == 90
            assert ok.probe.at == api.now - 5 and ok.last_ok_probe is ok.probe and ok.models_summary() == "1/1"
            assert ok.figures_current(api.now) and ok.stale_since is None
            # A model list the agent could not read is unknown, not "all served"; no probe gauge is no figure, not zero.
            assert rows["no-list"].models is None and rows["no-list"].models_summary() == "?/1" and rows["no-list"].models_error
            assert rows["no-list"].probe is None and rows["no-list"].last_ok_probe is None
            assert rows["no-families"].models is None and rows["no-families"].up is None
        finally:
            await source.stop()


async def test_hostile_values_read_as_absent_and_huge_labels_are_cut():
    async with FakeApi() as api:
        api.backend("x" * 1_000_000, up="NaN", health_latency_seconds="+Inf", requests_waiting="-Inf",
                    requests_running="seven", kv_cache_usage_ratio="1e400", llmtop_probe_last_ttft_seconds="1e306",
                    llmtop_probe_last_success_timestamp_seconds="1e20", models_served="2.5")
        api.series["llmtop_backend_server_ttft_seconds"].append({"metric": {"instance": "agent-1:9850", "backend": "x" * 1_000_000},
                                                                 "value": [api.now, True]})
        api.series["llmtop_backend_up"].append({"metric": {"backend": ["not", "a", "string"]}, "value": [api.now, "1"]})
        api.series["llmtop_backend_up"].append({"metric": "nothing", "value": "nothing"})
        api.series["llmtop_backend_up"].append("not a series")
        api.series["llmtop_backend_admin"] = [{"metric": {"instance": "agent-1:9850", "backend": "x" * 1_000_000, "llmtop_backend_admin": "\x1b[2Jpwned"},
                                               "value": [api.now, "1"]}]
        source = clocked(api)
        try:
            assert (await source.refresh()).standing == "connected"
            (row,) = source.backends()
            assert len(row.name) == NAME_MAX and row.up is None and row.latency_ms is None and row.admin == "active"
            assert row.metrics is None  # not one engine figure was a number
            assert row.probe.ttft_ms is None and row.probe.at == api.now - 1  # no believable success time: the sample's
            assert row.models_total is None
            assert finite_everywhere(row.to_json(api.now))
        finally:
            await source.stop()


@pytest.mark.parametrize("status, body, words", [
    (200, b"<html>not json</html>", "not JSON"),
    (200, b'{"status": "success", "data": {"resultType": "matrix", "result": []}}', "matrix where a vector"),
    (200, b'{"status": "error", "errorType": "bad_data", "error": "parse error at char 7"}', "parse error at char 7"),
    (400, b'{"status": "error", "errorType": "bad_data", "error": "invalid parameter \\"query\\""}', "HTTP 400"),
    (500, b"", "HTTP 500"),
    (503, b"[" * 100_000, "HTTP 503"),
    (200, b"[" * 100_000, "not JSON"),
])
async def test_an_answer_that_is_not_a_vector_is_an_error_standing_in_one_line(status, body, words):
    async with FakeApi() as api:
        api.override = (status, body)
        source = clocked(api)
        try:
            state = await source.refresh()
            assert state.standing == "error" and words in state.detail and "\n" not in state.detail and len(state.detail) <= 300
            assert source.backends() == ()
        finally:
            await source.stop()


async def test_a_failing_query_api_keeps_the_last_rows_marked_stale_and_recovers():
    async with FakeApi() as api:
        api.backend("a")
        api.backend("b", instance="agent-2:9850")
        source = clocked(api)
        try:
            await source.refresh()
            before = {b.name: b for b in source.backends()}
            api.override = (500, b'{"status": "error", "errorType": "internal", "error": "query timed out"}')
            api.now += 10
            state = await source.refresh()
            assert state.standing == "stale" and "HTTP 500" in state.detail and "query timed out" in state.detail
            after = {b.name: b for b in source.backends()}
            assert after.keys() == before.keys()
            assert all(b.stale_since == api.now - 11 and b.status == "healthy" for b in after.values())  # since their last sample: not down
            assert [e.kind for e in source.events()] == ["source", "source"]
            api.override = None
            assert (await source.refresh()).standing == "connected"
            assert all(b.stale_since is None for b in source.backends())
        finally:
            await source.stop()


async def test_an_unreachable_query_api_is_an_error_with_a_one_line_detail():
    source = PrometheusSource(f"http://127.0.0.1:{free_port()}", timeout_s=2)
    try:
        state = await source.refresh()
        assert state.standing == "error" and "did not answer" in state.detail and "\n" not in state.detail
    finally:
        await source.stop()


async def test_old_samples_and_lost_agents_are_stale_and_a_removed_backend_goes():
    async with FakeApi() as api:
        api.backend("fresh")
        api.backend("old", age_s=120)  # 2 minutes behind: a target scraped no more, in a store that writes no staleness markers
        api.backend("gone")
        api.backend("lost", instance="agent-2:9850")
        source = clocked(api, stale_after_s=60)
        try:
            await source.refresh()
            rows = {b.name: b for b in source.backends()}
            assert rows["old"].stale_since == api.now - 120 and rows["fresh"].stale_since is None
            # Agent 2 stops answering (Prometheus marks all its series stale), and "gone" leaves agent 1's config.
            api.drop("lost")
            api.drop("gone")
            api.now += 5
            await source.refresh()
            rows = {b.name: b for b in source.backends()}
            assert "gone" not in rows
            assert rows["lost"].stale_since == api.now - 6 and rows["lost"].status == "healthy" and rows["lost"].agent == "agent-2:9850"
            api.backend("lost", instance="agent-2:9850")  # it is back
            await source.refresh()
            assert next(b for b in source.backends() if b.name == "lost").stale_since is None
        finally:
            await source.stop()


async def test_a_row_torn_between_two_scrapes_is_kept_as_it_was_once_and_then_shown_as_sent():
    """The queries of a refresh are answered one by one: one may see a backend that the next no
    longer has (its agent's failed scrape committed in between). Such a row is kept as it was for
    that refresh; sent that way twice running, it is what the exporter sends, and shown so."""
    async with FakeApi() as api:
        api.backend("a")
        source = clocked(api)
        try:
            await source.refresh()
            for family in ("llmtop_backend_status", "llmtop_backend_circuit", "llmtop_backend_admin", "llmtop_backend_model_list_known"):
                api.series[family] = []
            await source.refresh()
            (row,) = source.backends()
            assert row.status == "healthy" and row.models == (MODEL,)
            await source.refresh()
            (row,) = source.backends()
            assert row.status == "unknown" and row.status_reason == "no status in Prometheus" and row.models is None
        finally:
            await source.stop()


async def test_credentials_come_from_env_and_never_show(monkeypatch):
    token, password = "s3cr3t-T0KEN-abcdef123456", "hunter2-Passw0rd-xyz"
    monkeypatch.setenv("PROM_TOKEN", token)
    async with FakeApi() as api:
        api.backend("a")
        source = PrometheusSource(api.url, bearer_token_env="PROM_TOKEN", clock=lambda: api.now)
        try:
            assert (await source.refresh()).standing == "connected"
            assert api.headers[-1]["Authorization"] == f"Bearer {token}"
            # The server echoes what it was sent (as some proxies do) in a 403, and then in a 500.
            api.override = (403, json.dumps({"status": "error", "error": f"token {token} is not allowed"}).encode())
            state = await source.refresh()
            assert state.standing == "unauthorized" and "PROM_TOKEN" in state.detail
            api.override = (500, json.dumps({"status": "error", "error": f"bad header: Bearer {token}"}).encode())
            state = await source.refresh()
            with pytest.raises(PrometheusError) as raised:
                await source.history("agent-1:9850", "a", 60)
            shown = [state.detail, str(raised.value), repr(source), repr(state), *(e.message for e in source.events())]
            assert "bad header" in state.detail and all(token not in text for text in shown), shown
        finally:
            await source.stop()
        monkeypatch.delenv("PROM_TOKEN")
        state = await source.refresh()
        assert state.standing == "unauthorized" and "set PROM_TOKEN" in state.detail
        monkeypatch.setenv("PROM_USER", "ops")
        monkeypatch.setenv("PROM_PASSWORD", password)
        basic = PrometheusSource(api.url, basic_user_env="PROM_USER", basic_password_env="PROM_PASSWORD", clock=lambda: api.now)
        try:
            api.override = (401, json.dumps({"error": f"no {password}"}).encode())
            state = await basic.refresh()
            assert state.standing == "unauthorized" and "PROM_USER and PROM_PASSWORD" in state.detail and password not in state.detail
            assert api.headers[-1]["Authorization"].startswith("Basic ")
        finally:
            await basic.stop()
    with pytest.raises(ValueError) as raised:
        PrometheusSource(f"http://ops:{password}@prometheus:9090")
    assert password not in str(raised.value) and "environment variables" in str(raised.value)


async def test_an_answer_past_the_size_bound_is_refused_with_a_clear_error():
    async with FakeApi() as api:
        api.stream = 4 * 1024 * 1024
        source = PrometheusSource(api.url, max_body=1024 * 1024, clock=lambda: api.now)
        try:
            state = await source.refresh()
            assert state.standing == "error" and "more than 1 MiB" in state.detail and "narrow the selector" in state.detail
        finally:
            await source.stop()


async def test_a_query_api_that_never_answers_ends_the_refresh_within_its_deadline():
    async def hang(_request):
        await asyncio.Event().wait()

    app = web.Application()
    app.router.add_get("/api/v1/query", hang)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)  # the hung handler is not waited for
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    source = PrometheusSource(f"http://127.0.0.1:{runner.addresses[0][1]}", timeout_s=0.5)
    try:
        state = await asyncio.wait_for(source.refresh(), 30)
        assert state.standing == "error" and ("did not answer" in state.detail or "longer than" in state.detail)
    finally:
        await source.stop()
        await runner.cleanup()


async def test_it_is_read_only():
    source = PrometheusSource("http://127.0.0.1:9090")
    assert not source.state().can_act and source.state().standing == "connecting"
    for action in ("drain", "undrain", "disable", "enable", "probe"):
        with pytest.raises(ActionRefused, match="read-only"):
            await source.act("a", action)
    assert source.gpus().gpus == () and source.gpus().message


@pytest.mark.parametrize("selector", ['{job="llmtop"', "up{job='x'}", "job"])
def test_a_selector_that_is_not_label_matchers_is_refused_at_once(selector):
    with pytest.raises(ValueError, match="selector"):
        PrometheusSource("http://127.0.0.1:9090", selector)


async def test_sparklines_fill_from_query_range_bounded_and_in_the_faces_units():
    async with FakeApi() as api:
        api.backend("a")
        # Points up to just before the scrape the table reads (at api.now - 1), as Prometheus has them.
        # The range's last step (api.now) re-reads that scrape under its own time: not a point of its own.
        points = [[api.now - 5 * i, str(0.1 + i / 1000)] for i in range(200, 0, -1)] + [[api.now, "0.15"]]
        api.series["history:llmtop_probe_last_ttft_seconds"] = [{"metric": {"instance": "agent-1:9850", "backend": "a"}, "values": points}]
        api.series["history:llmtop_backend_requests_waiting"] = [
            {"metric": {"instance": "agent-1:9850", "backend": "a"}, "values": [[api.now - 5, "3"], [api.now - 4, "NaN"], ["never", "1"], [api.now - 3, "-1"]]},
        ]
        source = clocked(api)
        try:
            await source.refresh()
            (row,) = source.backends()
            # The range's points, then the value the table read, at its scrape's time.
            assert len(row.ttft_history) == HISTORY_POINTS and row.ttft_history[-2:] == ((api.now - 5, pytest.approx(101.0)), (api.now - 1, pytest.approx(150.0)))
            # The range had no decode rate; the instant answer's, at its scrape's time, is the first point.
            assert row.queue_history == ((api.now - 5, 3.0),) and row.tps_history == ((api.now - 1, 90.0),)
            shown = await source.history("agent-1:9850", "a", 600)
            assert len(shown["ttft"]) == HISTORY_POINTS and shown["queue"] == ((api.now - 5, 3.0),) and shown["latency"] == ()
            # Later refreshes add the values they read, at their scrape's time, and ask for no range.
            api.series.clear()
            api.now += 5
            api.backend("a", llmtop_probe_last_ttft_seconds="0.2")
            asked = len(api.headers)
            await source.refresh()
            (row,) = source.backends()
            assert len(row.ttft_history) == HISTORY_POINTS and row.ttft_history[-1] == (api.now - 1, pytest.approx(200.0))
            assert row.queue_history == ((api.now - 10, 3.0),) and len(api.headers) - asked == len(source._queries.instant)
            await source.refresh()  # the same scrape again: no second point
            assert source.backends()[0].ttft_history == row.ttft_history
        finally:
            await source.stop()


async def test_the_table_is_shown_before_the_sparklines_backfill_and_they_merge_in_by_time():
    # At 3,000 backends the backfill took as long again as the table: a first look shows the
    # rows as soon as the instant answers are in, and their earlier points join them after.
    async with FakeApi() as api:
        api.backend("a")
        older = [[api.now - 5 * i, "0.1"] for i in range(10, 0, -1)]
        api.series["history:llmtop_probe_last_ttft_seconds"] = [{"metric": {"instance": "agent-1:9850", "backend": "a"}, "values": older}]
        api.hold_ranges = asyncio.Event()
        source = clocked(api)
        try:
            refreshing = asyncio.ensure_future(source.refresh())
            deadline = time.monotonic() + 30  # outer bound only
            while not source.backends() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            (shown,) = source.backends()
            assert source.state().standing == "connected" and not refreshing.done()
            assert shown.ttft_history == ((api.now - 1, pytest.approx(150.0)),)  # the value the table read, alone so far
            api.hold_ranges.set()
            await refreshing
            (row,) = source.backends()
            assert row.seq > shown.seq
            assert row.ttft_history == tuple((t, pytest.approx(100.0)) for t, _ in older) + ((api.now - 1, pytest.approx(150.0)),)
            assert source.last_table_s <= source.last_refresh_s
            await source.refresh()  # nothing new: the row is not made again
            assert source.backends()[0] is row
        finally:
            await source.stop()


async def test_a_failed_backfill_leaves_the_rows_connected_says_why_and_is_not_retried_each_refresh():
    async with FakeApi() as api:
        api.backend("a")
        api.range_status = 503
        source = clocked(api)
        try:
            state = await source.refresh()
            assert state.standing == "connected" and source.backends()[0].stale_since is None
            assert any("sparklines' earlier points were not read" in e.message and "503" in e.message for e in source.events())
            (row,) = source.backends()
            assert row.ttft_history == ((api.now - 1, pytest.approx(150.0)),)  # from now on, as the table reads them
            ranges = api.paths.count("/api/v1/query_range")
            api.now += 5
            assert (await source.refresh()).standing == "connected"
            assert api.paths.count("/api/v1/query_range") == ranges  # not again until the next gap
        finally:
            await source.stop()


async def test_a_slow_backfill_gives_up_within_two_refreshes_and_is_not_a_gap_of_its_own():
    # The table's next refresh waits for the backfill: it is bounded (here the 1 s floor), and
    # the time it took is not read as refreshes missed, which asked for the range every refresh.
    async with FakeApi() as api:
        api.backend("a")
        api.hold_ranges = asyncio.Event()  # never answered
        api.range_takes_s = 12.0  # as if the held answers took 12 s of the source's clock
        source = clocked(api, refresh_s=0.2)
        try:
            assert (await source.refresh()).standing == "connected"
            assert any("took longer than 1 s" in e.message for e in source.events())
            asked = api.paths.count("/api/v1/query_range")
            api.now += 5  # the next refresh, 5 s after the backfill ended (17 s after the last refresh began)
            assert (await source.refresh()).standing == "connected"
            assert api.paths.count("/api/v1/query_range") == asked
        finally:
            api.hold_ranges.set()
            await source.stop()


async def test_without_sparklines_no_history_is_fetched_nor_kept():
    # What `check --prometheus` reads (cli._agents): the table alone.
    async with FakeApi() as api:
        api.backend("a")
        api.series["history:llmtop_probe_last_ttft_seconds"] = [{"metric": {"instance": "agent-1:9850", "backend": "a"}, "values": [[api.now - 5, "0.1"]]}]
        source = clocked(api, sparklines=False)
        try:
            await source.refresh()
            (row,) = source.backends()
            assert row.probe is not None and row.ttft_history == () and row.latency_history == ()
            assert api.paths and all(path.endswith("/query") for path in api.paths)
        finally:
            await source.stop()


def test_check_reads_prometheus_without_sparklines():
    args = argparse.Namespace(connect=None, prometheus="http://127.0.0.1:9", selector=None)
    (source,) = cli._agents(args, Config())
    assert source.sparklines is False
    (screen,) = remote_sources(args, Config())
    assert screen.sparklines is True


async def test_started_it_refreshes_by_itself_and_stop_ends_it():
    async with FakeApi() as api:
        api.backend("a")
        source = PrometheusSource(api.url, refresh_s=0.1, clock=lambda: api.now)
        await source.start()
        try:
            async def refreshed_twice() -> bool:
                return len(api.headers) >= 2 * len(source._queries.instant) and source.state().standing == "connected"

            await until(refreshed_twice, "two refreshes")
        finally:
            await source.stop()
        assert source._task is None


# -- no answer makes the parser raise anything but its own error -----------------------------------------


@PROPERTY
@given(JSON)
def test_any_json_is_an_answer_or_a_prometheus_error(doc):
    body = json.dumps(doc, allow_nan=True)
    for result_type in ("vector", "matrix"):
        try:
            parse_answer(body, result_type)
        except PrometheusError as exc:
            assert "\n" not in str(exc)


LEAF = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8)
VALUE = st.sampled_from(["1", "1", "0", "NaN", "+Inf", "-Inf", "-1", "1e400", "1e306", "0.25", "1799999990", "2.5", "x" * 100,
                         1, 0.5, True, None, float("nan"), 10**400, [], {}]) | LEAF
SAMPLE = st.tuples(st.just(1.8e9) | st.floats(allow_nan=True, allow_infinity=True) | st.integers(), VALUE) | st.lists(LEAF, max_size=3)
LABEL = st.sampled_from(["provider", "model", "rule", "llmtop_backend_status", "team", "agent"])
LABEL_VALUE = st.sampled_from(["", "healthy", "down", "draining", "half_open", "open", "disabled", "m1", "r1"]) | LEAF
# Mostly series of backends "a" and "b" (so that rows are made and every field is read), some of anything.
IDENT = st.fixed_dictionaries({"backend": st.sampled_from(["a", "b"])}, optional={"instance": st.sampled_from(["i1", "i2"])})
METRIC = st.builds(lambda extra, ident: {**extra, **ident}, st.dictionaries(LABEL, LABEL_VALUE, max_size=4), IDENT) | JSON


def series(label=None, values=VALUE):
    """Series of backends "a" and "b" as an answer has them: the family's own label where it has
    one, other labels of any kind, any value (a well-formed answer of hostile content; hostile
    shapes are test_any_json_is_an_answer_or_a_prometheus_error's)."""
    own = st.just({}) if label is None else st.builds(lambda v: {label: v}, LABEL_VALUE)
    metric = st.builds(lambda extra, o, ident: {**extra, **o, **ident}, st.dictionaries(LABEL, LABEL_VALUE, max_size=2), own, IDENT)
    sample = st.tuples(st.sampled_from([1.8e9, 1.8e9, 1.8e9, float("nan"), -1, 1e300, "1.8e9"]), values) | st.lists(LEAF, max_size=3)
    return st.lists(st.fixed_dictionaries({"metric": metric, "value": sample}), max_size=4)


FAMILIES = {
    **{family: series() for family in GAUGES},
    **{family: series(family, st.just("1") | VALUE) for family in STATESETS},
    **{family: series(label) for family, label in LISTS.items()},
}


@settings(PROPERTY, max_examples=60)  # each example draws some 40 families: 150 took 13 s of a 2-core suite
@given(st.data())
def test_any_series_make_rows_with_finite_figures_only(data):
    backends = data.draw(st.lists(IDENT, min_size=1, max_size=3))
    seen = [{"metric": {**ident, "provider": "vllm"}, "value": [1.8e9, data.draw(st.just("1799999990") | VALUE)]} for ident in backends]
    # Every family of every backend, each with any value, and then series of any kind besides.
    every = {family: [{"metric": {**ident, family: data.draw(st.sampled_from((*allowed, "bogus")) | LABEL_VALUE)} if family in STATESETS else ident,
                       "value": [1.8e9, data.draw(VALUE)]} for ident in backends]
             for family, allowed in {**{g: () for g in GAUGES}, **STATESETS}.items()}

    def answer(result):
        body = json.dumps({"status": "success", "data": {"resultType": "vector", "result": result}}, allow_nan=True)
        return parse_answer(body, "vector")

    families = {family: answer(every.get(family, []) + data.draw(strategy)) for family, strategy in FAMILIES.items()}
    answers = (answer(seen), families)
    for row in assemble(*answers).values():
        b = snapshot_of(row, None)
        assert finite_everywhere(b.to_json(1.8e9)) and json.dumps(b.to_json(1.8e9), allow_nan=False)
        assert b.models is not None or b.missing_models == ()
        assert all(isinstance(v, float) and math.isfinite(v) for v in (b.latency_ms, b.probe and b.probe.ttft_ms) if v is not None)
        assert len(b.name) <= NAME_MAX

