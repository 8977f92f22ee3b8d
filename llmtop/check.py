"""`llmtop check`: N rounds over the fleet, then a table or JSON, and an exit code for scripts."""

from __future__ import annotations

import asyncio
import json

from llmtop.config import Config
from llmtop.engine import Engine
from llmtop.snapshot import BackendSnapshot, FleetSnapshot
from llmtop.state import StateStore


async def run_check(config: Config, state: StateStore, rounds: int = 1, interval_s: float = 0.0, gpu=None) -> FleetSnapshot:
    async with Engine(config, state, gpu=gpu) as engine:
        for i in range(rounds):
            if i:
                await asyncio.sleep(interval_s)
            await engine.run_round()
        return engine.snapshot()


def exit_code(snapshot: FleetSnapshot) -> int:
    """0 when every active backend is healthy, else 1."""
    active = [b for b in snapshot.backends if b.admin == "active"]
    return 0 if all(b.status == "healthy" for b in active) else 1


def to_json(snapshot: FleetSnapshot) -> str:
    return json.dumps(snapshot.to_json(), indent=2)


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _row(b: BackendSnapshot) -> list[str]:
    p = b.probe
    m = b.metrics
    models = f"{len(b.expected_models) - len(b.missing_models)}/{len(b.expected_models)}" if b.expected_models else str(len(b.models))
    tps = "-"
    if p is not None and p.tokens_per_s is not None:
        tps = f"{p.tokens_per_s:.1f}" + ("~" if p.tokens_estimated else "")
    kv = "-" if m is None or m.kv_cache_usage is None else f"{m.kv_cache_usage:.0%}"
    queue = "-" if m is None or m.requests_waiting is None else f"{m.requests_waiting:g}"
    return [
        b.status.upper() if b.admin == "active" else b.admin.upper(),
        b.name,
        b.provider,
        b.circuit.replace("_", "-"),
        _num(b.latency_ms, ".1f"),
        _num(p.ttft_ms if p else None, ".1f"),
        tps,
        queue,
        kv,
        models,
    ]


HEADERS = ["STATUS", "NAME", "PROVIDER", "CIRCUIT", "LAT ms", "TTFT ms", "TOK/s", "QUEUE", "KV", "MODELS"]


def render_table(snapshot: FleetSnapshot) -> str:
    rows = [HEADERS] + [_row(b) for b in snapshot.backends]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADERS))]
    right = {4, 5, 6, 7, 8, 9}
    lines = []
    for row in rows:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    notes = []
    for b in snapshot.backends:
        why = b.status_reason if b.status not in ("healthy",) else None
        if b.admin != "active":
            why = f"{b.admin} by the operator"
        if why:
            notes.append(f"  {b.name}: {why}")
    if notes:
        lines.append("")
        lines.extend(notes)
    if any(b.probe and b.probe.tokens_estimated and b.probe.tokens_per_s for b in snapshot.backends):
        lines.append("")
        lines.append("  ~ token count estimated from stream chunks (the server sent no usage)")
    gpu = snapshot.gpu
    lines.append("")
    if gpu.gpus:
        for g in gpu.gpus:
            lines.append(
                f"GPU {g.index} {g.name}: util {_num(g.utilization_pct, '.0f')}%  mem {_num(g.memory_used_mib, '.0f')}/"
                f"{_num(g.memory_total_mib, '.0f')} MiB  {_num(g.temperature_c, '.0f')}°C  {_num(g.power_w, '.0f')} W"
            )
    else:
        lines.append(gpu.message or "no NVIDIA GPU")
    return "\n".join(lines)
