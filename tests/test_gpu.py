"""GpuReader against a fake NVML that raises the real pynvml error types, plus the real pynvml here."""

from __future__ import annotations

import asyncio
import ctypes.util
import os
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from types import SimpleNamespace

import pynvml
import pytest

from llmtop.gpu import INIT_RETRY_S, GpuReader
from llmtop.snapshot import GpuProcess, GpuSnapshot, GpuStatus

MIB = 1024 * 1024
GIB = 1024 * MIB
NO_SUCH_PID = 2**22 + 1  # above the largest pid_max Linux allows, so /proc never has it


@dataclass
class FakeGpu:
    name: str | bytes = "NVIDIA H100 80GB HBM3"
    gpu_util: int = 87
    mem_used: int = 40 * GIB
    mem_total: int = 80 * GIB
    temperature: int = 61
    power_mw: int = 312_500
    limit_mw: int = 700_000
    compute: list = field(default_factory=list)
    graphics: list = field(default_factory=list)
    fail: dict[str, int] = field(default_factory=dict)  # NVML function name -> NVML_ERROR_* it raises


class FakeNvml:
    """The slice of pynvml that GpuReader uses; handles are the FakeGpu objects themselves."""

    NVMLError = pynvml.NVMLError
    NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU

    def __init__(self, gpus=(), init_error: int | None = None, process_names=None):
        self.gpus = list(gpus)
        self.init_error = init_error
        self.process_names = process_names or {}
        self.calls: Counter[str] = Counter()
        self.threads: set[int] = set()
        self.count_gate: threading.Event | None = None  # when set, nvmlDeviceGetCount waits on it

    def _call(self, fn: str, gpu: FakeGpu | None = None) -> None:
        self.calls[fn] += 1
        self.threads.add(threading.get_ident())
        if gpu is not None and fn in gpu.fail:
            raise pynvml.NVMLError(gpu.fail[fn])

    def nvmlInit(self):
        self._call("nvmlInit")
        if self.init_error is not None:
            raise pynvml.NVMLError(self.init_error)

    def nvmlShutdown(self):
        self._call("nvmlShutdown")

    def nvmlDeviceGetCount(self):
        self._call("nvmlDeviceGetCount")
        if self.count_gate is not None:
            assert self.count_gate.wait(timeout=5)
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index):
        gpu = self.gpus[index]
        self._call("nvmlDeviceGetHandleByIndex", gpu)
        return gpu

    def nvmlDeviceGetName(self, gpu):
        self._call("nvmlDeviceGetName", gpu)
        return gpu.name

    def nvmlDeviceGetUtilizationRates(self, gpu):
        self._call("nvmlDeviceGetUtilizationRates", gpu)
        return SimpleNamespace(gpu=gpu.gpu_util, memory=gpu.gpu_util // 2)

    def nvmlDeviceGetMemoryInfo(self, gpu):
        self._call("nvmlDeviceGetMemoryInfo", gpu)
        return SimpleNamespace(used=gpu.mem_used, total=gpu.mem_total, free=gpu.mem_total - gpu.mem_used)

    def nvmlDeviceGetTemperature(self, gpu, sensor):
        assert sensor == pynvml.NVML_TEMPERATURE_GPU
        self._call("nvmlDeviceGetTemperature", gpu)
        return gpu.temperature

    def nvmlDeviceGetPowerUsage(self, gpu):
        self._call("nvmlDeviceGetPowerUsage", gpu)
        return gpu.power_mw

    def nvmlDeviceGetEnforcedPowerLimit(self, gpu):
        self._call("nvmlDeviceGetEnforcedPowerLimit", gpu)
        return gpu.limit_mw

    def nvmlDeviceGetComputeRunningProcesses(self, gpu):
        self._call("nvmlDeviceGetComputeRunningProcesses", gpu)
        return gpu.compute

    def nvmlDeviceGetGraphicsRunningProcesses(self, gpu):
        self._call("nvmlDeviceGetGraphicsRunningProcesses", gpu)
        return gpu.graphics

    def nvmlSystemGetProcessName(self, pid):
        self._call("nvmlSystemGetProcessName")
        if pid not in self.process_names:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)
        return self.process_names[pid]


# The real error codes, so `nvml.NVML_ERROR_*` in the reader resolves exactly as with pynvml.
for _name in dir(pynvml):
    if _name.startswith("NVML_ERROR_"):
        setattr(FakeNvml, _name, getattr(pynvml, _name))


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def proc(pid: int, used: int | None) -> SimpleNamespace:
    return SimpleNamespace(pid=pid, usedGpuMemory=used)


