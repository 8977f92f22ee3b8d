"""Which configured backend a GPU process serves: the process listening on a local backend's port, or one of its descendants.

vLLM's API server listens and its engine (the process NVML lists) is a child of it; llama.cpp's
server and Ollama's runner are the listener or its child. So a GPU process belongs to the
backend whose port is held by it or by one of its ancestors. Linux only, from /proc: the
listening sockets (/proc/net/tcp, tcp6), their inodes among each process's open files, and
each process's parent. Where any of that cannot be read (another user's process without root,
another PID namespace), no backend is named: unknown stays unknown.

A process's pid must be this machine's (GpuProcess.name_note is None: gpu.py checked that the
pid here maps an NVIDIA device); inside a container NVML reports host pids, and a host pid
matched against the container's /proc would name the wrong backend.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import time
from typing import Callable, Iterable
from urllib.parse import urlsplit

from llmtop.snapshot import GpuProcess, GpuStatus

RESCAN_S = 30.0  # what was found for a pid is kept this long: a server restarted on its port is found again within it
MAX_DEPTH = 64  # ancestors walked from a GPU process (a loop in a broken /proc ends here)
LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp


def local_ports(backends: Iterable[tuple[str, str]]) -> dict[int, tuple[str, ...]]:
    """{port: backend names} for the (name, url) of backends served on this machine."""
    ports: dict[int, tuple[str, ...]] = {}
    for name, url in backends:
        try:
            parts = urlsplit(url)
            port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
        except ValueError:
            continue
        if port is not None and _is_local(parts.hostname or ""):
            ports[port] = ports.get(port, ()) + (name,)
    return ports


def _is_local(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified


class Owners:
    """Names the backend of each GPU process, from /proc.

    Only the GPU processes and their ancestors are looked at (their open files against the
    listening sockets of the backends' ports), never every process on the host: a GPU host with
    thousands of processes costs a few hundred readlinks, not hundreds of thousands. What was
    found for a pid is kept for RESCAN_S, so a steady host costs one look every 30 s."""

    def __init__(self, proc_root: str = "/proc", clock: Callable[[], float] = time.monotonic):
        self._proc = proc_root
        self._clock = clock
        self._found: dict[int, str | None] = {}  # GPU pid -> backend names, as of _found_at
        self._found_for: dict[int, tuple[str, ...]] | None = None
        self._found_at = -RESCAN_S

    def label(self, status: GpuStatus, ports: dict[int, tuple[str, ...]]) -> GpuStatus:
        """status with each process of ours that serves a local backend named (GpuProcess.backend)."""
        pids = {p.pid for g in status.gpus for p in _all_processes(g) if p.name_note is None}
        if not pids or not ports:
            return status
        now = self._clock()
        if ports != self._found_for or now - self._found_at >= RESCAN_S:
            self._found, self._found_for, self._found_at = {}, ports, now
        missing = pids - self._found.keys()
        if missing:
            self._found.update(self._look(missing, ports))
        found = self._found

        def named(processes: tuple[GpuProcess, ...]) -> tuple[GpuProcess, ...]:
            return tuple(
                dataclasses.replace(p, backend=found.get(p.pid)) if p.name_note is None and found.get(p.pid) else p for p in processes
            )

        gpus = tuple(
            dataclasses.replace(g, processes=named(g.processes), mig=tuple(dataclasses.replace(m, processes=named(m.processes)) for m in g.mig))
            for g in status.gpus
        )
        return dataclasses.replace(status, gpus=gpus)

    def _look(self, pids: set[int], ports: dict[int, tuple[str, ...]]) -> dict[int, str | None]:
        """{pid: the backends served} for these GPU pids: the nearest of each one's ancestors
        (itself first) that holds a listening socket of a backend's port."""
        sockets = self._listening(ports)
        out: dict[int, str | None] = {}
        holds: dict[int, tuple[str, ...] | None] = {}  # ancestor pid -> what it listens for
        for pid in pids:
            out[pid] = None
            if not sockets:
                continue
            current = pid
            for _ in range(MAX_DEPTH):
                if current not in holds:
                    holds[current] = self._holds(current, sockets)
                if holds[current] is not None:
                    out[pid] = ", ".join(holds[current])
                    break
                parent = self._parent(current)
                if parent is None or parent <= 1 or parent == current:
                    break
                current = parent
        return out

    def _listening(self, ports: dict[int, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
        """{"socket:[inode]": backend names} of the listening TCP sockets on the backends' ports."""
        inodes: dict[str, tuple[str, ...]] = {}
        for table in ("tcp", "tcp6"):
            try:
                with open(f"{self._proc}/net/{table}") as f:
                    next(f, None)  # the header
                    for line in f:
                        fields = line.split()
                        if len(fields) > 9 and fields[3] == LISTEN:
                            port = int(fields[1].rpartition(":")[2], 16)
                            if port in ports and fields[9] != "0":
                                inodes[f"socket:[{fields[9]}]"] = ports[port]
            except (OSError, ValueError):
                continue
        return inodes

    def _holds(self, pid: int, sockets: dict[str, tuple[str, ...]]) -> tuple[str, ...] | None:
        fd_dir = f"{self._proc}/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:  # gone, or another user's without the privilege to look
            return None
        for fd in fds:
            try:
                names = sockets.get(os.readlink(f"{fd_dir}/{fd}"))
            except OSError:
                continue
            if names is not None:
                return names
        return None

    def _parent(self, pid: int) -> int | None:
        try:
            with open(f"{self._proc}/{pid}/stat", "rb") as f:
                stat = f.read()
            return int(stat[stat.rindex(b")") + 2 :].split()[1])  # after "pid (comm) state"
        except (OSError, ValueError, IndexError):
            return None


def _all_processes(gpu) -> Iterable[GpuProcess]:
    yield from gpu.processes
    for mig in gpu.mig:
        yield from mig.processes
