"""One backend in full: charts over time, served vs expected models, errors, breaker history, metrics, probe cost."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult, RenderResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, VerticalScroll
from textual.content import Content
from textual.screen import Screen
from textual.widgets import Footer, Static
from textual_plotext import PlotextPlot

from llmtop.snapshot import BackendSnapshot
from llmtop.tui import format as fmt
from llmtop.tui.messages import READ_ONLY_ACTIONS, AdminRequested, ProbeRequested
from llmtop.tui.view import FleetView
from llmtop.tui.widgets.too_small import BlindKeysOff, TooSmall

_CHARTS = (
    ("ttft", "TTFT (ms)", lambda b: b.ttft_history),
    ("tps", "decode tokens/s", lambda b: b.tps_history),
    ("latency", "health latency (ms)", lambda b: b.latency_history),
)
_LEVEL_COLOUR = {fmt.OK: "$text-success", fmt.WARN: "$text-warning", fmt.BAD: "$text-error", fmt.MUTED: "$foreground-muted"}
RAW_METRICS_SHOWN = 8
MODELS_SHOWN = 20  # served models listed by name; however many a backend serves, the rest are a count
CHART_DRIFT_S = 5.0  # redraw the charts at least this often, so "seconds ago" stays true
ERRORS_SHOWN = 8


class Chart(PlotextPlot):
    """A plotext chart whose text is built once per version of its data, size and theme (plotext's
    build is the costly part of this screen), and left blank while `pending`: the screen is shown
    first, its charts drawn just after."""

    def __init__(self, *, id: str, classes: str) -> None:
        super().__init__(id=id, classes=classes)
        self.pending = True
        self.version = 0  # bumped by whoever changes the plot
        self._built: tuple[tuple, RenderResult] | None = None

    def render(self) -> RenderResult:
        if self.pending:
            return Text("drawing…", style="dim")
        key = (self.version, self.size, self.app.theme)
        if self._built is None or self._built[0] != key:
            self._built = (key, super().render())
        return self._built[1]


def _y_range(values: list[float]) -> tuple[float, float]:
    """A y range with some air; a near-flat series sits mid-chart instead of on a scale of thousandths."""
    low, high = min(values), max(values)
    pad = max((high - low) * 0.1, abs(high) * 0.05, 1.0)
    return max(0.0, low - pad), high + pad


def _styled(cell: fmt.Cell) -> tuple[str, str]:
    return cell.text, _LEVEL_COLOUR.get(cell.level, "")


def _phases(p) -> str:
    """connect · TLS · first byte · first token, like curl's -w timings; a reused connection has no connect."""
    parts = []
    if p.connect_ms is not None:
        parts.append(f"connect {p.connect_ms:.1f}ms")
    if p.tls_ms is not None:
        parts.append(f"TLS {p.tls_ms:.1f}ms")
    if p.connect_ms is None and p.tls_ms is None:
        parts.append("reused connection")
    if p.ttfb_ms is not None:
        parts.append(f"first byte {p.ttfb_ms:.1f}ms")
    if p.ttft_ms is not None:
        parts.append(f"first token {p.ttft_ms:.1f}ms")
    return " · ".join(parts)


def _rows(pairs: list[tuple[str, str | Content | tuple[str, str]]]) -> Content:
    """Aligned "label  value" lines."""
    width = max((len(label) for label, _ in pairs), default=0)
    lines = [Content.assemble((f"{label:<{width}}  ", "$foreground-muted"), value) for label, value in pairs]
    return Content("\n").join(lines)


