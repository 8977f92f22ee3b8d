"""Local GPUs from NVML: utilization with a short history, memory, temperature, power, and the backends each serves; calm when there are none."""

from __future__ import annotations

from textual.content import Content
from textual.widget import Widget

from llmtop.snapshot import GpuSnapshot, GpuStatus
from llmtop.tui import format as fmt
from llmtop.tui.view import GPU_HISTORY, GpuHistory

HISTORY = GPU_HISTORY
WIDE = 72  # from this width one GPU fits on one line
# Only heat gets a colour: full utilization is a busy server doing its job, and vLLM reserves
# about 90% of GPU memory up front, so neither is an alarm. Most data-centre GPUs throttle near 85-90°C.
TEMP_WARN_C, TEMP_BAD_C = 83.0, 90.0


def _temperature_colour(temp: float | None) -> str:
    if temp is None:
        return "$foreground-muted"
    return "$text-error" if temp >= TEMP_BAD_C else "$text-warning" if temp >= TEMP_WARN_C else ""


def _short_name(name: str) -> str:
    return name.removeprefix("NVIDIA ").removeprefix("GeForce ")[:16]


class GpuPanel(Widget):
    """Renders the latest GpuStatus, with each GPU's utilization history (the app's GpuHistory)."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._status: GpuStatus = GpuStatus(message="GPU not read yet")
        self._history = GpuHistory()

    def show(self, status: GpuStatus, history: GpuHistory | None = None) -> None:
        if history is not None:
            self._history = history
        else:
            self._history.add(status)
        if status is self._status:  # the engine replaces the object on each NVML read
            return
        if not status.gpus and status.message == self._status.message and not self._status.gpus:
            return  # still no GPU: nothing to redraw
        # Only a change in the number of GPUs changes this panel's height; a re-layout costs a full screen.
        relayout = len(status.gpus) != len(self._status.gpus) or bool(status.gpus) != bool(self._status.gpus)
        self._status = status
        title = f"GPUs ({len(status.gpus)})" if status.gpus else "GPU"
        if title != self.border_title:
            self.border_title = title
        self.refresh(layout=relayout)

    def render(self) -> Content:
        status = self._status
        if not status.gpus:
            return Content.styled(status.message or "no NVIDIA GPU", "$foreground-muted")
        width = self.content_size.width
        lines = [
            self._problem(gpu, width >= WIDE) if gpu.problem is not None else self._line(gpu, width) if width >= WIDE else self._two_lines(gpu, width)
            for gpu in status.gpus
        ]
        return Content("\n").join(lines)

    @staticmethod
    def _problem(gpu: GpuSnapshot, wide: bool) -> Content:
        # As many lines as a readable GPU takes: a GPU lost or back changes no layout.
        line = Content.styled(f"{gpu.index} GPU {gpu.index}: {gpu.problem}", "$text-error")
        return line if wide else Content("\n").join([line, Content("")])

    def _parts(self, gpu: GpuSnapshot) -> dict[str, Content]:
        util = gpu.utilization_pct
        used, total = gpu.memory_used_mib, gpu.memory_total_mib
        mem_fraction = used / total if used is not None and total else None
        temp, power, limit = gpu.temperature_c, gpu.power_w, gpu.power_limit_w
        util_text = "util   -" if util is None else f"util {util:3.0f}%"
        mem_text = "mem -" if mem_fraction is None else f"mem {mem_fraction:4.0%} {used / 1024:.1f}/{total / 1024:.0f}G"
        temp_text = "  -°C" if temp is None else f"{temp:3.0f}°C"
        power_text = "-" if power is None else f"{power:.0f}/{limit:.0f}W" if limit else f"{power:.0f}W"
        return {
            "name": Content.styled(f"{gpu.index} {_short_name(gpu.name):<16}", "bold"),
            "util": Content(util_text),
            "mem": Content(mem_text),
            "temp": Content.styled(temp_text + ("!" if temp is not None and temp >= TEMP_BAD_C else ""), _temperature_colour(temp)),
            "power": Content(power_text),
        }

    def _spark(self, gpu: GpuSnapshot, width: int) -> Content:
        return Content.styled(fmt.spark(self._history.util(gpu.index), width, low=0, high=100), "$text-accent")

    def _line(self, gpu: GpuSnapshot, width: int) -> Content:
        p = self._parts(gpu)
        fixed = Content("  ").join([p["mem"], p["temp"], p["power"]])
        head = Content(" ").join([p["name"], p["util"]])
        served = _served(gpu)
        # The backends served get what the sparkline can spare beyond 20 cells.
        spare = width - head.cell_length - fixed.cell_length - 4
        served_text = _fit(served, max(0, spare - 20 - 2)) if served else ""
        room = min(HISTORY, spare - (len(served_text) + 2 if served_text else 0))
        parts = [head, self._spark(gpu, room), " ", fixed]
        if served_text:
            parts += [" ", Content.styled(served_text, "$text-accent")]
        return Content(" ").join(parts)

    def _two_lines(self, gpu: GpuSnapshot, width: int) -> Content:
        p = self._parts(gpu)
        first = Content("  ").join([p["name"], p["temp"], p["power"]])
        served = _served(gpu)
        if served:
            served_text = _fit(served, width - first.cell_length - 2)
            if served_text:
                first = Content("  ").join([first, Content.styled(served_text, "$text-accent")])
        room = min(HISTORY, width - p["util"].cell_length - p["mem"].cell_length - 6)
        second = Content(" ").join(["", p["util"], self._spark(gpu, room), p["mem"]])
        return Content("\n").join([first, second])


def _served(gpu: GpuSnapshot) -> list[str]:
    """The configured backends whose processes use this GPU (its MIG instances included), with
    their memory on it: ["gpu1-vllm 60G"]; processes of no known backend are left to details."""
    memory: dict[str, float] = {}
    for process in (*gpu.processes, *(p for m in gpu.mig for p in m.processes)):
        if process.backend:
            memory[process.backend] = memory.get(process.backend, 0.0) + (process.used_memory_mib or 0.0)
    return [f"{name} {mib / 1024:.0f}G" if mib else name for name, mib in memory.items()]


def _fit(items: list[str], room: int) -> str:
    """As many items as fit in `room` cells, then "+N" for the rest; "" when not even that fits."""
    for shown in range(len(items), 0, -1):
        text = ", ".join(items[:shown]) + (f" +{len(items) - shown}" if shown < len(items) else "")
        if len(text) <= room:
            return text
    return f"+{len(items)}" if len(f"+{len(items)}") <= room else ""
