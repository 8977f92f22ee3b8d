"""GpuReader through the real pynvml bindings, against a stand-in driver library (fake_nvml_lib.py)."""

from __future__ import annotations

import asyncio
import ctypes.util
import json
import sys
import threading

import pynvml
import pytest

from llmtop import wire
from llmtop.engine import Engine
from llmtop.gpu import INIT_RETRY_FIRST_S, STALL_NOTE_S, GpuReader
from llmtop.snapshot import GpuProcess, GpuSnapshot, GpuStatus, MigInstance
from fake_nvml_lib import GIB, FakeDevice, FakeDriver, FakeMigDevice, FakeProcess, install

MIB = 1 << 20


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def driver(monkeypatch):
    """driver(*devices, branch=..., ...) installs a FakeDriver as pynvml's library."""
    return lambda *devices, **kw: install(monkeypatch, FakeDriver(list(devices), **kw))


@pytest.fixture
def proc(tmp_path):
    """A /proc of our own: proc(pid, argv, gpu=True) adds a process, mapping /dev/nvidia0 when `gpu`."""
    root = tmp_path / "proc"
    root.mkdir()

    def add(pid: int, argv: list[str], gpu: bool = True) -> str:
        d = root / str(pid)
        d.mkdir()
        (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
        lib = "7f00 r-xp 00000000 08:01 42 /usr/lib/libc.so.6\n"
        (d / "maps").write_text(lib + ("7f10 rw-s 00000000 00:05 7 /dev/nvidia0\n" if gpu else ""))
        return str(root)

    add.root = str(root)
    return add


def reader(proc_root: str = "/nonexistent", **kw) -> GpuReader:
    return GpuReader(nvml=pynvml, proc_root=proc_root, **kw)


def test_two_gpus_read_with_units_converted_and_memory_from_the_v2_call(driver):
    nvml = driver(
        FakeDevice(),
        FakeDevice(name="NVIDIA A10", util_gpu=3, mem_used=512 * MIB, mem_total=24 * GIB, temperature=38, power_mw=21_750, limit_mw=150_000),
    )

    status = reader().read()

    assert status == GpuStatus(
        gpus=(
            GpuSnapshot(0, "NVIDIA H100 80GB HBM3", 87.0, 40960.0, 81920.0, 61.0, 312.5, 700.0),
            GpuSnapshot(1, "NVIDIA A10", 3.0, 512.0, 24576.0, 38.0, 21.75, 150.0),
        )
    )
    assert nvml.calls["nvmlDeviceGetMemoryInfo_v2"] == 2 and nvml.calls["nvmlDeviceGetMemoryInfo"] == 0
    assert nvml.calls["nvmlDeviceGetTemperatureV"] == 2 and nvml.calls["nvmlDeviceGetTemperature"] == 0
    assert nvml.calls["nvmlInitWithFlags"] == 1


def test_a_driver_without_the_v2_memory_call_reports_the_old_used_figure(driver):
    nvml = driver(FakeDevice(mem_used=40 * GIB, mem_reserved=512 * MIB), branch="470")

    (gpu,) = reader().read().gpus

    assert gpu.memory_used_mib == 40960.0 + 512.0  # what that driver has: used with its reserve in it
    assert gpu.temperature_c == 61.0  # by nvmlDeviceGetTemperature, which that driver has
    assert nvml.calls["nvmlDeviceGetMemoryInfo"] == 1 and nvml.calls["nvmlDeviceGetTemperature"] == 1


TWO_PROCESSES = [FakeProcess(4242, 30 * GIB), FakeProcess(5151, None)]


@pytest.mark.parametrize("branch", ["550", "535.54", "535.98", "470", "418"])
def test_process_lists_read_true_on_every_driver_branch(driver, branch):
    driver(FakeDevice(compute=list(TWO_PROCESSES), graphics=[FakeProcess(4242, 30 * GIB)]), branch=branch)

    (gpu,) = reader().read().gpus

    assert [(p.pid, p.used_memory_mib) for p in gpu.processes] == [(4242, 30720.0), (5151, None)]
    assert "processes" not in gpu.unavailable


def test_the_bindings_alone_garble_535_54_and_drop_535_98_which_the_reader_corrects(driver):
    # What the stand-in reproduces, and so what the test above would catch.
    driver(FakeDevice(compute=list(TWO_PROCESSES)), branch="535.54")
    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    assert [p.pid for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)] != [4242, 5151]
    pynvml.nvmlShutdown()

    driver(FakeDevice(compute=list(TWO_PROCESSES)), branch="535.98")
    pynvml.nvmlInit()
    with pytest.raises(pynvml.NVMLLibraryMismatchError):
        pynvml.nvmlDeviceGetComputeRunningProcesses(pynvml.nvmlDeviceGetHandleByIndex(0))
    pynvml.nvmlShutdown()