class DetailScreen(BlindKeysOff, Screen):
    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("p", "probe", "Probe"),
        Binding("d", "drain", "Drain"),
        Binding("t", "toggle", "On/off"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.backend = ""
        self._view: FleetView | None = None
        self._seq: int | None = None
        self._plotted: dict[str, tuple] = {}  # chart key -> history_mark of what it shows
        self._plotted_at = 0.0  # the "now" the x axes were last drawn against
        self._ready = False
        self._charts_pending = True  # drawn once the screen's first frame is out, not before it

    def compose(self) -> ComposeResult:
        yield TooSmall()
        yield Static(id="detail-head")
        with VerticalScroll(id="detail-body"):
            with Horizontal(id="charts"):
                for key, title, _ in _CHARTS:
                    plot = Chart(id=f"chart-{key}", classes="chart")
                    plot.border_title = title
                    yield plot
            with Grid(id="facts"):
                for key, title in (
                    ("probe", "probe"),
                    ("models", "models: served vs expected"),
                    ("breaker", "circuit breaker"),
                    ("metrics", "server metrics"),
                    ("errors", "last errors"),
                ):
                    panel = Static(id=f"fact-{key}", classes="fact")
                    panel.border_title = title
                    yield panel
        yield Footer(compact=True)

    def on_mount(self) -> None:
        # Nested widgets (charts, panels) mount after the screen does; until then a view is only kept.
        self.call_after_refresh(self._on_ready)

    def _on_ready(self) -> None:
        self._ready = True
        if self._view is not None:
            self.show_fleet(self._view)
        self.call_after_refresh(self._draw_charts)

    def on_screen_resume(self) -> None:
        if self._charts_pending and self._ready:
            self.call_after_refresh(self._draw_charts)

    def _draw_charts(self) -> None:
        """After the frame that shows the text: a key that opens details is answered before the
        charts cost anything."""
        if not self._charts_pending or not self._ready:
            return
        self._charts_pending = False
        for chart in self.query(Chart):
            chart.pending = False
            chart.refresh()
        if self._view is not None:
            self.show_fleet(self._view)

    def select(self, backend: str, view: FleetView) -> None:
        """Show this backend; the app keeps one DetailScreen and reuses it, since building one costs a visible moment.
        The same backend again keeps its charts as drawn (redrawn only if a point came or the axis drifted)."""
        if backend != self.backend:
            self._plotted.clear()
            self._plotted_at = 0.0
            self._charts_pending = True
            if self._ready:
                for chart in self.query(Chart):
                    chart.pending = True
                    chart.refresh()
        self.backend = backend
        self._seq = None
        if self._ready:
            self.query_one("#detail-body").scroll_home(animate=False)
        self.show_fleet(view)

    def show_fleet(self, view: FleetView) -> None:
        self._view = view
        if not self._ready:
            return
        b = view.fleet.backend(self.backend)
        if b is None:
            self.query_one("#detail-head", Static).update(
                Content.styled(f"{self.backend}: no longer in the config (Esc goes back)", "bold $text-error")
            )
            return
        self.query_one("#detail-head", Static).update(self._head(b, view))
        self.query_one("#fact-probe", Static).update(self._probe(b, view))  # holds the ticking "ago"
        if not self._charts_pending:
            self._plot(b, view.fleet.at)
        if b.seq == self._seq:
            return
        self._seq = b.seq
        self.query_one("#fact-models", Static).update(self._models(b))
        self.query_one("#fact-breaker", Static).update(self._breaker(b))
        self.query_one("#fact-metrics", Static).update(self._metrics(b))
        self.query_one("#fact-errors", Static).update(self._errors(b))

    def _plot(self, b: BackendSnapshot, now: float) -> None:
        """Plotting is the expensive part: only when a point was added, or when the x axis
        ("seconds ago") has drifted by more than a few seconds since it was drawn."""
        drifted = now - self._plotted_at >= CHART_DRIFT_S
        if drifted:
            self._plotted_at = now
        for key, _title, history in _CHARTS:
            points = history(b)
            mark = fmt.history_mark(points)
            if drifted or self._plotted.get(key) != mark:
                self._plotted[key] = mark
                self._chart(key, points, now)

    # -- keys -------------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        if action in READ_ONLY_ACTIONS and getattr(self.app, "read_only", False):
            return False  # --read-only hides the keys it turns off
        return super().check_action(action, parameters)

    def action_probe(self) -> None:
        self.post_message(ProbeRequested((self.backend,)))

    def action_drain(self) -> None:
        self.post_message(AdminRequested(self.backend, "drain"))

    def action_toggle(self) -> None:
        self.post_message(AdminRequested(self.backend, "toggle"))

    # -- parts ------------------------------------------------------------------------------

    def _head(self, b: BackendSnapshot, view: FleetView) -> Content:
        badge = fmt.PROBING if b.name in view.probing else fmt.STATUS_BADGES.get(b.status, fmt.Cell(b.status, fmt.MUTED))
        reason = f" ({b.status_reason})" if b.status_reason and b.status != "healthy" else ""
        first = Content.assemble(
            (b.name, "bold"),
            "  ",
            _styled(badge),
            (reason, _LEVEL_COLOUR.get(badge.level, "")),
            "  circuit ",
            _styled(fmt.circuit_badge(b)),
            "  admin ",
            _styled(fmt.admin_badge(b)),
        )
        version = f"  version {b.version}" if b.version else ""
        agent = f"  via agent {b.agent}" if b.agent else ""
        second = Content.styled(f"{b.provider}  {b.url}{version}{agent}", "$foreground-muted")
        lines = [first, second]
        if b.stale_since is not None:
            lines.append(Content.styled(
                f"◷ stale since {fmt.clock_time(b.stale_since)}: agent {b.agent} is lost; everything below is as it was then",
                "bold $text-warning",
            ))
        return Content("\n").join(lines)

    def _chart(self, key: str, history, now: float) -> None:
        widget = self.query_one(f"#chart-{key}", Chart)
        plt = widget.plt
        plt.clear_data()
        plt.clear_figure()
        if history:
            xs = [t - now for t, _ in history]
            ys = [v for _, v in history]
            plt.plot(xs, ys, marker="braille")
            plt.xlim(min(min(xs), -1.0), 0)  # "now" pinned at the right edge, however few the points
            low, high = _y_range(ys)
            ticks = [low + (high - low) * i / 4 for i in range(5)]
            plt.ylim(low, high)
            plt.yticks(ticks, [f"{t:.0f}" if high - low >= 10 else f"{t:.1f}" for t in ticks])
            plt.xlabel("seconds ago")
        else:
            plt.title("no data yet")
        widget.version += 1
        widget.refresh()

    def _probe(self, b: BackendSnapshot, view: FleetView) -> Content:
        now = view.fleet.at
        p = b.probe
        hourly = b.probe_tokens_per_hour + b.probe_input_tokens_per_hour
        if hourly:
            cost = f"{b.probe_tokens_per_hour:.0f} out + {b.probe_input_tokens_per_hour:.0f} in tokens/hour"
            if b.probe_cost_per_hour is not None:
                cost += f" ({b.probe_cost_per_hour:.4g}/hour)"
        else:
            cost = "none (not probing)"
        c = b.counters
        if c.probe_tokens or c.probe_input_tokens:  # since this llmtop started
            cost += f"; spent {c.probe_tokens} out + {c.probe_input_tokens} in"
            if b.probe_cost_per_hour is not None:
                cost += f" = {c.probe_cost:.4g}"
        rows: list = []
        if b.probe_note and b.admin == "active":
            rows.append(("probe", (b.probe_note, "$text-warning")))
        if p is None:
            rows.append(("last probe", ("none yet", "$foreground-muted")))
        else:
            tokens = "-" if p.output_tokens is None else f"{p.output_tokens}" + (" (estimated)" if p.tokens_estimated else "")
            current = b.figures_current(now)
            rows += [
                ("model", p.model or "-"),
                ("when", f"{fmt.age(now - p.at)} ago" + ("  (old: from before the backend's present state)" if p.ttft_ms is not None and not current else "")),
                ("TTFT", _styled(fmt.ttft_cell(b, view.settings.slow_ttft_ms, now))),
                ("tok/s", _styled(fmt.tps_cell(b, now))),
                ("output tokens", tokens),
                ("phases", _phases(p)),
            ]
            if p.untimed:
                rows.append(("timing", (p.untimed, "$text-warning")))
            if p.server_ttft_ms is not None:
                rows.append(("server TTFT", fmt.ms(p.server_ttft_ms)))
            if p.server_tokens_per_s is not None:
                rows.append(("server tok/s", f"{p.server_tokens_per_s:.1f}"))
            if p.load_ms is not None:
                rows.append(("model load", fmt.ms(p.load_ms)))
            if p.error:
                rows.append(("error", (p.error, "$text-error")))
        ttfts = [v for _, v in b.ttft_history]
        if ttfts:
            p50, p95 = fmt.percentile(ttfts, 0.5), fmt.percentile(ttfts, 0.95)
            rows.append(("TTFT p50 / p95", f"{fmt.ms(p50)} / {fmt.ms(p95)}  (last {len(ttfts)} probes)"))
        rows.append(("probe cost", cost))
        rows.append(("health latency", _styled(fmt.latency_cell(b))))
        for alert in b.alerts:
            rows.append(("alert", (f"▲ {alert}", "$text-warning")))
        if b.alerts_unknown:
            rows.append(("alert", (f"? {b.alerts_unknown}", "$text-warning")))
        return _rows(rows)

    def _models(self, b: BackendSnapshot) -> Content:
        lines: list[Content] = []
        if b.models is None:
            lines.append(Content.styled(f"? model list unknown: {b.models_error or 'not read'}", "$text-warning"))
        for model in b.expected_models:
            if b.models is None:
                lines.append(Content.styled(f"? {model}  (expected; served unknown)", "$foreground-muted"))
            elif model in b.missing_models:
                lines.append(Content.styled(f"✖ {model}  (expected, not served)", "$text-error"))
            else:
                lines.append(Content.styled(f"✓ {model}", "$text-success"))
        # Ollama serves "llama3.2" as "llama3.2:latest"; that is the expected model, not an extra one.
        expected = {m.removesuffix(":latest") for m in b.expected_models}
        served = b.models or ()
        extras = [m for m in served if m.removesuffix(":latest") not in expected]
        for model in extras[:MODELS_SHOWN]:
            lines.append(Content.styled(f"+ {model}  (served, not expected)", "$foreground-muted"))
        hidden = (b.models_total or len(served)) - len(served) + max(0, len(extras) - MODELS_SHOWN)
        if hidden > 0:
            lines.append(Content.styled(f"… and {hidden} more served", "$foreground-muted"))
        loaded = b.extra.get("loaded_models")
        if loaded is not None:
            shown = ", ".join(loaded[:MODELS_SHOWN]) + (f" … ({len(loaded)})" if len(loaded) > MODELS_SHOWN else "")
            lines.append(Content.styled(f"loaded now: {shown or 'none'}", "$foreground-muted"))
        if not lines:
            lines.append(Content.styled("none reported", "$foreground-muted"))
        return Content("\n").join(lines)

    def _breaker(self, b: BackendSnapshot) -> Content:
        rate = "-" if b.error_rate is None else f"{b.error_rate:.0%}"
        rows: list = [("state", _styled(fmt.circuit_badge(b))), ("error rate", rate)]
        retry_at = b.extra.get("circuit_retry_at")
        if retry_at is not None:
            rows.append(("next trial", fmt.clock_time(retry_at)))
        if b.retry_after_at is not None:
            rows.append(("rate limited until", fmt.clock_time(b.retry_after_at)))
        lines = [_rows(rows)]
        for at, before, after in b.breaker_history[-ERRORS_SHOWN:]:
            colour = "$text-error" if after == "open" else "$text-warning" if after == "half_open" else ""
            lines.append(Content.assemble((fmt.clock_time(at), "$foreground-muted"), f" {before} -> ", (after, colour)))
        if not b.breaker_history:
            lines.append(Content.styled("no transitions", "$foreground-muted"))
        return Content("\n").join(lines)

    def _metrics(self, b: BackendSnapshot) -> Content:
        m = b.metrics
        error = b.extra.get("metrics_error")
        if m is None:
            note = Content.styled(error or "no metrics endpoint read", "$foreground-muted")
            return Content("\n").join([note, *_gpu_lines(b, self._view)])
        rows: list = [
            ("running", fmt.NONE.text if m.requests_running is None else f"{m.requests_running:g}"),
            ("waiting", _styled(fmt.queue_cell(b))),
            ("KV cache", _styled(fmt.kv_cell(b))),
            ("server TTFT", fmt.ms(m.server_ttft_ms)),
            ("server tok/s", fmt.NONE.text if m.server_tokens_per_s is None else f"{m.server_tokens_per_s:.1f}"),
        ]
        for name in sorted(m.raw)[:RAW_METRICS_SHOWN]:
            rows.append((name, f"{m.raw[name]:g}"))
        if len(m.raw) > RAW_METRICS_SHOWN:
            rows.append(("", (f"… {len(m.raw) - RAW_METRICS_SHOWN} more series", "$foreground-muted")))
        if error:
            rows.append(("error", (error, "$text-error")))
        gpus = _gpu_lines(b, self._view)
        return Content("\n").join([_rows(rows), *gpus]) if gpus else _rows(rows)

    def _errors(self, b: BackendSnapshot) -> Content:
        if not b.recent_errors:
            return Content.styled("none", "$foreground-muted")
        lines = [
            Content.assemble((fmt.clock_time(at), "$foreground-muted"), " ", message)
            for at, message in reversed(b.recent_errors[-ERRORS_SHOWN:])
        ]
        return Content("\n").join(lines)


GPU_SPARK = 10  # cells of each GPU's utilization and memory history in details


def _gpu_lines(b: BackendSnapshot, view: FleetView | None) -> list[Content]:
    """The local GPUs this backend's server processes use (owners.py), two lines each: the GPU's
    own figures, then what this backend holds on it."""
    lines: list[Content] = []
    if view is None or b.agent is not None:  # an agent's GPUs are its own machine's
        return lines
    for g in view.fleet.gpu.gpus:
        mine = [p for p in (*g.processes, *(p for m in g.mig for p in m.processes)) if p.backend and b.name in p.backend.split(", ")]
        if not mine:
            continue
        used = sum(p.used_memory_mib or 0.0 for p in mine)
        util = "-" if g.utilization_pct is None else f"{g.utilization_pct:.0f}%"
        memory = "-" if g.memory_used_mib is None or not g.memory_total_mib else f"{g.memory_used_mib / 1024:.0f}/{g.memory_total_mib / 1024:.0f} GiB"
        pids = ", ".join(str(p.pid) for p in mine[:3]) + (f" +{len(mine) - 3}" if len(mine) > 3 else "")
        history = view.gpu_history
        lines.append(
            Content.assemble(
                (f"GPU {g.index} ", "bold"), f"{g.name.removeprefix('NVIDIA ')[:20]}: util {util} ",
                (fmt.spark(history.util(g.index), GPU_SPARK, low=0, high=100), "$text-accent"), f" mem {memory} ",
                (fmt.spark(history.memory(g.index), GPU_SPARK, low=0, high=1), "$text-accent"),
            )
        )
        lines.append(Content(f"  this backend {used / 1024:.1f} GiB (pid {pids})"))
    return lines
