"""Local NVIDIA GPU stats read through NVML, where "no GPU here" is a normal, calmly reported state.

The calls follow what the driver exports, as nvitop does (see README, Development): process
lists by `_v3`, `_v2` or the unversioned call, with the 32-byte entries of drivers 535.43-535.86;
memory by `_v2` (nvidia-smi's "used", without the driver's reserve) where there is one;
temperature by `nvmlDeviceGetTemperatureV` where there is one. One GPU that is lost, or one
reading that fails, leaves the rest standing, with the reason kept beside the blank.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import os
import threading
import time
from typing import Any, Callable

from llmtop.snapshot import GpuProcess, GpuSnapshot, GpuStatus, MigInstance

INIT_RETRY_FIRST_S = 2.0  # after a failed NVML start, the first retry; each failure doubles it
INIT_RETRY_MAX_S = 60.0  # a machine without a driver will not grow one between two ticks
STALL_NOTE_S = 2.0  # how long a caller waits for a read before saying it is stalled

_MIB = 1024 * 1024
# NVML's "value not available" sentinel (unsigned -1); newer bindings map it to None, older ones pass it through.
_NOT_AVAILABLE = (1 << 64) - 1
_NAME_MAX = 200


class _ProcessInfoV1(ctypes.Structure):
    _fields_ = [("pid", ctypes.c_uint), ("usedGpuMemory", ctypes.c_ulonglong)]


class _ProcessInfoV2(ctypes.Structure):
    _fields_ = [
        ("pid", ctypes.c_uint),
        ("usedGpuMemory", ctypes.c_ulonglong),
        ("gpuInstanceId", ctypes.c_uint),
        ("computeInstanceId", ctypes.c_uint),
    ]


class _ProcessInfoV3Legacy(ctypes.Structure):
    # Drivers 535.43-535.86 write this 32-byte entry from the `_v3` calls; read as the 24-byte
    # one, every entry after the first is shifted and pids and memory come out garbled.
    _fields_ = _ProcessInfoV2._fields_ + [("usedGpuCcProtectedMemory", ctypes.c_ulonglong)]


class GpuReader:
    """Reads every local NVIDIA GPU into a GpuStatus, caching the result for `cache_s`.

    `read()` blocks on NVML and never raises. `read_async()` and `read_within()` run it on a
    daemon thread, one read in flight shared by all callers, so a stalled driver call holds
    neither the event loop nor, at exit, the process. `close()` never waits.
    """

    def __init__(
        self,
        nvml: Any = None,
        clock: Callable[[], float] = time.monotonic,
        cache_s: float = 1.0,
        proc_root: str = "/proc",
    ) -> None:
        self._nvml = nvml  # None: import pynvml on first use
        self._clock = clock
        self._cache_s = cache_s
        self._proc = proc_root
        # NVML state and the cache belong to whichever thread holds the lock.
        self._lock = threading.Lock()
        self._initialised = False
        self._calls: _Calls | None = None
        self._init_failures = 0
        self._init_failure: tuple[float, GpuStatus] | None = None  # (clock time, status) of the last failed init
        self._cache: tuple[float, GpuStatus] | None = None  # (clock time, status) of the last real read
        # pid -> whether /proc/PID here is that GPU process (it maps /dev/nvidia*), kept while the
        # pid stays on a GPU: a large process's maps take a while to read, its command line does not
        self._ours: dict[int, bool] = {}
        self._seen: set[int] = set()  # the pids this read met
        self._in_flight: concurrent.futures.Future[GpuStatus] | None = None
        self._started: float | None = None  # clock time the read in flight began

    def read(self) -> GpuStatus:
        with self._lock:
            cached = self._fresh_cache()
            if cached is not None:
                return cached
            try:
                status = self._read_uncached()
            except Exception as exc:  # noqa: BLE001 - a monitor's GPU panel must never take the monitor down
                status = GpuStatus(message=f"GPU stats unavailable ({type(exc).__name__}: {exc})")
            self._cache = (self._clock(), status)
            return status

    async def read_async(self, wait_s: float | None = None) -> GpuStatus:
        """The reading, off the event loop; with `wait_s`, the stalled() status once the read in
        flight has taken that long (counted from its start, so a stalled driver delays a caller once)."""
        # The cache check touches no NVML, so a fresh hit needs no thread hop.
        cached = self._fresh_cache()
        if cached is not None:
            return cached
        # shield: one caller being cancelled must not cancel the read the others are awaiting.
        read = asyncio.shield(asyncio.wrap_future(self._start_read()))
        if wait_s is None:
            return await read
        try:
            return await asyncio.wait_for(read, max(0.0, self._left(wait_s)))
        except asyncio.TimeoutError:
            return self.stalled()

    def read_within(self, wait_s: float = STALL_NOTE_S) -> GpuStatus:
        """read_async(wait_s) for a caller without an event loop."""
        cached = self._fresh_cache()
        if cached is not None:
            return cached
        try:
            return self._start_read().result(timeout=max(0.0, self._left(wait_s)))
        except concurrent.futures.TimeoutError:
            return self.stalled()

    def _left(self, wait_s: float) -> float:
        started = self._started
        return wait_s if started is None else wait_s - (self._clock() - started)

    def stalled(self) -> GpuStatus:
        """What to show while a read has not come back: no figures, since the last ones are not current."""
        started = self._started
        waited = f" for {self._clock() - started:.0f} s" if started is not None else ""
        return GpuStatus(message=f"GPU read stalled: an NVML call has not returned{waited}")

    def close(self) -> None:
        """Shut NVML down once any read in flight is done, on a daemon thread; returns at once."""
        threading.Thread(target=self._shutdown, name="llmtop-nvml-shutdown", daemon=True).start()

    def _start_read(self) -> concurrent.futures.Future[GpuStatus]:
        future = self._in_flight
        if future is None or future.done():
            future = concurrent.futures.Future()
            self._in_flight = future
            self._started = self._clock()
            threading.Thread(target=self._read_into, args=(future,), name="llmtop-nvml", daemon=True).start()
        return future

    def _read_into(self, future: concurrent.futures.Future[GpuStatus]) -> None:
        future.set_result(self.read())

    def _shutdown(self) -> None:
        with self._lock:
            if not self._initialised:
                return
            self._initialised = False
            self._cache = None
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError:
                pass  # shutting down anyway; nothing left to release

    def _fresh_cache(self) -> GpuStatus | None:
        cache = self._cache
        if cache is not None and self._clock() - cache[0] < self._cache_s:
            return cache[1]
        return None

    def _read_uncached(self) -> GpuStatus:
        failure = self._ensure_init()
        if failure is not None:
            return failure
        nvml = self._nvml
        try:
            count = nvml.nvmlDeviceGetCount()
        except nvml.NVMLError as exc:
            # The driver went away under us (unloaded, upgraded, reset): start NVML again later.
            self._initialised = False
            try:
                nvml.nvmlShutdown()
            except nvml.NVMLError:
                pass
            return self._failed_init(_init_failure_message(nvml, exc))
        if count == 0:
            return GpuStatus(message="no NVIDIA GPU")
        self._seen = set()
        gpus = tuple(_read_device(nvml, self._calls, index, self._process_name) for index in range(count))
        self._ours = {pid: ours for pid, ours in self._ours.items() if pid in self._seen}
        if all(g.problem is not None for g in gpus):
            return GpuStatus(gpus=gpus, message=f"no readable NVIDIA GPU ({count} found, none answered)")
        return GpuStatus(gpus=gpus)

    def _ensure_init(self) -> GpuStatus | None:
        """Initialise NVML once; return None when ready, else the status that says why not."""
        if self._initialised:
            return None
        now = self._clock()
        if self._init_failure is not None and now - self._init_failure[0] < self._retry_delay():
            return self._init_failure[1]
        if self._nvml is None:
            try:
                import pynvml
            except ImportError:
                return self._failed_init("no NVIDIA GPU (nvidia-ml-py not installed)")
            self._nvml = pynvml
        nvml = self._nvml
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            return self._failed_init(_init_failure_message(nvml, exc))
        self._initialised = True
        self._init_failures = 0
        self._init_failure = None
        self._calls = _Calls(nvml)
        return None

    def _retry_delay(self) -> float:
        return min(INIT_RETRY_MAX_S, INIT_RETRY_FIRST_S * 2 ** max(0, self._init_failures - 1))

    def _failed_init(self, message: str) -> GpuStatus:
        status = GpuStatus(message=message)
        self._init_failures += 1
        self._init_failure = (self._clock(), status)
        return status

    def _process_name(self, nvml: Any, pid: int) -> tuple[str, str | None]:
        self._seen.add(pid)
        return _process_name(nvml, self._proc, pid, self._ours)


def _init_failure_message(nvml: Any, exc: Any) -> str:
    code = exc.value
    if code == nvml.NVML_ERROR_LIBRARY_NOT_FOUND:
        return "no NVIDIA GPU (NVML library not found)"
    if code == nvml.NVML_ERROR_DRIVER_NOT_LOADED:
        return "no NVIDIA GPU (driver not loaded)"
    if code == nvml.NVML_ERROR_NO_PERMISSION:
        return "NVIDIA GPU not readable: no permission to use NVML (check access to /dev/nvidia*)"
    if code == nvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH:
        return "NVIDIA driver/library version mismatch: the loaded driver differs from the installed one (reboot or reload the nvidia module)"
    return f"GPU stats unavailable ({exc})"


class _Calls:
    """Which C functions this driver has, chosen once per NVML start as nvitop chooses them."""

    def __init__(self, nvml: Any) -> None:
        has = lambda symbol: _has(nvml, symbol)  # noqa: E731
        if has("nvmlDeviceGetComputeRunningProcesses_v3"):
            self.process_suffix = "_v3"
            # 535.43-535.86 have the confidential-computing call but not yet the detail list.
            legacy = has("nvmlDeviceGetConfComputeMemSizeInfo") and not has("nvmlDeviceGetRunningProcessDetailList")
            self.process_entry = _ProcessInfoV3Legacy if legacy else _ProcessInfoV2
        elif has("nvmlDeviceGetComputeRunningProcesses_v2"):
            self.process_suffix, self.process_entry = "_v2", _ProcessInfoV2
        else:
            self.process_suffix, self.process_entry = "", _ProcessInfoV1
        self.memory_v2 = has("nvmlDeviceGetMemoryInfo_v2") and hasattr(nvml, "nvmlMemory_v2")
        self.temperature_v = has("nvmlDeviceGetTemperatureV") and hasattr(nvml, "nvmlDeviceGetTemperatureV")
        self.mig = has("nvmlDeviceGetMigMode")


def _has(nvml: Any, symbol: str) -> bool:
    try:
        nvml._nvmlGetFunctionPointer(symbol)
    except nvml.NVMLError:
        return False
    return True


class _Lost(Exception):
    """The whole device stopped answering: its remaining readings are not tried."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


