"""Which backend a GPU process serves, read from this machine's real /proc: a real server process
listening on a backend's port, and its child (vLLM's engine is a child of its API server)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from llmtop.owners import Owners, local_ports
from llmtop.snapshot import GpuProcess, GpuSnapshot, GpuStatus, MigInstance

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

# A server: listens, starts a child (the "engine" that would hold the GPU), says both, waits.
SERVER = r"""
import socket, subprocess, sys
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen()
child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE, close_fds=True)
print(s.getsockname()[1], child.pid, flush=True)
sys.stdin.read()
child.stdin.close(); child.wait()
"""


@pytest.fixture
def server():
    proc = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    port, child = map(int, proc.stdout.readline().split())
    yield proc.pid, port, child
    proc.stdin.close()
    proc.wait(10)


def status(*processes: GpuProcess, mig: tuple[GpuProcess, ...] = ()) -> GpuStatus:
    gpu = GpuSnapshot(
        index=0, name="H100", utilization_pct=50.0, memory_used_mib=1.0, memory_total_mib=2.0, temperature_c=40.0, power_w=100.0,
        power_limit_w=700.0, processes=processes, mig=(MigInstance(1, 0, "1g.10gb", 100.0, 1000.0, processes=mig),) if mig else (),
    )
    return GpuStatus(gpus=(gpu,))


def test_local_ports_are_those_of_backends_on_this_machine():
    ports = local_ports([
        ("a", "http://127.0.0.1:8000/v1"), ("b", "http://localhost:8080"), ("c", "http://10.0.0.5:8000"),
        ("d", "http://[::1]:9000"), ("e", "https://0.0.0.0"), ("f", "http://localhost:8000/other"), ("g", "not a url:x"),
    ])
    assert ports == {8000: ("a", "f"), 8080: ("b",), 9000: ("d",), 443: ("e",)}


def test_a_gpu_process_is_named_by_the_backend_whose_port_its_parent_listens_on(server):
    listener, port, child = server
    ports = local_ports([("gpu1-vllm", f"http://127.0.0.1:{port}/v1"), ("remote", "http://10.0.0.5:8000")])
    labelled = Owners().label(
        status(GpuProcess(child, "python3 -m vllm", 61440.0), GpuProcess(listener, "python3", 512.0), GpuProcess(1, "init", 1.0)),
        ports,
    )
    assert [(p.pid, p.backend) for p in labelled.gpus[0].processes] == [(child, "gpu1-vllm"), (listener, "gpu1-vllm"), (1, None)]


def test_a_pid_that_is_not_this_machines_gpu_process_is_never_named(server):
    """Inside a container NVML gives host pids: gpu.py notes a pid that is not ours, and such a
    pid, even when it happens to be the listener here, names no backend."""
    listener, port, child = server
    ports = local_ports([("gpu1-vllm", f"http://127.0.0.1:{port}")])
    note = "name from NVML; the pid here is another process (a host pid outside this container)"
    labelled = Owners().label(status(GpuProcess(child, "?", 1.0, note), mig=(GpuProcess(child, "vllm", 2.0),)), ports)
    assert labelled.gpus[0].processes[0].backend is None
    assert labelled.gpus[0].mig[0].processes[0].backend == "gpu1-vllm"  # MIG instances' processes too


def test_a_pid_is_looked_at_once_per_interval_and_again_when_the_config_changes(server, monkeypatch):
    listener, port, child = server
    now = [0.0]
    owners = Owners(clock=lambda: now[0])
    looks = []
    look = owners._look
    monkeypatch.setattr(owners, "_look", lambda pids, ports: looks.append((set(pids), ports)) or look(pids, ports))
    other = local_ports([("other", "http://127.0.0.1:1")])  # nobody listens there
    ports = local_ports([("gpu1-vllm", f"http://127.0.0.1:{port}")])
    gpu = status(GpuProcess(child, "vllm", 1.0))
    assert owners.label(gpu, other).gpus[0].processes[0].backend is None
    assert owners.label(gpu, ports).gpus[0].processes[0].backend == "gpu1-vllm"  # a new config: at once
    now[0] = 29.0
    assert owners.label(gpu, ports).gpus[0].processes[0].backend == "gpu1-vllm"  # kept, not looked at again
    now[0] = 31.0
    owners.label(status(GpuProcess(child, "vllm", 1.0), GpuProcess(listener, "api", 1.0)), ports)
    now[0] = 32.0
    owners.label(status(GpuProcess(child, "vllm", 1.0), GpuProcess(listener, "api", 1.0)), ports)
    assert looks == [({child}, other), ({child}, ports), ({child, listener}, ports)]  # a new pid is looked at; a known one is not


def test_only_the_gpu_processes_and_their_ancestors_are_looked_at(server, monkeypatch):
    """Not every process on the host: a big GPU host has thousands."""
    listener, port, child = server
    owners = Owners()
    seen = []
    holds = owners._holds
    monkeypatch.setattr(owners, "_holds", lambda pid, sockets: seen.append(pid) or holds(pid, sockets))
    owners.label(status(GpuProcess(child, "vllm", 1.0)), local_ports([("gpu1-vllm", f"http://127.0.0.1:{port}")]))
    assert seen == [child, listener]  # the child holds no listening socket; its parent does
