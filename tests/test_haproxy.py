"""Drain that moves real traffic: a real HAProxy balancing two simulator backends, told by llmtop serve
(agent-check, or http-check against /backends/NAME/ready) which ones should take requests."""

from __future__ import annotations

import asyncio
import socket
import subprocess
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import loopback
from real import needs

from llmtop.config import BackendConfig, BreakerSettings, Config, Settings
from llmtop.engine import Engine
from llmtop.follow import Follower
from llmtop.serve.agent import AgentServer
from llmtop.serve.http import ServeSite
from llmtop.simulator import SimBackend, Simulator
from llmtop.state import StateStore

pytestmark = needs("haproxy")
AGENT_INTER_MS = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def haproxy_cfg(tmp: Path, front: int, servers: dict[str, int], check: str) -> Path:
    lines = [
        "global",
        f"    stats socket {tmp / 'admin.sock'} mode 600 level admin",
        "defaults",
        "    mode http",
        "    timeout connect 1s",
        "    timeout client 5s",
        "    timeout server 5s",
        "    timeout check 5s",  # a readiness answer late on a loaded core is not a down backend
        "frontend fe",
        f"    bind 127.0.0.1:{front}",
        "    default_backend llm",
        "backend llm",
        "    balance roundrobin",
    ]
    lines += check_lines(check)
    for name, port in servers.items():
        lines.append(f"    server {name} 127.0.0.1:{port} weight 100 " + server_check(check, name))
    path = tmp / "haproxy.cfg"
    path.write_text("\n".join(lines) + "\n")
    return path


def check_lines(check: str) -> list[str]:
    if check.startswith("http:"):
        # The same readiness endpoint for every server, named by HAProxy itself (%[srv_name]),
        # asked of llmtop rather than of the server (addr/port on each server line).
        return [
            "    option httpchk",
            "    http-check send meth GET uri-lf /backends/%[srv_name]/ready ver HTTP/1.1 hdr Host llmtop",
            "    http-check expect status 200",
            f"    default-server inter {AGENT_INTER_MS}ms fall 2 rise 1",  # one late check takes nobody out
        ]
    return []


def server_check(check: str, name: str) -> str:
    kind, _, port = check.partition(":")
    if kind == "agent":
        return f'agent-check agent-addr 127.0.0.1 agent-port {port} agent-inter {AGENT_INTER_MS}ms agent-send "{name}\\n"'
    return f"check addr 127.0.0.1 port {port}"


def started_state(sock: Path) -> dict[str, tuple[int, int]] | None:
    """servers_state once HAProxy's runtime API answers; None before (the socket's file appears
    when HAProxy binds it, and a connection is refused until it listens)."""
    try:
        return servers_state(sock)
    except (FileNotFoundError, ConnectionRefusedError):
        return None