def _reason(nvml: Any, exc: BaseException) -> str:
    if isinstance(exc, AttributeError):
        return "not in this nvidia-ml-py"
    value = getattr(exc, "value", None)
    if value == nvml.NVML_ERROR_NOT_SUPPORTED:
        return "not supported"
    if value == nvml.NVML_ERROR_NO_PERMISSION:
        return "no permission"
    if value == nvml.NVML_ERROR_FUNCTION_NOT_FOUND or isinstance(exc, getattr(nvml, "NVMLLibraryMismatchError", ())):
        return "driver too old"
    return str(exc)


class _Reading:
    """The readings of one device, with why each missing one is missing."""

    def __init__(self, nvml: Any) -> None:
        self.nvml = nvml
        self.unavailable: dict[str, str] = {}

    def get(self, field: str, call: Callable[[], Any]) -> Any:
        nvml = self.nvml
        try:
            return call()
        except nvml.NVMLError as exc:
            if exc.value == nvml.NVML_ERROR_GPU_IS_LOST:
                raise _Lost("lost") from exc
            self.unavailable.setdefault(field, _reason(nvml, exc))
        except Exception as exc:  # noqa: BLE001 - a missing or mismatched binding blanks this reading only
            self.unavailable.setdefault(field, _reason(nvml, exc))
        return None


