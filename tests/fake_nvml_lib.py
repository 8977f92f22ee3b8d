"""A stand-in for libnvidia-ml.so: C functions (ctypes callbacks) that the real pynvml bindings call.

`install(monkeypatch, driver)` puts a FakeDriver where pynvml keeps the loaded library
(`pynvml.nvmlLib`), so every reading goes through the real bindings: their symbol lookup and
cache, their structs and version fields, their pointer marshalling and their error mapping. The
driver answers as a real one would, down to the bytes it writes: a symbol the driver version does
not export is missing (`AttributeError`, as from a CDLL), a process entry is as long as that
driver writes it (16, 24, or 32 bytes on 535.43-535.86), and errors are NVML return codes.
"""

from __future__ import annotations

import ctypes
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import pynvml

GIB = 1 << 30
NOT_A_MIG_ID = 0xFFFFFFFF

# What each kind of driver exports. The names are the C symbols, as in libnvidia-ml.so.
BASE = frozenset(
    {
        "nvmlInit_v2",
        "nvmlInitWithFlags",
        "nvmlShutdown",
        "nvmlErrorString",
        "nvmlSystemGetDriverVersion",
        "nvmlSystemGetProcessName",
        "nvmlDeviceGetCount_v2",
        "nvmlDeviceGetHandleByIndex_v2",
        "nvmlDeviceGetName",
        "nvmlDeviceGetUUID",
        "nvmlDeviceGetMemoryInfo",
        "nvmlDeviceGetUtilizationRates",
        "nvmlDeviceGetTemperature",
        "nvmlDeviceGetPowerUsage",
        "nvmlDeviceGetEnforcedPowerLimit",
        "nvmlDeviceGetComputeRunningProcesses",
        "nvmlDeviceGetGraphicsRunningProcesses",
    }
)
MIG = frozenset(
    {
        "nvmlDeviceGetMigMode",
        "nvmlDeviceGetMaxMigDeviceCount",
        "nvmlDeviceGetMigDeviceHandleByIndex",
        "nvmlDeviceIsMigDeviceHandle",
        "nvmlDeviceGetGpuInstanceId",
        "nvmlDeviceGetComputeInstanceId",
    }
)
V2_PROCESSES = frozenset({"nvmlDeviceGetComputeRunningProcesses_v2", "nvmlDeviceGetGraphicsRunningProcesses_v2"})
V3_PROCESSES = frozenset({"nvmlDeviceGetComputeRunningProcesses_v3", "nvmlDeviceGetGraphicsRunningProcesses_v3"})

# (exported symbols, bytes per process entry) by driver branch.
DRIVERS: dict[str, tuple[frozenset[str], int]] = {
    "418": (BASE, 16),  # before MIG and before the versioned process calls
    "470": (BASE | MIG | V2_PROCESSES, 24),
    # 535.43-535.86 shipped _v3 with a 32-byte entry (usedGpuCcProtectedMemory), later reverted.
    "535.54": (BASE | MIG | V2_PROCESSES | V3_PROCESSES | {"nvmlDeviceGetMemoryInfo_v2", "nvmlDeviceGetConfComputeMemSizeInfo"}, 32),
    "535.98": (BASE | MIG | V2_PROCESSES | {"nvmlDeviceGetMemoryInfo_v2", "nvmlDeviceGetConfComputeMemSizeInfo"}, 24),
    "550": (
        BASE | MIG | V2_PROCESSES | V3_PROCESSES
        | {"nvmlDeviceGetMemoryInfo_v2", "nvmlDeviceGetConfComputeMemSizeInfo", "nvmlDeviceGetRunningProcessDetailList", "nvmlDeviceGetTemperatureV"},
        24,
    ),
}


@dataclass
class FakeProcess:
    pid: int
    used: int | None  # bytes; None: the driver reports "not available" (unsigned -1)
    gpu_instance_id: int = NOT_A_MIG_ID
    compute_instance_id: int = NOT_A_MIG_ID