@pytest.mark.parametrize("code", [pynvml.NVML_ERROR_GPU_IS_LOST, pynvml.NVML_ERROR_UNKNOWN])
def test_a_lost_gpu_says_so_and_the_others_report(driver, code):
    driver(FakeDevice(name="a"), FakeDevice(name="b", errors={"nvmlDeviceGetHandleByIndex_v2": code}), FakeDevice(name="c"))

    status = reader().read()

    assert [(g.index, g.name, g.problem) for g in status.gpus] == [(0, "a", None), (1, "GPU 1", "lost"), (2, "c", None)]
    assert status.gpus[1].memory_used_mib is None and status.gpus[2].memory_used_mib == 40960.0
    assert status.message is None


def test_a_gpu_lost_mid_read_is_marked_lost_and_its_remaining_fields_not_read(driver):
    nvml = driver(FakeDevice(name="lost", errors={"nvmlDeviceGetUtilizationRates": pynvml.NVML_ERROR_GPU_IS_LOST}), FakeDevice(name="fine"))

    status = reader().read()

    assert [(g.name, g.problem) for g in status.gpus] == [("GPU 0", "lost"), ("fine", None)]
    assert nvml.calls["nvmlDeviceGetPowerUsage"] == 1


def test_every_gpu_lost_says_so(driver):
    lost = {"nvmlDeviceGetHandleByIndex_v2": pynvml.NVML_ERROR_GPU_IS_LOST}
    driver(FakeDevice(errors=lost), FakeDevice(errors=lost))

    status = reader().read()

    assert status.message == "no readable NVIDIA GPU (2 found, none answered)"
    assert [g.problem for g in status.gpus] == ["lost", "lost"]


def test_a_gpu_we_may_not_read_says_no_permission(driver):
    driver(FakeDevice(errors={"nvmlDeviceGetHandleByIndex_v2": pynvml.NVML_ERROR_NO_PERMISSION}), FakeDevice())

    assert [g.problem for g in reader().read().gpus] == ["no permission", None]


def test_unsupported_fields_are_blank_with_the_reason_and_the_gpu_is_kept(driver):
    not_supported = pynvml.NVML_ERROR_NOT_SUPPORTED
    driver(FakeDevice(errors={"nvmlDeviceGetPowerUsage": not_supported, "nvmlDeviceGetEnforcedPowerLimit": not_supported}))

    (gpu,) = reader().read().gpus

    assert (gpu.power_w, gpu.power_limit_w, gpu.utilization_pct) == (None, None, 87.0)
    assert gpu.unavailable == {"power_w": "not supported", "power_limit_w": "not supported"}


def test_a_binding_function_missing_from_nvidia_ml_py_blanks_only_that_field(driver, monkeypatch):
    # nvmlDeviceGetTemperature is deprecated in the 13.x bindings, to go with CUDA 14.
    driver(FakeDevice(), branch="470")
    monkeypatch.delattr(pynvml, "nvmlDeviceGetTemperature")

    (gpu,) = reader().read().gpus

    assert gpu.temperature_c is None and gpu.unavailable == {"temperature_c": "not in this nvidia-ml-py"}
    assert (gpu.name, gpu.utilization_pct, gpu.memory_used_mib) == ("NVIDIA H100 80GB HBM3", 87.0, 40960.0 + 512.0)