def _read_device(nvml: Any, calls: _Calls, index: int, name_of: Callable[[Any, int], tuple[str, str | None]]) -> GpuSnapshot:
    try:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
    except nvml.NVMLError as exc:
        lost = exc.value in (nvml.NVML_ERROR_GPU_IS_LOST, nvml.NVML_ERROR_UNKNOWN)
        return _problem(index, "lost" if lost else _reason(nvml, exc))
    r = _Reading(nvml)
    try:
        return _read_handle(nvml, calls, index, handle, r, name_of)
    except _Lost as lost:
        return _problem(index, lost.problem)


def _problem(index: int, problem: str) -> GpuSnapshot:
    return GpuSnapshot(index, f"GPU {index}", None, None, None, None, None, None, problem=problem)


def _read_handle(nvml: Any, calls: _Calls, index: int, handle: Any, r: _Reading, name_of: Any) -> GpuSnapshot:
    name = r.get("name", lambda: nvml.nvmlDeviceGetName(handle))
    mig_on = False
    if calls.mig:
        mode = r.get("mig", lambda: nvml.nvmlDeviceGetMigMode(handle))
        mig_on = mode is not None and mode[0] == nvml.NVML_DEVICE_MIG_ENABLE
        r.unavailable.pop("mig", None)  # NOT_SUPPORTED here only means a board without MIG
    util = None
    if mig_on:
        r.unavailable["utilization_pct"] = "not supported with MIG enabled"
    else:
        util = r.get("utilization_pct", lambda: nvml.nvmlDeviceGetUtilizationRates(handle))
    memory = r.get("memory", lambda: _memory(nvml, calls, handle))
    if memory is None:
        r.unavailable["memory_used_mib"] = r.unavailable["memory_total_mib"] = r.unavailable.pop("memory")
    temperature = r.get("temperature_c", lambda: _temperature(nvml, calls, handle))
    power_mw = r.get("power_w", lambda: nvml.nvmlDeviceGetPowerUsage(handle))
    limit_mw = r.get("power_limit_w", lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(handle))
    instances: tuple[MigInstance, ...] = ()
    processes: tuple[GpuProcess, ...] = ()
    if mig_on:
        # Whole-GPU process lists under MIG need privileges and merge the instances: list each
        # instance's own instead.
        instances = _mig_instances(nvml, calls, handle, r, name_of)
    else:
        processes = _processes(nvml, calls, handle, r, name_of)
    return GpuSnapshot(
        index=index,
        name=_text(name) if name is not None else f"GPU {index}",
        utilization_pct=float(util.gpu) if util is not None else None,
        memory_used_mib=_mib(memory.used) if memory is not None else None,
        memory_total_mib=_mib(memory.total) if memory is not None else None,
        temperature_c=float(temperature) if temperature is not None else None,
        power_w=power_mw / 1000 if power_mw is not None else None,
        power_limit_w=limit_mw / 1000 if limit_mw is not None else None,
        processes=processes,
        unavailable=r.unavailable,
        mig=instances,
    )