def test_two_gpus_read_with_units_converted():
    nvml = FakeNvml(
        [
            FakeGpu(),
            FakeGpu(
                name="NVIDIA A10",
                gpu_util=3,
                mem_used=512 * MIB,
                mem_total=24 * GIB,
                temperature=38,
                power_mw=21_750,
                limit_mw=150_000,
            ),
        ]
    )

    status = GpuReader(nvml=nvml).read()

    assert status == GpuStatus(
        gpus=(
            GpuSnapshot(
                index=0,
                name="NVIDIA H100 80GB HBM3",
                utilization_pct=87.0,
                memory_used_mib=40960.0,
                memory_total_mib=81920.0,
                temperature_c=61.0,
                power_w=312.5,
                power_limit_w=700.0,
            ),
            GpuSnapshot(
                index=1,
                name="NVIDIA A10",
                utilization_pct=3.0,
                memory_used_mib=512.0,
                memory_total_mib=24576.0,
                temperature_c=38.0,
                power_w=21.75,
                power_limit_w=150.0,
            ),
        ),
        message=None,
    )
    assert nvml.calls["nvmlInit"] == 1


def test_bytes_name_from_old_bindings_is_decoded():
    status = GpuReader(nvml=FakeNvml([FakeGpu(name=b"Tesla V100-SXM2-16GB")])).read()

    assert status.gpus[0].name == "Tesla V100-SXM2-16GB"


def test_unsupported_fields_are_none_and_the_gpu_is_kept():
    not_supported = pynvml.NVML_ERROR_NOT_SUPPORTED
    gpu = FakeGpu(
        fail={
            "nvmlDeviceGetPowerUsage": not_supported,
            "nvmlDeviceGetEnforcedPowerLimit": not_supported,
            "nvmlDeviceGetTemperature": not_supported,
        }
    )

    (snap,) = GpuReader(nvml=FakeNvml([gpu])).read().gpus

    assert (snap.power_w, snap.power_limit_w, snap.temperature_c) == (None, None, None)
    assert (snap.name, snap.utilization_pct, snap.memory_used_mib) == ("NVIDIA H100 80GB HBM3", 87.0, 40960.0)


