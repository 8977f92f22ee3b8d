"""`llmtop check`: N rounds over the fleet, then a table or JSON, and an exit code for scripts."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import multiprocessing
import multiprocessing.connection
import os
import sys
import threading
import time

from llmtop.config import Config
from llmtop.engine import Engine
from llmtop.owners import Owners, local_ports
from llmtop.snapshot import BackendSnapshot, FleetSnapshot, GpuStatus, TerminalView
from llmtop.state import StateStore

# Backends one event loop checks before another core is worth a process. One loop's CPU, not the
# network, bounds a big check: every request costs ~0.3 ms of Python, and a probe's TTFT is only
# true while the loop reading it is punctual (benchmarks/bench_check_fleet.py).
BACKENDS_PER_WORKER = 128


class CheckWorkerError(Exception):
    """A check worker process failed; phrased for the operator."""


async def run_check(config: Config, state: StateStore, rounds: int = 1, interval_s: float = 0.0, gpu=None) -> FleetSnapshot:
    async with Engine(config, state, gpu=gpu) as engine:
        for i in range(rounds):
            if i:
                await asyncio.sleep(interval_s)
            await engine.run_round()
        engine.replan()
        return engine.snapshot()


def usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)  # pragma: no cover - macOS, Windows


def worker_count(backends: int, requested: int | None = None) -> int:
    """Processes for a check: what was asked for, else one per core the fleet can keep busy."""
    if requested is not None:
        return max(1, min(requested, backends))
    return max(1, min(usable_cores(), -(-backends // BACKENDS_PER_WORKER)))


def check_fleet(
    config: Config, state: StateStore, rounds: int = 1, interval_s: float = 0.0, gpu=None, workers: int | None = None
) -> FleetSnapshot:
    """A check in this process, or split over worker processes, one event loop each
    (`workers`: how many; None picks by cores and fleet size, worker_count)."""
    workers = worker_count(len(config.backends), workers)
    if workers == 1:
        return asyncio.run(run_check(config, state, rounds, interval_s, gpu))
    # fork where there is one: the child starts with every import done, in milliseconds.
    ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    # The concurrency caps are the fleet's: each worker gets its share.
    settings = dataclasses.replace(
        config.settings,
        max_concurrency=-(-config.settings.max_concurrency // workers),
        probe_concurrency=-(-config.settings.probe_concurrency // workers),
    )
    # So is the fleet's probe budget: each worker plans its share, and the shares add up to it.
    cap = config.budget.tokens_per_hour
    shared_budget = config.budget if cap is None else dataclasses.replace(config.budget, tokens_per_hour=cap / workers)
    shards = []
    for i in range(workers):
        # Interleaved, so a run of slow backends in the config is spread over the workers too.
        sub = dataclasses.replace(config, settings=settings, budget=shared_budget, backends=config.backends[i::workers])
        receive, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(
            target=_worker, args=(send, sub, state, rounds, interval_s), name=f"llmtop-check-{i}", daemon=True
        )
        proc.start()
        send.close()
        shards.append((proc, receive))
    try:
        gpu_status = gpu.read_within() if gpu is not None else GpuStatus(message="GPU not read")
        ports = local_ports((b.name, b.url) for b in config.backends)
        if ports and gpu_status.gpus:
            gpu_status = Owners().label(gpu_status, ports)
        parts = [_result(proc, receive) for proc, receive in shards]
    finally:
        for proc, _ in shards:
            if proc.is_alive():
                proc.terminate()
            proc.join()
    by_name = {b.name: b for part in parts for b in part.backends}
    events = sorted((e for part in parts for e in part.events), key=lambda e: e.at)[-500:]
    return FleetSnapshot(
        at=max(part.at for part in parts),
        backends=tuple(by_name[b.name] for b in config.backends),
        gpu=gpu_status,
        events=tuple(events),
        config_path=parts[0].config_path,
        config_error=parts[0].config_error,
        budget_tokens_per_hour=config.budget.tokens_per_hour,
    )


def _worker(send, config: Config, state: StateStore, rounds: int, interval_s: float) -> None:
    _exit_with_parent()
    try:
        result = asyncio.run(run_check(config, state, rounds, interval_s))
    except BaseException as exc:  # noqa: BLE001 - reported by the parent, as one line
        result = CheckWorkerError(f"{type(exc).__name__}: {exc}")
    send.send(result)
    send.close()


def _exit_with_parent() -> None:
    """A worker whose parent died (SIGKILL, the OOM killer) stops too, rather than checking on
    for nobody, or blocking forever on a result pipe no one reads."""
    parent = multiprocessing.parent_process()
    if parent is None:  # pragma: no cover - always set in a multiprocessing child
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="llmtop-parent-watch", daemon=True).start()


def _result(proc, receive) -> FleetSnapshot:
    try:
        result = receive.recv()
    except EOFError:
        proc.join()
        code = proc.exitcode
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
        raise CheckWorkerError(f"check worker {proc.name} {how} before reporting; try --workers 1") from None
    if isinstance(result, CheckWorkerError):
        raise CheckWorkerError(f"check worker {proc.name} failed: {result}")
    return result


def exit_code(snapshot: FleetSnapshot) -> int:
    """0 when every active backend is healthy, else 1. A fleet with no active backend at all
    (every one drained or disabled) is 1: nothing is serving, whatever the reason."""
    active = [b for b in snapshot.backends if b.admin == "active" and b.probe_mode != "off"]  # off: not watched, by choice
    return 0 if active and all(b.status == "healthy" and b.stale_since is None for b in active) else 1


def to_json(snapshot: FleetSnapshot, agents=()) -> str:
    """Strict JSON (no NaN or Infinity tokens, which many parsers refuse) with the exact texts;
    with remote agents, how each stands (every backend names its `agent`)."""
    doc = snapshot.to_json()
    if agents:
        doc["agents"] = [
            {"name": s.name, "url": s.url, "standing": s.standing, "detail": s.detail, "backends": s.backends}
            for s in (a.state() for a in agents)
        ]
    return json.dumps(doc, indent=2, allow_nan=False)


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _row(b: BackendSnapshot, now: float) -> list[str]:
    current = b.figures_current(now)
    p = b.probe if current else b.last_ok_probe
    m = b.metrics
    ttft = tps = "-"
    if p is not None and p.ttft_ms is not None:
        ttft = f"{p.ttft_ms:.1f}"
        if p.tokens_per_s is not None:
            tps = f"{p.tokens_per_s:.1f}" + ("~" if p.tokens_estimated else "")
        if not current:  # the last good figures, from before the backend's present state
            ttft, tps = f"({ttft})", f"({tps})" if tps != "-" else tps
    kv = "-" if m is None or m.kv_cache_usage is None else f"{m.kv_cache_usage:.0%}"
    queue = "-" if m is None or m.requests_waiting is None else f"{m.requests_waiting:g}"
    status = b.status.upper() if b.admin == "active" else b.admin.upper()
    return [
        "STALE" if b.stale_since is not None else status,
        b.name,
        b.provider,
        b.circuit.replace("_", "-"),
        _num(b.latency_ms, ".1f"),
        ttft,
        tps,
        queue,
        kv,
        b.models_summary(),
    ]


HEADERS = ["STATUS", "NAME", "PROVIDER", "CIRCUIT", "LAT ms", "TTFT ms", "TOK/s", "QUEUE", "KV", "MODELS"]


def render_table(snapshot: FleetSnapshot) -> str:
    """The table for a terminal: every text from a backend or the config made safe to print first."""
    snapshot = TerminalView()(snapshot)
    now = snapshot.at
    headers, rows = HEADERS, [_row(b, now) for b in snapshot.backends]
    right = {4, 5, 6, 7, 8, 9}
    if any(b.agent is not None for b in snapshot.backends):  # whose each row is, after its name
        headers = [*HEADERS[:2], "AGENT", *HEADERS[2:]]
        rows = [[*r[:2], b.agent or "local", *r[2:]] for r, b in zip(rows, snapshot.backends)]
        right = {i + 1 for i in right}
    rows = [headers] + rows
    widths = [max(len(r[i]) for r in rows) for i in range(len(headers))]
    lines = []
    for row in rows:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    notes = []
    for b in snapshot.backends:
        why = b.status_reason if b.status not in ("healthy",) else b.probe_note
        if b.stale_since is not None:
            why = f"stale since {time.strftime('%H:%M:%S', time.localtime(b.stale_since))}: its agent {b.agent} was lost; figures are as they were then"
        elif b.admin != "active":
            why = f"{b.admin} by the operator"
        elif b.retry_after_at is not None:
            why = f"{why}; until {time.strftime('%H:%M:%S', time.localtime(b.retry_after_at))}"
        if why:
            notes.append(f"  {b.name}: {why}")
    if snapshot.backends and all(b.admin != "active" for b in snapshot.backends):
        notes.append("  no backend is active: every one is drained or disabled, so nothing serves (exit 1)")
    if notes:
        lines.append("")
        lines.extend(notes)
    legend = []
    if any(b.probe and b.probe.tokens_estimated and b.probe.tokens_per_s for b in snapshot.backends):
        legend.append("  ~ token count estimated from stream chunks (the server sent no usage)")
    if any(b.last_ok_probe is not None and not b.figures_current(now) for b in snapshot.backends):
        legend.append("  (…) the last figures measured, older than the backend's present state")
    if legend:
        lines.append("")
        lines.extend(legend)
    gpu = snapshot.gpu
    lines.append("")
    if gpu.gpus:
        for g in gpu.gpus:
            if g.problem is not None:
                lines.append(f"GPU {g.index}: {g.problem}")
                continue
            lines.append(
                f"GPU {g.index} {g.name}: util {_num(g.utilization_pct, '.0f')}%  mem {_num(g.memory_used_mib, '.0f')}/"
                f"{_num(g.memory_total_mib, '.0f')} MiB  {_num(g.temperature_c, '.0f')}°C  {_num(g.power_w, '.0f')} W"
            )
            lines.extend(_process_lines(g.processes, "  "))
            for m in g.mig:
                lines.append(f"  MIG {m.gpu_instance_id}/{m.compute_instance_id} {m.name}: mem {_num(m.memory_used_mib, '.0f')}/{_num(m.memory_total_mib, '.0f')} MiB")
                lines.extend(_process_lines(m.processes, "    "))
    else:
        lines.append(gpu.message or "no NVIDIA GPU")
    return "\n".join(lines)


def _process_lines(processes, indent: str) -> list[str]:
    """A GPU's processes, the backend each serves first where known: "gpu1-vllm: pid 4242 python3 -m vllm..., 61440 MiB"."""
    return [
        f"{indent}{p.backend + ': ' if p.backend else ''}pid {p.pid} {p.name}, {_num(p.used_memory_mib, '.0f')} MiB"
        for p in processes
    ]