def _memory(nvml: Any, calls: _Calls, handle: Any) -> Any:
    if calls.memory_v2:
        return nvml.nvmlDeviceGetMemoryInfo(handle, version=nvml.nvmlMemory_v2)
    return nvml.nvmlDeviceGetMemoryInfo(handle)


def _temperature(nvml: Any, calls: _Calls, handle: Any) -> Any:
    if calls.temperature_v:
        return nvml.nvmlDeviceGetTemperatureV(handle, nvml.NVML_TEMPERATURE_GPU)
    return nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)


def _mig_instances(nvml: Any, calls: _Calls, handle: Any, r: _Reading, name_of: Any) -> tuple[MigInstance, ...]:
    count = r.get("mig", lambda: nvml.nvmlDeviceGetMaxMigDeviceCount(handle)) or 0
    found = []
    for i in range(count):
        try:
            mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, i)
        except nvml.NVMLError as exc:
            if exc.value == nvml.NVML_ERROR_GPU_IS_LOST:
                raise _Lost("lost") from exc
            continue  # NOT_FOUND: no MIG device in that slot
        own = _Reading(nvml)
        name = own.get("name", lambda: nvml.nvmlDeviceGetName(mig))
        memory = own.get("memory", lambda: _memory(nvml, calls, mig))
        found.append(
            MigInstance(
                gpu_instance_id=own.get("gpu_instance_id", lambda: nvml.nvmlDeviceGetGpuInstanceId(mig)),
                compute_instance_id=own.get("compute_instance_id", lambda: nvml.nvmlDeviceGetComputeInstanceId(mig)),
                name=_text(name) if name is not None else f"MIG {i}",
                memory_used_mib=_mib(memory.used) if memory is not None else None,
                memory_total_mib=_mib(memory.total) if memory is not None else None,
                processes=_processes(nvml, calls, mig, own, name_of),
            )
        )
    return tuple(found)