def test_mig_instances_are_listed_under_their_gpu_with_their_own_memory_and_processes(driver, proc):
    proc(4242, ["python", "-m", "vllm.entrypoints.openai.api_server", "--port", "8001"])
    proc(5151, ["ollama", "serve"])
    mig = [
        FakeMigDevice(1, 0, mem_used=10 * GIB, compute=[FakeProcess(4242, 9 * GIB, 1, 0)]),
        # The same pid on a second instance keeps its own entry there.
        FakeMigDevice(2, 0, mem_used=20 * GIB, compute=[FakeProcess(4242, 3 * GIB, 2, 0), FakeProcess(5151, 16 * GIB, 2, 0)]),
    ]
    # Whole-GPU memory needs privileges under MIG.
    driver(FakeDevice(name="NVIDIA A100-SXM4-80GB", mig=mig, errors={"nvmlDeviceGetMemoryInfo_v2": pynvml.NVML_ERROR_NO_PERMISSION}), FakeDevice(name="plain"))

    parent, plain = reader(proc.root).read().gpus

    assert parent.utilization_pct is None and parent.memory_used_mib is None
    assert parent.unavailable == {
        "utilization_pct": "not supported with MIG enabled",
        "memory_used_mib": "no permission",
        "memory_total_mib": "no permission",
    }
    vllm = "python -m vllm.entrypoints.openai.api_server --port 8001"
    assert parent.mig == (
        MigInstance(1, 0, "NVIDIA A100-SXM4-80GB MIG 3g.40gb", 10240.0, 40960.0, (GpuProcess(4242, vllm, 9216.0),)),
        MigInstance(2, 0, "NVIDIA A100-SXM4-80GB MIG 3g.40gb", 20480.0, 40960.0, (GpuProcess(4242, vllm, 3072.0), GpuProcess(5151, "ollama serve", 16384.0))),
    )
    assert plain.mig == () and plain.utilization_pct == 87.0 and plain.unavailable == {}


def test_a_board_without_mig_reads_as_before(driver):
    driver(FakeDevice(mig_capable=False))

    (gpu,) = reader().read().gpus

    assert gpu.mig == () and gpu.unavailable == {} and gpu.utilization_pct == 87.0


@pytest.mark.parametrize(
    ("code", "message"),
    [
        (pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, "no NVIDIA GPU (NVML library not found)"),
        (pynvml.NVML_ERROR_DRIVER_NOT_LOADED, "no NVIDIA GPU (driver not loaded)"),
        (pynvml.NVML_ERROR_NO_PERMISSION, "NVIDIA GPU not readable: no permission to use NVML (check access to /dev/nvidia*)"),
        (
            pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH,
            "NVIDIA driver/library version mismatch: the loaded driver differs from the installed one (reboot or reload the nvidia module)",
        ),
    ],
)
def test_init_failures_say_what_failed(driver, code, message):
    driver(FakeDevice(), init_error=code)

    assert reader().read() == GpuStatus(message=message)


def test_init_is_retried_with_a_growing_backoff_until_it_works(driver):
    clock = FakeClock()
    nvml = driver(FakeDevice(), init_error=pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH)
    r = reader(clock=clock, cache_s=0)  # no cache, so every read() reaches the init logic

    r.read()
    for wait in (INIT_RETRY_FIRST_S, 2 * INIT_RETRY_FIRST_S, 4 * INIT_RETRY_FIRST_S):
        clock.now += wait - 0.1
        r.read()
        attempts = nvml.calls["nvmlInitWithFlags"]
        clock.now += 0.1
        r.read()
        assert nvml.calls["nvmlInitWithFlags"] == attempts + 1

    nvml.init_error = None  # the operator reloaded the driver
    clock.now += 8 * INIT_RETRY_FIRST_S
    status = r.read()

    assert [g.name for g in status.gpus] == ["NVIDIA H100 80GB HBM3"] and status.message is None


def test_a_driver_gone_after_init_is_reported_and_nvml_started_again(driver):
    clock = FakeClock()
    nvml = driver(FakeDevice())
    r = reader(clock=clock, cache_s=0)
    assert r.read().gpus

    nvml.errors["nvmlDeviceGetCount_v2"] = pynvml.NVML_ERROR_DRIVER_NOT_LOADED
    assert r.read() == GpuStatus(message="no NVIDIA GPU (driver not loaded)")
    del nvml.errors["nvmlDeviceGetCount_v2"]
    clock.now += INIT_RETRY_FIRST_S

    assert r.read().gpus
    assert nvml.calls["nvmlInitWithFlags"] == 2 and nvml.initialised == 1


