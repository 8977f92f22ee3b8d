"""Local NVIDIA GPU stats read through NVML, where "no GPU here" is a normal, calmly reported state."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any, Callable

from llmtop.snapshot import GpuProcess, GpuSnapshot, GpuStatus

INIT_RETRY_S = 30.0  # a machine without a driver will not grow one between two ticks

_MIB = 1024 * 1024
# NVML's "value not available" sentinel (unsigned -1); newer bindings map it to None, older ones pass it through.
_NOT_AVAILABLE = (1 << 64) - 1


class GpuReader:
    """Reads every local NVIDIA GPU into a GpuStatus, caching the result for `cache_s`.

    `read()` blocks on NVML and never raises; async callers use `read_async()`, which keeps
    NVML off the event loop and shares one in-flight read among concurrent callers.
    """

    def __init__(
        self,
        nvml: Any = None,
        clock: Callable[[], float] = time.monotonic,
        cache_s: float = 1.0,
    ) -> None:
        self._nvml = nvml  # None: import pynvml on first use
        self._clock = clock
        self._cache_s = cache_s
        # NVML init state and the cache are shared by whichever threads call read().
        self._lock = threading.Lock()
        self._initialised = False
        self._init_failure: tuple[float, GpuStatus] | None = None  # (clock time, status) of the last failed init
        self._cache: tuple[float, GpuStatus] | None = None  # (clock time, status) of the last real read
        self._in_flight: asyncio.Future[GpuStatus] | None = None

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

    async def read_async(self) -> GpuStatus:
        # The cache check touches no NVML, so a fresh hit needs no thread hop.
        cached = self._fresh_cache()
        if cached is not None:
            return cached
        if self._in_flight is None or self._in_flight.done():
            self._in_flight = asyncio.ensure_future(asyncio.to_thread(self.read))
        # shield: one caller being cancelled must not cancel the read the others are awaiting.
        return await asyncio.shield(self._in_flight)

    def close(self) -> None:
        """Shut NVML down; waits for a read in flight so NVML is never shut down under it."""
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
            return GpuStatus(message=f"GPU stats unavailable ({exc})")
        if count == 0:
            return GpuStatus(message="no NVIDIA GPU")
        gpus = []
        for index in range(count):
            try:
                gpus.append(_read_device(nvml, index))
            except nvml.NVMLError:
                # The device is lost (fell off the bus, mid-reset) or unreadable to us; the others still report.
                continue
        if not gpus:
            return GpuStatus(message=f"no readable NVIDIA GPU ({count} found, none answered)")
        return GpuStatus(gpus=tuple(gpus))

    def _ensure_init(self) -> GpuStatus | None:
        """Initialise NVML once; return None when ready, else the calm "no NVIDIA GPU" status."""
        if self._initialised:
            return None
        now = self._clock()
        if self._init_failure is not None and now - self._init_failure[0] < INIT_RETRY_S:
            return self._init_failure[1]
        reason = self._try_init()
        if reason is None:
            self._initialised = True
            self._init_failure = None
            return None
        status = GpuStatus(message=f"no NVIDIA GPU ({reason})")
        self._init_failure = (now, status)
        return status

    def _try_init(self) -> str | None:
        """Run nvmlInit; return None on success, else a short reason for the user."""
        if self._nvml is None:
            try:
                import pynvml
            except ImportError:
                return "nvidia-ml-py not installed"
            self._nvml = pynvml
        nvml = self._nvml
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            if exc.value == nvml.NVML_ERROR_LIBRARY_NOT_FOUND:
                return "NVML library not found"
            if exc.value == nvml.NVML_ERROR_DRIVER_NOT_LOADED:
                return "driver not loaded"
            return str(exc)
        return None


def _read_device(nvml: Any, index: int) -> GpuSnapshot:
    """Read one device; raises NVMLError only when the device itself is gone or unreachable."""
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    name = _optional(nvml, nvml.nvmlDeviceGetName, handle)
    util = _optional(nvml, nvml.nvmlDeviceGetUtilizationRates, handle)
    memory = _optional(nvml, nvml.nvmlDeviceGetMemoryInfo, handle)
    temperature = _optional(nvml, nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU)
    power_mw = _optional(nvml, nvml.nvmlDeviceGetPowerUsage, handle)
    limit_mw = _optional(nvml, nvml.nvmlDeviceGetEnforcedPowerLimit, handle)
    return GpuSnapshot(
        index=index,
        name=_text(name) if name is not None else f"GPU {index}",
        utilization_pct=float(util.gpu) if util is not None else None,
        memory_used_mib=_mib(memory.used) if memory is not None else None,
        memory_total_mib=_mib(memory.total) if memory is not None else None,
        temperature_c=float(temperature) if temperature is not None else None,
        power_w=power_mw / 1000 if power_mw is not None else None,
        power_limit_w=limit_mw / 1000 if limit_mw is not None else None,
        processes=_processes(nvml, handle),
    )


def _processes(nvml: Any, handle: Any) -> tuple[GpuProcess, ...]:
    found: dict[int, GpuProcess] = {}
    for getter in (nvml.nvmlDeviceGetComputeRunningProcesses, nvml.nvmlDeviceGetGraphicsRunningProcesses):
        for proc in _optional(nvml, getter, handle) or ():
            # A process doing both compute and graphics is in both lists, with the same memory figure.
            if proc.pid not in found:
                found[proc.pid] = GpuProcess(
                    pid=proc.pid,
                    name=_process_name(nvml, proc.pid),
                    used_memory_mib=_mib(proc.usedGpuMemory),
                )
    return tuple(found.values())


def _process_name(nvml: Any, pid: int) -> str:
    # comm is the short name the process gave itself (vLLM's "VLLM::EngineCore"), and costs no NVML call.
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as f:
            comm = f.read().strip()
        if comm:
            return comm
    except OSError:
        pass  # not Linux, the process just exited, or its pid is outside our PID namespace (NVML reports host pids)
    name = _optional(nvml, nvml.nvmlSystemGetProcessName, pid)
    if not name:
        return "?"
    # NVML gives the executable's full path; keep the basename, like comm.
    return os.path.basename(_text(name)) or "?"


def _optional(nvml: Any, getter: Callable[..., Any], *args: Any) -> Any:
    """One NVML reading, or None when that reading alone fails (e.g. power NOT_SUPPORTED on some boards).

    A lost GPU is re-raised, because then the whole device is gone rather than one field. Anything
    else the binding raises counts as that field failing: besides NVMLError it raises
    NVMLLibraryMismatchError when the driver predates a versioned call such as the process lists.
    """
    try:
        return getter(*args)
    except nvml.NVMLError as exc:
        if exc.value == nvml.NVML_ERROR_GPU_IS_LOST:
            raise
        return None
    except Exception:  # noqa: BLE001 - see docstring
        return None


def _mib(value: int | None) -> float | None:
    if value is None or value == _NOT_AVAILABLE:
        return None
    return value / _MIB


def _text(value: str | bytes) -> str:
    # Older bindings return C strings as bytes.
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value