def _running_processes(nvml: Any, calls: _Calls, kind: str, handle: Any) -> list[Any]:
    """The driver's process list of one kind ("Compute", "Graphics"), read with its own entry layout."""
    fn = nvml._nvmlGetFunctionPointer(f"nvmlDeviceGet{kind}RunningProcesses{calls.process_suffix}")
    count = ctypes.c_uint(0)
    ret = fn(handle, ctypes.byref(count), None)
    if ret == nvml.NVML_SUCCESS:
        return []
    if ret != nvml.NVML_ERROR_INSUFFICIENT_SIZE:
        raise nvml.NVMLError(ret)
    count.value = count.value * 2 + 5  # room for processes started since the first call
    entries = (calls.process_entry * count.value)()
    ret = fn(handle, ctypes.byref(count), entries)
    if ret != nvml.NVML_SUCCESS:
        raise nvml.NVMLError(ret)
    return list(entries[: count.value])


def _processes(nvml: Any, calls: _Calls, handle: Any, r: _Reading, name_of: Any) -> tuple[GpuProcess, ...]:
    found: dict[int, GpuProcess] = {}
    for kind in ("Compute", "Graphics"):
        for proc in r.get("processes", lambda: _running_processes(nvml, calls, kind, handle)) or ():
            # A process doing both compute and graphics is in both lists, with the same memory figure.
            if proc.pid not in found:
                name, note = name_of(nvml, proc.pid)
                found[proc.pid] = GpuProcess(pid=proc.pid, name=name, used_memory_mib=_mib(proc.usedGpuMemory), name_note=note)
    return tuple(found.values())


def _process_name(nvml: Any, proc: str, pid: int, ours: dict[int, bool]) -> tuple[str, str | None]:
    """(name, note): the command line from /proc when that pid here is the GPU's process, else NVML's name.

    NVML reports host PIDs. Inside a container without the host PID namespace, /proc/PID is
    missing or is some other process; a process with a CUDA context maps /dev/nvidia*, which tells
    the two apart where /proc/PID/maps may be read.
    """
    base = os.path.join(proc, str(pid))
    note = None
    try:
        with open(os.path.join(base, "cmdline"), "rb") as f:
            argv = [a.decode("utf-8", errors="replace") for a in f.read(4096).split(b"\0") if a]
    except FileNotFoundError:
        argv, note = None, "no such pid here (exited, or a host pid outside this container)"
    except OSError:
        argv = None
    if argv and pid not in ours:
        ours[pid] = not _maps_no_gpu(base)
    if argv and not ours[pid]:
        argv, note = None, "the pid here is another process (a host pid outside this container)"
    if argv:
        return " ".join(argv)[:_NAME_MAX], None
    try:
        name = nvml.nvmlSystemGetProcessName(pid)
    except Exception:  # noqa: BLE001 - NVMLError, or a binding that lacks the call: the name stays unknown
        name = None
    if name:
        # NVML's name is the executable's path, from the driver: true even across PID namespaces.
        return _text(name)[:_NAME_MAX], note and "name from NVML; " + note
    return "?", note or "no name from /proc or NVML"


def _maps_no_gpu(base: str) -> bool:
    """True when /proc/PID/maps is readable and maps no NVIDIA device (so this is not the GPU's process)."""
    try:
        with open(os.path.join(base, "maps"), "rb") as f:
            return not any(b"/dev/nvidia" in line for line in f)
    except OSError:
        return False  # unreadable (another user's process): the name cannot be checked, keep it


def _mib(value: int | None) -> float | None:
    if value is None or value == _NOT_AVAILABLE:
        return None
    return value / _MIB


def _text(value: str | bytes) -> str:
    # Older bindings return C strings as bytes.
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value
