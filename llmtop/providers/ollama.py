"""Ollama's native API: "Ollama is running" at /, /api/tags (downloaded), /api/ps (loaded), and an NDJSON /api/chat probe."""

from __future__ import annotations

import asyncio
from typing import Any


from llmtop.probe import HealthResult, ModelsResult, ProbeError, ProbeResult, StreamMeter
from llmtop.providers import register
from llmtop.providers.base import PROBE_PROMPT, Adapter, CappedStream, iter_ndjson


@register
class Ollama(Adapter):
    provider = "ollama"
    health_path = "/"
    models_path = "/api/tags"
    ollama_names = True

    async def health(self) -> HealthResult:
        response = await self.request("GET", "/")
        if "ollama is running" not in response.text.lower():
            raise ProbeError(f"/: not an Ollama server (answered {response.text[:40]!r})")
        return HealthResult(ok=True, latency_ms=response.latency_ms)

    async def models(self) -> ModelsResult:
        """Downloaded models are what it serves (it loads on demand); loaded ones come from /api/ps."""
        tags, ps = await asyncio.gather(self.request("GET", "/api/tags"), self._loaded())
        data = tags.json("/api/tags")
        try:
            names = tuple(str(m.get("name") or m["model"]) for m in data["models"])
        except (KeyError, TypeError, AttributeError) as exc:
            raise ProbeError(f"/api/tags: unexpected shape (no models[].name: {exc})") from None
        return ModelsResult(names, extra={"loaded": ps})

    async def _loaded(self) -> list[str] | None:
        try:
            data = (await self.request("GET", "/api/ps")).json("/api/ps")
            return [str(m.get("name") or m.get("model")) for m in data.get("models", [])]
        except (ProbeError, AttributeError, TypeError):
            return None

    async def probe(self, model: str | None) -> ProbeResult:
        if not model:
            return ProbeResult(None, ok=False, error="no model to probe: set models or probe_model in the config")
        body = {
            "model": model,
            "messages": [{"role": "user", "content": PROBE_PROMPT}],
            "stream": True,
            "options": {"num_predict": self.max_tokens, "temperature": 0},
        }
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
                text = message.get("content") or message.get("thinking")
                meter.text(text if isinstance(text, str) else None)
            if obj.get("done"):
                meter.finished = True
                server = self._server_timings(obj, meter)
        if not meter.finished:
            raise ProbeError("POST /api/chat: stream ended without the final done:true object")
        return server

    @staticmethod
    def _server_timings(final: dict, meter: StreamMeter) -> dict[str, Any]:
        if isinstance(final.get("eval_count"), int):
            meter.usage(final["eval_count"])
        out: dict[str, Any] = {}
        eval_count, eval_ns = final.get("eval_count"), final.get("eval_duration")
        if isinstance(eval_count, int) and isinstance(eval_ns, (int, float)) and eval_ns > 0 and eval_count > 1:
            out["server_tokens_per_s"] = eval_count / (eval_ns / 1e9)
        load_ns, prompt_ns = final.get("load_duration"), final.get("prompt_eval_duration")
        if isinstance(load_ns, (int, float)):
            out["load_ms"] = load_ns / 1e6
        if isinstance(prompt_ns, (int, float)):
            out["server_ttft_ms"] = (prompt_ns + (load_ns or 0)) / 1e6
        return out
