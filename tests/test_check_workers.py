"""Splitting a check over worker processes: how many, and what a failing worker looks like."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmtop import check
from llmtop.config import BackendConfig, Config
from llmtop.state import StateStore


def test_worker_count_follows_cores_and_fleet_size(monkeypatch):
    monkeypatch.setattr(check, "usable_cores", lambda: 4)
    assert check.worker_count(11) == 1  # the demo fleet: one loop is plenty
    assert check.worker_count(check.BACKENDS_PER_WORKER + 1) == 2
    assert check.worker_count(500) == 4  # never more than the cores
    assert check.worker_count(500, requested=1) == 1
    assert check.worker_count(3, requested=8) == 3  # never more than the backends


def fleet(n: int) -> Config:
    # Port 9 on loopback refuses at once, so a worker that does run finishes fast.
    return Config(backends=tuple(BackendConfig(f"b{i}", "vllm", "http://127.0.0.1:9", ("m",)) for i in range(n)))


def test_a_worker_that_raises_is_one_clear_error(monkeypatch, tmp_path):
    async def broken(*args, **kwargs):
        raise ValueError("boom")

    monkeypatch.setattr(check, "run_check", broken)  # inherited by the forked workers
    with pytest.raises(check.CheckWorkerError, match=r"check worker llmtop-check-\d failed: ValueError: boom"):
        check.check_fleet(fleet(4), StateStore(tmp_path / "s.json"), workers=2)


def test_a_worker_that_dies_is_named_with_how(monkeypatch, tmp_path):
    async def dies(*args, **kwargs):
        os._exit(3)

    monkeypatch.setattr(check, "run_check", dies)
    with pytest.raises(check.CheckWorkerError, match="exited with code 3 before reporting; try --workers 1"):
        check.check_fleet(fleet(4), StateStore(tmp_path / "s.json"), workers=2)


def test_refused_backends_come_back_down_from_every_worker(tmp_path):
    snap = check.check_fleet(fleet(5), StateStore(tmp_path / "s.json"), workers=2)
    assert [b.name for b in snap.backends] == ["b0", "b1", "b2", "b3", "b4"]
    assert all(b.status == "down" and "connection refused" in (b.error or "") for b in snap.backends)


def test_each_worker_gets_its_share_of_the_concurrency_caps(monkeypatch, tmp_path):
    out = tmp_path / "seen"
    real = check.run_check

    async def record(config, *args, **kwargs):
        s = config.settings
        with open(out, "a") as f:  # the workers are other processes: they report through a file
            f.write(f"{s.max_concurrency} {s.probe_concurrency} {len(config.backends)}\n")
        return await real(config, *args, **kwargs)

    monkeypatch.setattr(check, "run_check", record)
    base = fleet(6)
    config = Config(settings=dataclasses.replace(base.settings, max_concurrency=10, probe_concurrency=3), backends=base.backends)
    check.check_fleet(config, StateStore(tmp_path / "s.json"), workers=2)
    assert sorted(out.read_text().splitlines()) == ["5 2 3", "5 2 3"]


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc to find the workers")
def test_workers_stop_when_their_parent_is_killed(tmp_path):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(100)  # accepts into the backlog and never answers: every request hangs
    port = silent.getsockname()[1]
    script = tmp_path / "parent.py"
    script.write_text(
        "from llmtop import check\n"
        "from llmtop.config import BackendConfig, Config, Settings\n"
        "from llmtop.state import StateStore\n"
        f"backends = tuple(BackendConfig(f'b{{i}}', 'vllm', 'http://127.0.0.1:{port}', ('m',)) for i in range(4))\n"
        "config = Config(settings=Settings(timeout_s=60), backends=backends)\n"
        f"check.check_fleet(config, StateStore({str(tmp_path / 's.json')!r}), workers=2)\n"
    )
    parent = subprocess.Popen([sys.executable, str(script)])
    try:
        workers: list[int] = []
        deadline = time.monotonic() + 20
        while len(workers) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
            workers = [int(c) for task in Path(f"/proc/{parent.pid}/task").iterdir() for c in (task / "children").read_text().split()]
        assert len(workers) == 2
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{w}").exists() and "Z" not in _state(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [w for w in workers if Path(f"/proc/{w}").exists() and "Z" not in _state(w)]
    finally:
        parent.kill()
        silent.close()


def _state(pid: int) -> str:
    try:
        return next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("State:"))
    except (OSError, StopIteration):
        return "Z"