def servers_state(sock: Path) -> dict[str, tuple[int, int]]:
    """{server: (operational state, admin state bits)} from HAProxy's runtime API."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(sock))
        s.sendall(b"show servers state llm\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    out = {}
    for line in data.decode().splitlines()[2:]:
        fields = line.split()
        if len(fields) > 7:
            out[fields[3]] = (int(fields[5]), int(fields[6]))
    return out


@asynccontextmanager
async def balanced(tmp_path: Path, check_kind: str):
    """Two simulators (A and B, each serving the same path), an llmtop engine watching them with
    serve's HTTP site and agent port, and HAProxy in front."""
    a, b = SimBackend("m", "vllm", ttft_ms=5, gap_ms=1), SimBackend("m", "vllm", ttft_ms=5, gap_ms=1)
    async with Simulator([a]) as sim_a, Simulator([b]) as sim_b:
        state = StateStore(tmp_path / "state.json")
        config = Config(
            settings=Settings(timeout_s=5.0, health_interval_s=0.3, probe_interval_s=3600),  # no healthy backend times out on a loaded core
            breaker=BreakerSettings(cooldown_s=0.5, max_cooldown_s=1.0),  # a recovery is seen in a second, not 30
            backends=(BackendConfig("A", "vllm", sim_a.url("m"), tuple(a.models)), BackendConfig("B", "vllm", sim_b.url("m"), tuple(b.models))),
        )
        engine = Engine(config, state)
        await engine.open()
        engine.start()
        site, agent = ServeSite(engine, "127.0.0.1:0"), AgentServer(engine, "127.0.0.1:0")
        await site.start()
        await agent.start()
        follower = asyncio.create_task(Follower(engine, None).run())  # picks up `llmtop drain` from the state file
        # Both ready before HAProxy starts: it starts its servers up, and two checks answered "not
        # yet probed" (a first round slow on a loaded core) took both out before any traffic.
        await until(lambda: all(b.status == "healthy" for b in engine.snapshot().backends), "both backends polled and probed")
        check = f"agent:{agent.port}" if check_kind == "agent" else f"http:{site.port}"
        front = free_port()
        cfg = haproxy_cfg(tmp_path, front, {"A": sim_a.port, "B": sim_b.port}, check)
        haproxy = subprocess.Popen(["haproxy", "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            await until(lambda: all(v == (2, 0) for v in (started_state(tmp_path / "admin.sock") or {"": None}).values()),
                        "HAProxy up with both servers in service")
            # Traffic goes to /version, which llmtop itself never asks for: its counter is HAProxy's alone.
            yield {"A": a, "B": b}, f"http://127.0.0.1:{front}/m/version", tmp_path / "admin.sock", engine, state
        finally:
            haproxy.terminate()
            haproxy.wait(10)
            follower.cancel()
            await site.stop()
            await agent.stop()
            await engine.close()


async def until(condition, what: str, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def send(url: str, n: int = 100) -> None:
    async with loopback.AsyncClient(trust_env=False, timeout=5) as client:
        for _ in range(n):
            assert (await client.get(url)).status_code == 200


def served(sims) -> dict[str, int]:
    return {name: sim.requests["/version"] for name, sim in sims.items()}


@pytest.mark.parametrize("check_kind", ["agent", "http"])
async def test_a_drain_from_the_cli_moves_all_new_requests_to_the_other_backend(tmp_path, check_kind):
    async with balanced(tmp_path, check_kind) as (sims, url, sock, engine, state):
        before = served(sims)
        for _ in range(50):  # both take traffic (a check answered late on a loaded core may take one out for a moment)
            await send(url, 10)
            if all(served(sims)[n] > before[n] for n in sims):
                break
        assert all(served(sims)[n] > before[n] for n in sims), served(sims)
        StateStore(state.path).set_admin("A", "draining")  # `llmtop drain A`, another process
        # Drained (agent) or down (http-check) in HAProxy's own state: no guessing at timing.
        await until(lambda: servers_state(sock)["A"] != (2, 0), "HAProxy to take A out")
        before = served(sims)
        await send(url, 100)
        after = served(sims)
        assert (after["A"] - before["A"], after["B"] - before["B"]) == (0, 100)  # every one of the 100 landed on B
        StateStore(state.path).set_admin("A", "active")  # `llmtop undrain A`
        await until(lambda: servers_state(sock)["A"] == (2, 0), "HAProxy to put A back")
        before = served(sims)
        await send(url, 20)
        assert all(served(sims)[n] > before[n] for n in sims)


async def test_a_dead_backend_is_taken_out_through_llmtop(tmp_path):
    async with balanced(tmp_path, "agent") as (sims, url, sock, engine, state):
        sims["A"].fault = "5xx"  # llmtop sees it fail (HAProxy runs no check of its own on it)
        await until(lambda: servers_state(sock)["A"][0] == 0, "HAProxy to mark A down", timeout=30)
        before = served(sims)
        async with loopback.AsyncClient(trust_env=False, timeout=5) as client:
            for _ in range(50):
                assert (await client.get(url)).status_code == 200  # B answers every one
        assert served(sims)["A"] == before["A"]
        sims["A"].fault = None
        await until(lambda: servers_state(sock)["A"] == (2, 0), "A back in service", timeout=30)


async def test_a_d_in_the_live_screen_started_with_listen_moves_real_traffic(tmp_path):
    from llmtop.tui.app import LlmtopApp
    from llmtop.tui.widgets.fleet_table import FleetTable

    a, b = SimBackend("m", "vllm", ttft_ms=5, gap_ms=1), SimBackend("m", "vllm", ttft_ms=5, gap_ms=1)
    async with Simulator([a]) as sim_a, Simulator([b]) as sim_b:
        config = Config(
            settings=Settings(timeout_s=5.0, health_interval_s=0.3, probe_interval_s=3600),  # no healthy backend times out on a loaded core
            backends=(BackendConfig("A", "vllm", sim_a.url("m"), tuple(a.models)), BackendConfig("B", "vllm", sim_b.url("m"), tuple(b.models))),
        )
        agent_port, front = free_port(), free_port()
        app = LlmtopApp(Engine(config, StateStore(tmp_path / "state.json")), config_path=None, agent_listen=f"127.0.0.1:{agent_port}")
        cfg = haproxy_cfg(tmp_path, front, {"A": sim_a.port, "B": sim_b.port}, f"agent:{agent_port}")
        async with app.run_test(size=(120, 40)) as pilot:
            haproxy = subprocess.Popen(["haproxy", "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            sock = tmp_path / "admin.sock"
            try:
                await until(lambda: sock.exists() and all(v == (2, 0) for v in servers_state(sock).values()), "both servers in service")
                table = app.screen.query_one(FleetTable)
                await until(lambda: "A" in table.names, "row A on screen")
                table.move_cursor(row=table.get_row_index("A"))
                await pilot.press("d", "y")
                await until(lambda: servers_state(sock)["A"] != (2, 0), "HAProxy to take A out")
                sims = {"A": a, "B": b}
                before = served(sims)
                await send(f"http://127.0.0.1:{front}/m/version", 100)
                after = served(sims)
                assert (after["A"] - before["A"], after["B"] - before["B"]) == (0, 100)
            finally:
                haproxy.terminate()
                haproxy.wait(10)
            await pilot.press("q")