def test_library_not_found_is_calm_and_init_is_retried_only_every_30s():
    clock = FakeClock()
    nvml = FakeNvml([FakeGpu()], init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    reader = GpuReader(nvml=nvml, clock=clock, cache_s=0)  # no cache, so every read() reaches the init logic

    assert reader.read() == GpuStatus(message="no NVIDIA GPU (NVML library not found)")
    clock.now += 5
    assert reader.read().message == "no NVIDIA GPU (NVML library not found)"
    clock.now += INIT_RETRY_S - 5.1
    reader.read()
    assert nvml.calls["nvmlInit"] == 1

    nvml.init_error = None  # the driver got installed meanwhile
    clock.now += 0.1
    status = reader.read()

    assert nvml.calls["nvmlInit"] == 2
    assert [g.name for g in status.gpus] == ["NVIDIA H100 80GB HBM3"]
    assert status.message is None


@pytest.mark.parametrize(
    ("code", "message"),
    [
        (pynvml.NVML_ERROR_DRIVER_NOT_LOADED, "no NVIDIA GPU (driver not loaded)"),
        (pynvml.NVML_ERROR_NO_PERMISSION, "no NVIDIA GPU (Insufficient Permissions)"),
    ],
)
def test_other_init_failures_are_calm(code, message):
    assert GpuReader(nvml=FakeNvml(init_error=code)).read() == GpuStatus(message=message)


def test_missing_package_is_calm(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError

    assert GpuReader().read() == GpuStatus(message="no NVIDIA GPU (nvidia-ml-py not installed)")


@pytest.mark.skipif(ctypes.util.find_library("nvidia-ml") is not None, reason="an NVIDIA driver is installed")
def test_real_pynvml_without_driver_is_calm():
    reader = GpuReader()

    status = reader.read()
    reader.close()

    assert status.gpus == ()
    assert status.message in ("no NVIDIA GPU (NVML library not found)", "no NVIDIA GPU (driver not loaded)")


def test_zero_devices_is_calm():
    assert GpuReader(nvml=FakeNvml([])).read() == GpuStatus(message="no NVIDIA GPU")


def test_reads_within_cache_window_reuse_the_last_read():
    clock = FakeClock()
    nvml = FakeNvml([FakeGpu()])
    reader = GpuReader(nvml=nvml, clock=clock)

    first = reader.read()
    clock.now += 0.99
    assert reader.read() is first
    assert nvml.calls["nvmlDeviceGetCount"] == 1

    clock.now += 0.01
    reader.read()
    assert nvml.calls["nvmlDeviceGetCount"] == 2


async def test_read_async_calls_nvml_off_the_event_loop_thread():
    nvml = FakeNvml([FakeGpu()])

    status = await GpuReader(nvml=nvml).read_async()

    assert status.gpus[0].name == "NVIDIA H100 80GB HBM3"
    assert nvml.threads
    assert threading.get_ident() not in nvml.threads


async def read_blocked(nvml: FakeNvml) -> None:
    """Until the thread read is inside the gated call (a 50 ms sleep hoped so); 30 s is only the outer bound."""
    deadline = time.monotonic() + 30
    while not nvml.calls["nvmlDeviceGetCount"]:
        assert time.monotonic() < deadline, "the thread read never started"
        await asyncio.sleep(0.005)


async def test_concurrent_read_async_calls_share_one_read():
    nvml = FakeNvml([FakeGpu()])
    nvml.count_gate = threading.Event()
    reader = GpuReader(nvml=nvml, cache_s=0)  # no cache, so only in-flight sharing can explain one read

    tasks = [asyncio.create_task(reader.read_async()) for _ in range(3)]
    await read_blocked(nvml)  # all three are now waiting on the blocked thread read
    nvml.count_gate.set()
    results = await asyncio.gather(*tasks)

    assert nvml.calls["nvmlDeviceGetCount"] == 1
    assert results[0] is results[1] is results[2]


async def test_cancelling_one_read_async_leaves_the_shared_read_for_the_others():
    nvml = FakeNvml([FakeGpu()])
    nvml.count_gate = threading.Event()
    reader = GpuReader(nvml=nvml, cache_s=0)

    cancelled = asyncio.create_task(reader.read_async())
    kept = asyncio.create_task(reader.read_async())
    await read_blocked(nvml)
    cancelled.cancel()
    nvml.count_gate.set()

    assert (await kept).gpus
    assert cancelled.cancelled()
    assert nvml.calls["nvmlDeviceGetCount"] == 1


@pytest.mark.skipif(not os.path.exists("/proc/self/comm"), reason="needs Linux /proc")
def test_process_names_and_memory():
    with open("/proc/self/comm", encoding="utf-8") as f:
        own_comm = f.read().strip()
    nameless_pid = NO_SUCH_PID + 1
    gpu = FakeGpu(
        compute=[proc(os.getpid(), 2 * GIB), proc(NO_SUCH_PID, None)],
        # A process using both compute and graphics appears in both lists; old bindings send the
        # unsigned -1 "not available" sentinel instead of None.
        graphics=[proc(os.getpid(), 2 * GIB), proc(nameless_pid, 2**64 - 1)],
    )
    nvml = FakeNvml([gpu], process_names={NO_SUCH_PID: b"/opt/venv/bin/python3.11"})

    (snap,) = GpuReader(nvml=nvml).read().gpus

    assert snap.processes == (
        GpuProcess(pid=os.getpid(), name=own_comm, used_memory_mib=2048.0),
        GpuProcess(pid=NO_SUCH_PID, name="python3.11", used_memory_mib=None),
        GpuProcess(pid=nameless_pid, name="?", used_memory_mib=None),
    )


def test_unsupported_process_list_keeps_the_gpu():
    gpu = FakeGpu(
        compute=[proc(NO_SUCH_PID, GIB)],
        fail={"nvmlDeviceGetGraphicsRunningProcesses": pynvml.NVML_ERROR_NOT_SUPPORTED},
    )

    (snap,) = GpuReader(nvml=FakeNvml([gpu])).read().gpus

    assert [p.pid for p in snap.processes] == [NO_SUCH_PID]


def test_gpu_lost_mid_read_is_skipped_and_the_others_reported():
    lost = FakeGpu(name="lost", fail={"nvmlDeviceGetUtilizationRates": pynvml.NVML_ERROR_GPU_IS_LOST})
    nvml = FakeNvml([lost, FakeGpu(name="fine")])

    status = GpuReader(nvml=nvml).read()

    assert [(g.index, g.name) for g in status.gpus] == [(1, "fine")]
    assert nvml.calls["nvmlDeviceGetPowerUsage"] == 1  # the lost GPU's remaining fields were not read


def test_every_gpu_lost_says_so():
    lost = {"nvmlDeviceGetHandleByIndex": pynvml.NVML_ERROR_GPU_IS_LOST}
    nvml = FakeNvml([FakeGpu(fail=lost), FakeGpu(fail=lost)])

    assert GpuReader(nvml=nvml).read() == GpuStatus(message="no readable NVIDIA GPU (2 found, none answered)")


def test_unexpected_errors_never_escape_read():
    nvml = FakeNvml([FakeGpu()])
    nvml.nvmlDeviceGetCount = lambda: 1 / 0

    status = GpuReader(nvml=nvml).read()

    assert status == GpuStatus(message="GPU stats unavailable (ZeroDivisionError: division by zero)")


def test_close_shuts_nvml_down_once_and_only_after_init():
    nvml = FakeNvml([FakeGpu()])
    reader = GpuReader(nvml=nvml)

    reader.close()
    assert nvml.calls["nvmlShutdown"] == 0

    reader.read()
    reader.close()
    reader.close()
    assert nvml.calls["nvmlShutdown"] == 1
