"""Splitting a check over worker processes: how many, and what a failing worker looks like."""

from __future__ import annotations

import os

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
