"""The shipped integrations (contrib/), each run against the real thing: promtool, HAProxy's config
check, a real Prometheus scraping llmtop serve and firing the shipped rules, every dashboard query."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
from pathlib import Path

import httpx
import pytest
import loopback
from real import needs

from llmtop.config import BackendConfig, Config, Settings
from llmtop.engine import Engine
from llmtop.serve.http import ServeSite
from llmtop.simulator import SimBackend, Simulator
from llmtop.state import StateStore

CONTRIB = Path(__file__).resolve().parent.parent / "contrib"
needs_promtool = needs("promtool")
needs_prometheus = needs("prometheus")


@needs_promtool
def test_the_alert_rules_check_and_pass_their_unit_tests():
    rules = CONTRIB / "prometheus"
    check = subprocess.run(["promtool", "check", "rules", "llmtop-alerts.yml"], cwd=rules, capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and "SUCCESS: 6 rules found" in check.stdout, check.stdout + check.stderr
    test = subprocess.run(["promtool", "test", "rules", "llmtop-alerts.test.yml"], cwd=rules, capture_output=True, text=True, timeout=60)
    assert test.returncode == 0 and "SUCCESS" in test.stdout, test.stdout + test.stderr


@needs("haproxy")
def test_the_haproxy_example_is_a_valid_config():
    r = subprocess.run(["haproxy", "-c", "-f", str(CONTRIB / "haproxy" / "haproxy.cfg")], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr


def dashboard_queries() -> list[str]:
    dashboard = json.loads((CONTRIB / "grafana" / "llmtop-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    # What Grafana substitutes before it asks Prometheus.
    return [e.replace("$backend", ".*").replace("$__rate_interval", "1m") for e in exprs]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_prometheus
async def test_a_real_prometheus_scrapes_serve_and_fires_the_shipped_rules(tmp_path):
    backends = [SimBackend("ok", "vllm"), SimBackend("dead", "vllm", fault="reset"), SimBackend("partial", "vllm")]
    rules = (CONTRIB / "prometheus" / "llmtop-alerts.yml").read_text()
    # The shipped expressions, with their `for:` cut to a second: the durations themselves are
    # what promtool's unit tests check; here the question is whether the expressions fire on what
    # llmtop really exports.
    (tmp_path / "rules.yml").write_text(re.sub(r"for: \d+m", "for: 1s", rules))
    async with Simulator(backends) as sim:
        config = Config(
            # 5 s: on a loaded machine the healthy backend must not time out and read as down (the dead one resets at once).
            settings=Settings(timeout_s=5.0, health_interval_s=0.5, probe_interval_s=3600),
            backends=tuple(
                BackendConfig(b.name, "vllm", sim.url(b.name), ("meta-llama/Llama-3.1-8B-Instruct",) + (("not-served",) if b.name == "partial" else ()))
                for b in backends
            ),
        )
        engine = Engine(config, StateStore(tmp_path / "state.json"))
        await engine.open()
        engine.start()
        site = ServeSite(engine, "127.0.0.1:0")
        await site.start()
        port = free_port()
        (tmp_path / "prometheus.yml").write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            f"rule_files: [{tmp_path / 'rules.yml'}]\n"
            f"scrape_configs:\n  - job_name: llmtop\n    static_configs: [{{targets: ['127.0.0.1:{site.port}']}}]\n"
        )
        prometheus = subprocess.Popen(
            ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        try:
            async with loopback.AsyncClient(base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=10) as prom:

                async def query(expr: str) -> list:
                    r = (await prom.get("/api/v1/query", params={"query": expr})).json()
                    assert r["status"] == "success", (expr, r)
                    return r["data"]["result"]

                async def value(expr: str) -> float | None:
                    result = await query(expr)
                    return float(result[0]["value"][1]) if result else None

                async def until(condition, what, timeout=40.0):
                    deadline = asyncio.get_running_loop().time() + timeout
                    while not await condition():
                        assert prometheus.poll() is None, prometheus.stderr.read().decode()
                        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
                        await asyncio.sleep(0.25)

                async def ready() -> bool:
                    try:
                        return (await prom.get("/-/ready")).status_code == 200
                    except httpx.HTTPError:
                        return False

                async def scraped() -> bool:
                    return await value('llmtop_backend_up{backend="dead"}') is not None

                await until(ready, "Prometheus to start")  # on a loaded machine it answers 503 text meanwhile
                await until(scraped, "the first scrape")  # Prometheus waits ~5 s before its first
                assert await value('llmtop_backend_up{backend="dead"}') == 0
                assert await value('llmtop_backend_up{backend="ok"}') == 1
                assert await value('llmtop_backend_model_missing{backend="partial", model="not-served"}') == 1
                assert await value('llmtop_backend_model_missing{backend="ok", model="meta-llama/Llama-3.1-8B-Instruct"}') == 0

                async def firing(alert: str, backend: str):
                    return bool(await query(f'ALERTS{{alertname="{alert}", alertstate="firing", backend="{backend}"}}'))

                await until(lambda: firing("LlmtopBackendDown", "dead"), "LlmtopBackendDown for the dead backend")
                await until(lambda: firing("LlmtopModelMissing", "partial"), "LlmtopModelMissing")
                assert not await firing("LlmtopBackendDown", "ok")
                for expr in dashboard_queries():  # every panel's query runs without an error
                    await query(expr)
        finally:
            prometheus.terminate()
            prometheus.wait(10)
            await site.stop()
            await engine.close()


async def test_the_kubernetes_sidecars_readiness_probe_is_what_serve_answers(tmp_path):
    manifest = (CONTRIB / "kubernetes" / "llmtop-sidecar.yaml").read_text()
    path = re.search(r"readinessProbe:\s*\n\s*httpGet: \{path: (\S+), port: (\d+)\}", manifest)
    assert path and re.search(rf'listen = "0\.0\.0\.0:{path.group(2)}"', manifest)
    backend = re.search(r'name = "(\w+)"\s*\n\s*provider = "vllm"', manifest).group(1)
    assert path.group(1) == f"/backends/{backend}/ready"
    sb = SimBackend(backend, "vllm")
    async with Simulator([sb]) as sim:
        engine = Engine(Config(backends=(BackendConfig(backend, "vllm", sim.url(backend), tuple(sb.models)),)), StateStore(tmp_path / "s.json"))
        async with engine:
            await engine.run_round()
            site = ServeSite(engine, "127.0.0.1:0")
            await site.start()
            try:
                async with loopback.AsyncClient(trust_env=False) as client:
                    r = await client.get(f"http://127.0.0.1:{site.port}{path.group(1)}")
            finally:
                await site.stop()
    assert r.status_code == 200 and r.text == "ready\n"