@dataclass
class FakeMigDevice:
    gpu_instance_id: int
    compute_instance_id: int
    name: str = "NVIDIA A100-SXM4-80GB MIG 3g.40gb"
    mem_total: int = 40 * GIB
    mem_used: int = 10 * GIB
    mem_reserved: int = 0
    compute: list[FakeProcess] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)  # C symbol -> NVML return code for this MIG device


@dataclass
class FakeDevice:
    name: str = "NVIDIA H100 80GB HBM3"
    uuid: str = "GPU-4b3f1d7e-0000-0000-0000-000000000000"
    util_gpu: int = 87
    util_memory: int = 40
    mem_total: int = 80 * GIB
    mem_used: int = 40 * GIB  # what nvidia-smi shows: the _v2 call's `used`
    mem_reserved: int = 512 * (1 << 20)  # set aside by the driver; the old call counts it as used
    temperature: int = 61
    power_mw: int = 312_500
    limit_mw: int = 700_000
    compute: list[FakeProcess] = field(default_factory=list)
    graphics: list[FakeProcess] = field(default_factory=list)
    mig: list[FakeMigDevice] | None = None  # None: MIG mode off; a list: MIG enabled, these instances
    mig_capable: bool = True  # False: nvmlDeviceGetMigMode answers NOT_SUPPORTED
    errors: dict[str, int] = field(default_factory=dict)  # C symbol -> NVML return code for this device's own handle


def _mem_v1(total: int, used: int, reserved: int) -> bytes:
    # The old call folds the reserved memory into `used`, as drivers do.
    return bytes((ctypes.c_ulonglong * 3)(total, total - used - reserved, used + reserved))


