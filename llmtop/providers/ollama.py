"""Ollama's native API: "Ollama is running" at /, /api/tags (downloaded), /api/ps (loaded), and an NDJSON /api/chat probe."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from typing import Any

from llmtop import inbound
from llmtop.health import served_matches
from llmtop.probe import HealthResult, ModelsResult, ProbeError, ProbeResult, StreamMeter
from llmtop.providers import register
from llmtop.providers.base import Adapter, CappedStream, ProbeChoice, iter_ndjson

# An expires_at further off than this is Ollama's keep_alive = -1 ("never unload"), sent back as -1.
FOREVER_S = 10 * 365 * 86400


@register
class Ollama(Adapter):
    provider = "ollama"
    health_path = "/"
    models_path = "/api/tags"
    ollama_names = True

    async def health(self) -> HealthResult:
        response = await self.request("GET", "/")
        if "ollama is running" not in response.text.lower():
            raise ProbeError(f"/: not an Ollama server; it answered: {response.text[:200]}")
        return HealthResult(ok=True, latency_ms=response.latency_ms)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._expires: dict[str, float] | None = None  # loaded model -> wall time Ollama unloads it; None: unknown

    async def models(self) -> ModelsResult:
        """Downloaded models are what it serves (it loads on demand); loaded ones come from /api/ps."""
        tags, ps = await asyncio.gather(self.request("GET", "/api/tags"), self._loaded())
        return ModelsResult(self.parse_models(tags.json("/api/tags")), extra={"loaded": ps})

    def parse_models(self, data: Any) -> tuple[str, ...]:
        try:
            return tuple(str(m.get("name") or m["model"]) for m in data["models"])
        except (KeyError, TypeError, AttributeError) as exc:
            raise ProbeError(f"/api/tags: unexpected shape (no models[].name: {exc})") from None

    async def _loaded(self) -> list[str] | None:
        """The models in memory now, and when each will be unloaded (kept for the probe's keep_alive)."""
        try:
            data = (await self.request("GET", "/api/ps")).json("/api/ps")
            entries = [m for m in data.get("models", []) if isinstance(m, dict)]
        except (ProbeError, AttributeError, TypeError):
            self._expires = None
            return None
        expires = {}
        for m in entries:
            name = str(m.get("name") or m.get("model"))
            at = _wall_time(m.get("expires_at"))
            if at is not None:
                expires[name] = at
        self._expires = expires
        return [str(m.get("name") or m.get("model")) for m in entries]

    def probe_model(self, served, loaded) -> ProbeChoice:
        """Only a loaded model, unless probe_unloaded: asking for one that is not loaded makes
        Ollama load it (seconds to minutes, memory taken from the models in use)."""
        backend = self.backend
        candidates = [backend.probe_model] if backend.probe_model else list(backend.models) or list(loaded or ())
        if not candidates and backend.probe_unloaded:
            candidates = list(served or ())
        if not candidates:
            if loaded is None:
                return ProbeChoice(None, "not probed: which models are loaded is unknown (/api/ps not read)")
            return ProbeChoice(None, "not probed: no model loaded", idle=True)
        if backend.probe_unloaded:
            return ProbeChoice(candidates[0])
        if loaded is None:
            return ProbeChoice(None, "not probed: which models are loaded is unknown (/api/ps not read)")
        for model in candidates:
            if served_matches(model, loaded, ollama=True):
                return ProbeChoice(model)
        return ProbeChoice(
            None, f"not probed: {candidates[0]} not loaded (probe_unloaded = true probes it anyway)", idle=True
        )

    def keep_alive(self, model: str, now: float | None = None) -> int | None:
        """The keep_alive that leaves the model's residency as it was: the seconds it had left
        (-1 if it was loaded for good), or 0 to unload it again if it was not loaded; None
        (Ollama's default) when what is loaded is unknown."""
        if self._expires is None:
            return None
        at = self._expires.get(model) or self._expires.get(f"{model}:latest")
        if at is None:
            return 0
        left = at - (time.time() if now is None else now)
        if left > FOREVER_S:
            return -1
        return max(0, round(left))

    async def probe(self, model: str | None) -> ProbeResult:
        if not model:
            return ProbeResult(None, ok=False, error="no model to probe: set models or probe_model in the config")
        body = {
            "model": model,
            "messages": self.probe_messages(),
            "stream": True,
            "options": {"num_predict": self.max_tokens, "temperature": 0},
        }
        keep_alive = self.keep_alive(model)
        if keep_alive is not None:
            # Every request resets a model's keep-alive; without this, probes would keep a model
            # in memory for ever (or leave one loaded that was not).
            body["keep_alive"] = keep_alive
        return await self.stream_probe("/api/chat", body, model, self.read_stream)

    async def read_stream(self, response: CappedStream, meter: StreamMeter) -> dict[str, Any]:
        server: dict[str, Any] = {}
        async for line in iter_ndjson(response):
            if meter.finished:
                continue
            obj = self.json_event(line, "POST /api/chat")
            if obj.get("error"):
                raise ProbeError(f"POST /api/chat: error in stream: {obj['error']}")
            message = obj.get("message")
            if isinstance(message, dict):
                content = message.get("content")
                text = content or message.get("thinking")
                meter.text(text if isinstance(text, str) else None, reasoning=not content)
            if obj.get("done"):
                meter.event()
                meter.finished = True
                meter.hit_limit = obj.get("done_reason") == "length"
                server = self._server_timings(obj, meter)
        if not meter.finished:
            raise ProbeError("POST /api/chat: stream ended without the final done:true object")
        return server

    @staticmethod
    def _server_timings(final: dict, meter: StreamMeter) -> dict[str, Any]:
        """Ollama's own counts and durations (nanoseconds), each checked where it enters (inbound.py)."""
        eval_count = inbound.count(final.get("eval_count"))
        if eval_count is not None:
            meter.usage(eval_count)
        meter.input_usage(inbound.count(final.get("prompt_eval_count")))
        out: dict[str, Any] = {}
        eval_s = inbound.duration_s(final.get("eval_duration"), 1e-9)
        if eval_count is not None and eval_count > 1 and eval_s:
            # A 1e-300 ns duration is finite, its rate is not: a rate is checked like any number in.
            rate = inbound.finite(eval_count / eval_s)
            if rate is not None:
                out["server_tokens_per_s"] = rate
        load_s = inbound.duration_s(final.get("load_duration"), 1e-9)
        prompt_s = inbound.duration_s(final.get("prompt_eval_duration"), 1e-9)
        if load_s is not None:
            out["load_ms"] = load_s * 1000.0
        if prompt_s is not None:
            out["server_ttft_ms"] = (prompt_s + (load_s or 0.0)) * 1000.0
        return out


def _wall_time(value: Any) -> float | None:
    """An RFC 3339 time from Ollama (nanosecond fractions, a zone offset) as a Unix time; None if unreadable."""
    if not isinstance(value, str) or len(value) > 64:
        return None
    text = value.strip().replace("Z", "+00:00")
    main, dot, rest = text.partition(".")
    if dot:  # Python reads at most microseconds: keep six digits of the fraction
        digits = len(rest) - len(rest.lstrip("0123456789"))
        text = f"{main}.{rest[:min(digits, 6)]}{rest[digits:]}"
    try:
        return datetime.fromisoformat(text).timestamp()
    except (ValueError, OverflowError, OSError):
        return None