def test_missing_package_is_calm(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError

    assert GpuReader().read() == GpuStatus(message="no NVIDIA GPU (nvidia-ml-py not installed)")


@pytest.mark.skipif(ctypes.util.find_library("nvidia-ml") is not None, reason="an NVIDIA driver is installed")
def test_real_pynvml_without_driver_is_calm():
    status = GpuReader().read()

    assert status.gpus == ()
    assert status.message in ("no NVIDIA GPU (NVML library not found)", "no NVIDIA GPU (driver not loaded)")


def test_zero_devices_is_calm(driver):
    driver()

    assert reader().read() == GpuStatus(message="no NVIDIA GPU")


def test_reads_within_cache_window_reuse_the_last_read(driver):
    clock = FakeClock()
    nvml = driver(FakeDevice())
    r = reader(clock=clock)

    first = r.read()
    clock.now += 0.99
    assert r.read() is first
    assert nvml.calls["nvmlDeviceGetCount_v2"] == 1

    clock.now += 0.01
    r.read()
    assert nvml.calls["nvmlDeviceGetCount_v2"] == 2


def test_process_names_are_command_lines_and_say_when_the_pid_is_not_ours(driver, proc):
    long_name = ["/opt/venv/bin/python3.11", "-m", "sglang.launch_server", "--model-path", "Qwen/Qwen2.5-7B"]
    proc(100, long_name)
    proc(200, ["bash"], gpu=False)  # a host pid that, in this container, is someone else
    procs = [FakeProcess(100, GIB), FakeProcess(200, GIB), FakeProcess(300, GIB), FakeProcess(400, GIB)]
    driver(FakeDevice(compute=procs), process_names={200: "/usr/bin/python3", 300: "/usr/local/bin/ollama"})

    (gpu,) = reader(proc.root).read().gpus

    assert gpu.processes == (
        GpuProcess(100, " ".join(long_name), 1024.0),
        GpuProcess(200, "/usr/bin/python3", 1024.0, "name from NVML; the pid here is another process (a host pid outside this container)"),
        GpuProcess(300, "/usr/local/bin/ollama", 1024.0, "name from NVML; no such pid here (exited, or a host pid outside this container)"),
        GpuProcess(400, "?", 1024.0, "no such pid here (exited, or a host pid outside this container)"),
    )


def test_gpu_status_is_strict_json_and_reads_back_the_same(driver, proc):
    proc(100, ["vllm", "serve"])
    mig = [FakeMigDevice(1, 0, compute=[FakeProcess(100, None, 1, 0)])]
    driver(FakeDevice(mig=mig), FakeDevice(errors={"nvmlDeviceGetHandleByIndex_v2": pynvml.NVML_ERROR_GPU_IS_LOST}))
    status = reader(proc.root).read()

    text = json.dumps({"gpus": [g.to_json() for g in status.gpus], "gpu_message": status.message}, allow_nan=False)

    assert wire.gpus(json.loads(text)) == status


def test_unexpected_errors_never_escape_read(driver, monkeypatch):
    driver(FakeDevice())
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", lambda: 1 / 0)

    assert reader().read() == GpuStatus(message="GPU stats unavailable (ZeroDivisionError: division by zero)")


def test_close_shuts_nvml_down_once_and_only_after_init(driver):
    nvml = driver(FakeDevice())
    r = reader()
    r.close()
    r.read()
    shutdown = nvml.watch("nvmlShutdown")

    r.close()

    assert shutdown.wait(timeout=30)  # an outer bound only: the shutdown thread sets it when it calls
    r.close()
    assert nvml.initialised == 0


async def test_read_async_calls_nvml_off_the_event_loop_thread(driver):
    nvml = driver(FakeDevice())

    status = await reader().read_async()

    assert status.gpus[0].name == "NVIDIA H100 80GB HBM3"
    assert nvml.threads and threading.get_ident() not in nvml.threads


async def test_concurrent_read_async_calls_share_one_read(driver):
    nvml = driver(FakeDevice())
    gate = nvml.stall("nvmlDeviceGetCount_v2")
    r = reader(cache_s=0)  # no cache, so only in-flight sharing can explain one read

    tasks = [asyncio.create_task(r.read_async()) for _ in range(3)]
    await asyncio.to_thread(nvml.entered["nvmlDeviceGetCount_v2"].wait)
    gate.set()
    results = await asyncio.gather(*tasks)

    assert nvml.calls["nvmlDeviceGetCount_v2"] == 1
    assert results[0] is results[1] is results[2]


async def test_cancelling_one_read_async_leaves_the_shared_read_for_the_others(driver):
    nvml = driver(FakeDevice())
    gate = nvml.stall("nvmlDeviceGetCount_v2")
    r = reader(cache_s=0)

    cancelled = asyncio.create_task(r.read_async())
    kept = asyncio.create_task(r.read_async())
    await asyncio.to_thread(nvml.entered["nvmlDeviceGetCount_v2"].wait)
    cancelled.cancel()
    gate.set()

    assert (await kept).gpus
    assert cancelled.cancelled()


def test_a_stalled_call_holds_neither_the_caller_nor_close_nor_the_exit(driver):
    nvml = driver(FakeDevice())
    r = reader(cache_s=0)
    r.read()
    gate = nvml.stall("nvmlDeviceGetCount_v2")

    status = r.read_within(wait_s=0)  # the call is stalled until the gate opens: no wait can see it answer
    nvml.entered["nvmlDeviceGetCount_v2"].wait()
    r.close()  # returns although the read in flight holds NVML
    shutdown = nvml.watch("nvmlShutdown")

    assert status.gpus == () and status.message.startswith("GPU read stalled: an NVML call has not returned")
    assert all(t.daemon for t in threading.enumerate() if t.name.startswith("llmtop-nvml"))
    assert nvml.calls["nvmlShutdown"] == 0  # not under the stalled call
    gate.set()
    assert shutdown.wait(timeout=30)  # outer bound only: set when the shutdown thread calls it


async def test_a_stalled_gpu_read_holds_no_later_engine_round(driver, tmp_path):
    from llmtop.config import Config
    from llmtop.state import StateStore

    nvml = driver(FakeDevice())
    gate = nvml.stall("nvmlDeviceGetCount_v2")
    clock = FakeClock()
    r = reader(clock=clock, cache_s=0)
    engine = Engine(Config(), StateStore(tmp_path / "s.json"), gpu=r)
    r.read_within(wait_s=0)  # a read starts, and stalls in the driver
    nvml.entered["nvmlDeviceGetCount_v2"].wait()
    clock.now += STALL_NOTE_S + 3

    await engine.run_round()  # its STALL_NOTE_S has passed already: no wait at all
    await engine.close()

    assert engine.gpu_status == GpuStatus(message=f"GPU read stalled: an NVML call has not returned for {STALL_NOTE_S + 3:.0f} s")
    gate.set()


def test_a_process_renaming_itself_shows_its_new_name(driver, proc, tmp_path):
    # vLLM's engine process sets its title ("VLLM::EngineCore") after it starts.
    proc(100, ["python3", "-m", "vllm.entrypoints.openai.api_server"])
    driver(FakeDevice(compute=[FakeProcess(100, GIB)]))
    r = reader(proc.root, cache_s=0)
    assert r.read().gpus[0].processes[0].name == "python3 -m vllm.entrypoints.openai.api_server"

    (tmp_path / "proc" / "100" / "cmdline").write_bytes(b"VLLM::EngineCore\0")

    assert r.read().gpus[0].processes[0].name == "VLLM::EngineCore"


async def test_a_stalled_nvml_call_delays_no_poll_of_a_check_round(driver, tmp_path, monkeypatch):
    """The round's GPU read runs beside its polls: with NVML stalled (and the engine's wait for
    it made longer than any test), the backends are still polled at once."""
    import llmtop.engine
    from llmtop.config import BackendConfig, Config
    from llmtop.simulator import SimBackend, Simulator
    from llmtop.state import StateStore

    monkeypatch.setattr(llmtop.engine, "STALL_NOTE_S", 300.0)
    nvml = driver(FakeDevice())
    gate = nvml.stall("nvmlDeviceGetCount_v2")
    sb = SimBackend("a", "vllm")
    async with Simulator([sb]) as sim:
        config = Config(backends=(BackendConfig("a", "vllm", sim.url("a"), tuple(sb.models)),))
        engine = Engine(config, StateStore(tmp_path / "s.json"), gpu=reader(cache_s=0))
        await engine.open()
        try:
            round_ = asyncio.create_task(engine.run_round(probe=False))
            await asyncio.to_thread(nvml.entered["nvmlDeviceGetCount_v2"].wait, 30)
            deadline = asyncio.get_running_loop().time() + 30  # an outer bound for a broken build only
            while not sb.requests["/metrics"]:
                assert asyncio.get_running_loop().time() < deadline, "the polls waited for the stalled GPU read"
                await asyncio.sleep(0.01)
            assert not round_.done()  # the round itself still waits for the GPU reading before any probe
            gate.set()
            await asyncio.wait_for(round_, 30)
            assert engine.snapshot().backends[0].status == "healthy" and engine.gpu_status.gpus
        finally:
            gate.set()
            await engine.close()