class FakeDriver:
    """One machine's NVML: its devices, its driver branch, and what to fail or stall."""

    def __init__(
        self,
        devices: list[FakeDevice] | None = None,
        branch: str = "550",
        *,
        init_error: int | None = None,
        process_names: dict[int, str] | None = None,
        missing: set[str] = frozenset(),
    ) -> None:
        exports, entry_size = DRIVERS[branch]
        self.devices = list(devices) if devices is not None else [FakeDevice()]
        self.branch = branch
        self.exports = set(exports) - set(missing)
        self.entry_size = entry_size
        self.init_error = init_error
        self.process_names = process_names or {}
        self.errors: dict[str, int] = {}  # C symbol -> return code, for every device (and global calls)
        self.calls: Counter[str] = Counter()
        self.threads: set[int] = set()
        self.entered: dict[str, threading.Event] = {}  # set when that symbol is called
        self.stalls: dict[str, threading.Event] = {}  # that symbol waits until the event is set
        self.initialised = 0
        self._functions: dict[str, Any] = {}
        self._strings: dict[int, ctypes.Array] = {}

    # -- the library object pynvml sees -----------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        # Only the C symbols get here (the instance's own attributes are found first).
        exports = self.__dict__.get("exports", ())
        if name not in exports or name not in _SIGNATURES:
            raise AttributeError(f"undefined symbol: {name}")
        functions = self.__dict__["_functions"]
        if name not in functions:
            restype, *argtypes = _SIGNATURES[name]
            # One implementation serves a call's versions whose arguments are laid out alike.
            impl = getattr(self, "_c_" + name, None) or getattr(self, "_c_" + name[:-3])
            functions[name] = ctypes.CFUNCTYPE(restype, *argtypes)(self._wrap(name, impl))
        return functions[name]

    def watch(self, name: str) -> threading.Event:
        """An event set when `name` is next called."""
        self.entered[name] = threading.Event()
        return self.entered[name]

    def stall(self, name: str) -> threading.Event:
        """Make `name` block until the returned event is set; `entered[name]` says when it has begun."""
        self.stalls[name] = threading.Event()
        self.entered[name] = threading.Event()
        return self.stalls[name]

    def _wrap(self, name: str, impl: Callable[..., int]) -> Callable[..., int]:
        def call(*args: Any) -> int:
            self.calls[name] += 1
            self.threads.add(threading.get_ident())
            if name in self.entered:
                self.entered[name].set()
            if name in self.stalls:
                self.stalls[name].wait()
            if name in self.errors:
                return self.errors[name]
            return impl(*args)

        return call

    # -- helpers ---------------------------------------------------------------------------

    def _device(self, handle: int | None) -> tuple[FakeDevice | None, FakeMigDevice | None]:
        if not handle:
            return None, None
        index, mig = divmod(handle, 0x1000)
        index -= 1
        if not 0 <= index < len(self.devices):
            return None, None
        device = self.devices[index]
        if mig == 0:
            return device, None
        instances = device.mig or []
        j = mig // 0x10 - 1
        return (device, instances[j]) if 0 <= j < len(instances) else (None, None)

    def _check(self, name: str, handle: int | None) -> tuple[int, FakeDevice | None, FakeMigDevice | None]:
        if not self.initialised:
            return pynvml.NVML_ERROR_UNINITIALIZED, None, None
        device, mig = self._device(handle)
        if device is None:
            return pynvml.NVML_ERROR_INVALID_ARGUMENT, None, None
        errors = device.errors if mig is None else mig.errors
        if name in errors:
            return errors[name], device, mig
        return pynvml.NVML_SUCCESS, device, mig

    @staticmethod
    def _put(address: int, ctype: Any, value: Any) -> None:
        ctype.from_address(address).value = value

    @staticmethod
    def _put_text(address: int, size: int, text: str) -> int:
        data = text.encode()
        if len(data) + 1 > size:
            return pynvml.NVML_ERROR_INSUFFICIENT_SIZE
        ctypes.memmove(address, data + b"\0", len(data) + 1)
        return pynvml.NVML_SUCCESS

    # -- the C functions -------------------------------------------------------------------

    def _c_nvmlInitWithFlags(self, flags: int) -> int:
        if self.init_error is not None:
            return self.init_error
        self.initialised += 1
        return pynvml.NVML_SUCCESS

    def _c_nvmlInit(self) -> int:
        return self._c_nvmlInitWithFlags(0)

    def _c_nvmlShutdown(self) -> int:
        if not self.initialised:
            return pynvml.NVML_ERROR_UNINITIALIZED
        self.initialised -= 1
        return pynvml.NVML_SUCCESS

    def _c_nvmlErrorString(self, code: int) -> int:
        if code not in self._strings:
            text = pynvml.NVMLError._errcode_to_string.get(code, f"Unknown code {code}")
            self._strings[code] = ctypes.create_string_buffer(text.encode())
        return ctypes.addressof(self._strings[code])

    def _c_nvmlSystemGetDriverVersion(self, buf: int, size: int) -> int:
        return self._put_text(buf, size, {"418": "418.226.00", "470": "470.256.02", "535.54": "535.54.03", "535.98": "535.98", "550": "550.127.05"}[self.branch])

    def _c_nvmlSystemGetProcessName(self, pid: int, buf: int, size: int) -> int:
        if pid not in self.process_names:
            return pynvml.NVML_ERROR_NOT_FOUND
        return self._put_text(buf, size, self.process_names[pid])

    def _c_nvmlDeviceGetCount_v2(self, out: int) -> int:
        if not self.initialised:
            return pynvml.NVML_ERROR_UNINITIALIZED
        self._put(out, ctypes.c_uint, len(self.devices))
        return pynvml.NVML_SUCCESS

    def _c_nvmlDeviceGetHandleByIndex_v2(self, index: int, out: int) -> int:
        if not self.initialised:
            return pynvml.NVML_ERROR_UNINITIALIZED
        if index >= len(self.devices):
            return pynvml.NVML_ERROR_INVALID_ARGUMENT
        code = self.devices[index].errors.get("nvmlDeviceGetHandleByIndex_v2")
        if code is not None:
            return code
        self._put(out, ctypes.c_void_p, 0x1000 * (index + 1))
        return pynvml.NVML_SUCCESS

    def _c_nvmlDeviceGetName(self, handle: int, buf: int, size: int) -> int:
        code, device, mig = self._check("nvmlDeviceGetName", handle)
        return code or self._put_text(buf, size, (mig or device).name)

    def _c_nvmlDeviceGetUUID(self, handle: int, buf: int, size: int) -> int:
        code, device, mig = self._check("nvmlDeviceGetUUID", handle)
        uuid = device.uuid if mig is None else f"MIG-{device.uuid[4:-4]}{mig.gpu_instance_id:02d}{mig.compute_instance_id:02d}"
        return code or self._put_text(buf, size, uuid)

    def _c_nvmlDeviceGetMemoryInfo(self, handle: int, out: int) -> int:
        code, device, mig = self._check("nvmlDeviceGetMemoryInfo", handle)
        if code:
            return code
        src = mig or device
        ctypes.memmove(out, _mem_v1(src.mem_total, src.mem_used, src.mem_reserved), 24)
        return pynvml.NVML_SUCCESS

    def _c_nvmlDeviceGetMemoryInfo_v2(self, handle: int, out: int) -> int:
        code, device, mig = self._check("nvmlDeviceGetMemoryInfo_v2", handle)
        if code:
            return code
        memory = pynvml.c_nvmlMemory_v2_t.from_address(out)
        if memory.version != pynvml.nvmlMemory_v2:
            return pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH
        src = mig or device
        memory.total, memory.reserved, memory.used = src.mem_total, src.mem_reserved, src.mem_used
        memory.free = src.mem_total - src.mem_used - src.mem_reserved
        return pynvml.NVML_SUCCESS

    def _c_nvmlDeviceGetUtilizationRates(self, handle: int, out: int) -> int:
        code, device, mig = self._check("nvmlDeviceGetUtilizationRates", handle)
        if code:
            return code
        if mig is not None or device.mig is not None:
            return pynvml.NVML_ERROR_NOT_SUPPORTED  # as on real MIG-enabled GPUs
        util = pynvml.c_nvmlUtilization_t.from_address(out)
        util.gpu, util.memory = device.util_gpu, device.util_memory
        return pynvml.NVML_SUCCESS

    def _c_nvmlDeviceGetTemperature(self, handle: int, sensor: int, out: int) -> int:
        code, device, _ = self._check("nvmlDeviceGetTemperature", handle)
        if code:
            return code
        if sensor != pynvml.NVML_TEMPERATURE_GPU:
            return pynvml.NVML_ERROR_INVALID_ARGUMENT
        self._put(out, ctypes.c_uint, device.temperature)
        return pynvml.NVML_SUCCESS

    def _c_nvmlDeviceGetTemperatureV(self, handle: int, out: int) -> int:
        code, device, _ = self._check("nvmlDeviceGetTemperatureV", handle)
        if code:
            return code
        temp = pynvml.c_nvmlTemperature_v1_t.from_address(out)
        if temp.version != pynvml.nvmlTemperature_v1 or temp.sensorType != pynvml.NVML_TEMPERATURE_GPU:
            return pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH
        temp.temperature = device.temperature
        return pynvml.NVML_SUCCESS

    def _c_nvmlDeviceGetPowerUsage(self, handle: int, out: int) -> int:
        code, device, _ = self._check("nvmlDeviceGetPowerUsage", handle)
        if not code:
            self._put(out, ctypes.c_uint, device.power_mw)
        return code

    def _c_nvmlDeviceGetEnforcedPowerLimit(self, handle: int, out: int) -> int:
        code, device, _ = self._check("nvmlDeviceGetEnforcedPowerLimit", handle)
        if not code:
            self._put(out, ctypes.c_uint, device.limit_mw)
        return code

    def _processes(self, name: str, handle: int, count_out: int, infos: int | None, graphics: bool) -> int:
        code, device, mig = self._check(name, handle)
        if code:
            return code
        if mig is not None:
            found = [] if graphics else mig.compute
        elif device.mig is not None and not graphics:
            found = [p for m in device.mig for p in m.compute]  # the aggregate (a privileged caller's view)
        else:
            found = device.graphics if graphics else device.compute
        capacity = ctypes.c_uint.from_address(count_out)
        if infos is None or capacity.value < len(found):
            capacity.value = len(found)
            return pynvml.NVML_ERROR_INSUFFICIENT_SIZE if found else pynvml.NVML_SUCCESS
        for i, p in enumerate(found):
            used = (1 << 64) - 1 if p.used is None else p.used
            if self.entry_size == 16:
                entry = bytes(ctypes.c_uint(p.pid)) + b"\0" * 4 + bytes(ctypes.c_ulonglong(used))
            else:
                entry = bytes(pynvml.c_nvmlProcessInfo_v2_t(p.pid, used, p.gpu_instance_id, p.compute_instance_id))
                entry += bytes(ctypes.c_ulonglong(0)) * ((self.entry_size - 24) // 8)  # usedGpuCcProtectedMemory
            ctypes.memmove(infos + i * self.entry_size, entry, self.entry_size)
        capacity.value = len(found)
        return pynvml.NVML_SUCCESS

    def _c_nvmlDeviceGetComputeRunningProcesses(self, handle: int, count_out: int, infos: int | None) -> int:
        return self._processes("nvmlDeviceGetComputeRunningProcesses", handle, count_out, infos, graphics=False)

    def _c_nvmlDeviceGetGraphicsRunningProcesses(self, handle: int, count_out: int, infos: int | None) -> int:
        return self._processes("nvmlDeviceGetGraphicsRunningProcesses", handle, count_out, infos, graphics=True)

    def _c_nvmlDeviceGetMigMode(self, handle: int, current: int, pending: int) -> int:
        code, device, mig = self._check("nvmlDeviceGetMigMode", handle)
        if code:
            return code
        if mig is not None or not device.mig_capable:
            return pynvml.NVML_ERROR_NOT_SUPPORTED
        mode = pynvml.NVML_DEVICE_MIG_ENABLE if device.mig is not None else pynvml.NVML_DEVICE_MIG_DISABLE
        self._put(current, ctypes.c_uint, mode)
        self._put(pending, ctypes.c_uint, mode)
        return pynvml.NVML_SUCCESS

    def _c_nvmlDeviceGetMaxMigDeviceCount(self, handle: int, out: int) -> int:
        code, device, _ = self._check("nvmlDeviceGetMaxMigDeviceCount", handle)
        if not code:
            self._put(out, ctypes.c_uint, 7 if device.mig_capable else 0)
        return code

    def _c_nvmlDeviceGetMigDeviceHandleByIndex(self, handle: int, index: int, out: int) -> int:
        code, device, _ = self._check("nvmlDeviceGetMigDeviceHandleByIndex", handle)
        if code:
            return code
        if device.mig is None or index >= len(device.mig):
            return pynvml.NVML_ERROR_NOT_FOUND
        self._put(out, ctypes.c_void_p, handle + 0x10 * (index + 1))
        return pynvml.NVML_SUCCESS

    def _c_nvmlDeviceIsMigDeviceHandle(self, handle: int, out: int) -> int:
        code, _, mig = self._check("nvmlDeviceIsMigDeviceHandle", handle)
        if not code:
            self._put(out, ctypes.c_uint, int(mig is not None))
        return code

    def _c_nvmlDeviceGetGpuInstanceId(self, handle: int, out: int) -> int:
        code, _, mig = self._check("nvmlDeviceGetGpuInstanceId", handle)
        if not code and mig is None:
            return pynvml.NVML_ERROR_NOT_SUPPORTED
        if not code:
            self._put(out, ctypes.c_uint, mig.gpu_instance_id)
        return code

    def _c_nvmlDeviceGetComputeInstanceId(self, handle: int, out: int) -> int:
        code, _, mig = self._check("nvmlDeviceGetComputeInstanceId", handle)
        if not code and mig is None:
            return pynvml.NVML_ERROR_NOT_SUPPORTED
        if not code:
            self._put(out, ctypes.c_uint, mig.compute_instance_id)
        return code

    def _c_nvmlDeviceGetConfComputeMemSizeInfo(self, handle: int, out: int) -> int:
        return pynvml.NVML_ERROR_NOT_SUPPORTED

    def _c_nvmlDeviceGetRunningProcessDetailList(self, handle: int, out: int) -> int:
        return pynvml.NVML_ERROR_NOT_SUPPORTED


_I, _U, _P = ctypes.c_int, ctypes.c_uint, ctypes.c_void_p
_SIGNATURES: dict[str, tuple[Any, ...]] = {
    "nvmlInit_v2": (_I,),
    "nvmlInitWithFlags": (_I, _U),
    "nvmlShutdown": (_I,),
    "nvmlErrorString": (_P, _I),  # const char*; pynvml sets restype = c_char_p on the pointer
    "nvmlSystemGetDriverVersion": (_I, _P, _U),
    "nvmlSystemGetProcessName": (_I, _U, _P, _U),
    "nvmlDeviceGetCount_v2": (_I, _P),
    "nvmlDeviceGetHandleByIndex_v2": (_I, _U, _P),
    "nvmlDeviceGetName": (_I, _P, _P, _U),
    "nvmlDeviceGetUUID": (_I, _P, _P, _U),
    "nvmlDeviceGetMemoryInfo": (_I, _P, _P),
    "nvmlDeviceGetMemoryInfo_v2": (_I, _P, _P),
    "nvmlDeviceGetUtilizationRates": (_I, _P, _P),
    "nvmlDeviceGetTemperature": (_I, _P, _U, _P),
    "nvmlDeviceGetTemperatureV": (_I, _P, _P),
    "nvmlDeviceGetPowerUsage": (_I, _P, _P),
    "nvmlDeviceGetEnforcedPowerLimit": (_I, _P, _P),
    "nvmlDeviceGetMigMode": (_I, _P, _P, _P),
    "nvmlDeviceGetMaxMigDeviceCount": (_I, _P, _P),
    "nvmlDeviceGetMigDeviceHandleByIndex": (_I, _P, _U, _P),
    "nvmlDeviceIsMigDeviceHandle": (_I, _P, _P),
    "nvmlDeviceGetGpuInstanceId": (_I, _P, _P),
    "nvmlDeviceGetComputeInstanceId": (_I, _P, _P),
    "nvmlDeviceGetConfComputeMemSizeInfo": (_I, _P, _P),
    "nvmlDeviceGetRunningProcessDetailList": (_I, _P, _P),
}
for _kind in ("Compute", "Graphics"):
    for _suffix in ("", "_v2", "_v3"):
        _SIGNATURES[f"nvmlDevice{_kind}RunningProcesses{_suffix}".replace("Device", "DeviceGet")] = (_I, _P, _P, _P)


def install(monkeypatch: Any, driver: FakeDriver) -> FakeDriver:
    """Load `driver` as pynvml's library, with pynvml's symbol cache and refcount fresh for it.

    First, an earlier test's GpuReader.close() must have finished: its shutdown runs on a thread
    of its own, and one still running would take pynvml's refcount from this test's init and
    shut this driver down under the test (seen on a loaded machine: a read with no GPUs)."""
    for thread in threading.enumerate():
        if thread.name == "llmtop-nvml-shutdown":
            thread.join(10)
    monkeypatch.setattr(pynvml, "nvmlLib", driver)
    monkeypatch.setattr(pynvml, "_nvmlGetFunctionPointer_cache", {})
    monkeypatch.setattr(pynvml, "_nvmlLib_refcount", 0)
    return driver
