"""Real `llmtop serve` agents for the remote tests: each a subprocess over its own simulator fleet, on loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

import loopback
from llmtop.simulator import SimBackend, Simulator

TOKEN_ENV = "LLMTOP_TEST_AGENT_TOKEN"
TOKEN = "agent-token-7f3c2a9e51d04b8c"
MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Agent:
    """One agent: `llmtop serve` watching `names` (all healthy vLLMs unless `faults` says otherwise)."""

    def __init__(self, tmp: Path, label: str, names: tuple[str, ...], faults: dict[str, str] | None = None):
        self.dir = tmp / label
        self.dir.mkdir()
        self.label = label
        self.sim = Simulator([SimBackend(n, "vllm", fault=(faults or {}).get(n)) for n in names]).start_in_thread()
        self.config = self.dir / "fleet.toml"
        self.config.write_text(
            f'[settings]\ntimeout_s = 2\nhealth_interval_s = 0.3\nprobe_interval_s = 3600\n[serve]\nadmin_token_env = "{TOKEN_ENV}"\n'
            + "".join(f'[[backend]]\nname = "{n}"\nprovider = "vllm"\nurl = "{self.sim.url(n)}"\nmodels = ["{MODEL}"]\n' for n in names)
        )
        self.state = self.dir / "state.json"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Agent":
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llmtop", "serve", "--config", str(self.config), "--state", str(self.state), "--listen", f"127.0.0.1:{self.port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, TOKEN_ENV: TOKEN},
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.proc.stderr.read()
            try:
                if loopback.get(f"{self.url}/readyz", timeout=1, trust_env=False).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"agent {self.label} never became ready")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate(timeout=10)

    def close(self) -> None:
        self.kill()
        self.sim.stop_thread()

    def fleet(self) -> dict:
        return loopback.get(f"{self.url}/api/v1/fleet", timeout=10, trust_env=False).json()

    def ready(self, name: str) -> httpx.Response:
        return loopback.get(f"{self.url}/backends/{name}/ready", timeout=10, trust_env=False)
