"""Anthropic Messages API: x-api-key auth, /v1/models, and an SSE /v1/messages probe."""

from __future__ import annotations

from typing import Any

from httpx_sse import EventSource, SSEError

from llmtop import inbound
from llmtop.probe import ProbeError, ProbeResult, StreamMeter
from llmtop.providers import register
from llmtop.providers.base import Adapter, CappedStream

API_VERSION = "2023-06-01"
_TEXT_FIELDS = {"text_delta": "text", "thinking_delta": "thinking", "input_json_delta": "partial_json"}


@register
class Anthropic(Adapter):
    provider = "anthropic"
    models_path = "/v1/models?limit=1000"

    def auth_headers(self) -> dict[str, str]:
        headers = {"anthropic-version": API_VERSION}
        key = self.api_key()
        if key:
            headers["x-api-key"] = key
        return headers

    def parse_models(self, data: Any) -> tuple[str, ...]:
        try:
            return tuple(str(m["id"]) for m in data["data"])
        except (KeyError, TypeError) as exc:
            raise ProbeError(f"/v1/models: unexpected shape (no data[].id: {exc})") from None

    async def probe(self, model: str | None) -> ProbeResult:
        if not model:
            return ProbeResult(None, ok=False, error="no model to probe: set models or probe_model in the config")
        messages = self.probe_messages()
        body: dict[str, Any] = {
            "model": model,
            "max_tokens": self.max_tokens,
            "messages": [m for m in messages if m["role"] != "system"],
            "stream": True,
        }
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        if system:
            body["system"] = system  # the Messages API takes the system prompt apart from the turns
        return await self.stream_probe("/v1/messages", body, model, self.read_stream)

    async def read_stream(self, response: CappedStream, meter: StreamMeter) -> dict[str, Any]:
        try:
            async for event in EventSource(response).aiter_sse():
                if not event.data.strip() or meter.finished:
                    continue
                data = self.json_event(event.data, "POST /v1/messages")
                kind = event.event if event.event != "message" else data.get("type")
                if kind != "content_block_delta":
                    meter.event()
                if kind == "content_block_delta":
                    delta = data.get("delta")
                    if isinstance(delta, dict):
                        text = delta.get(_TEXT_FIELDS.get(delta.get("type"), "text"))
                        meter.text(text if isinstance(text, str) else None, reasoning=delta.get("type") == "thinking_delta")
                elif kind == "message_start":
                    message = data.get("message")
                    usage = message.get("usage") if isinstance(message, dict) else None
                    if isinstance(usage, dict):
                        meter.input_usage(inbound.count(usage.get("input_tokens")))
                elif kind == "message_delta":
                    # output_tokens here is cumulative: the last one is the total.
                    usage = data.get("usage")
                    if isinstance(usage, dict):
                        meter.usage(inbound.count(usage.get("output_tokens")))
                        if usage.get("input_tokens") is not None:
                            meter.input_usage(inbound.count(usage.get("input_tokens")))
                    delta = data.get("delta")
                    if isinstance(delta, dict) and delta.get("stop_reason") == "max_tokens":
                        meter.hit_limit = True
                elif kind == "error":
                    err = data.get("error") if isinstance(data.get("error"), dict) else {}
                    raise ProbeError(f"POST /v1/messages: error in stream: {err.get('type')}: {err.get('message')}")
                elif kind == "message_stop":
                    meter.finished = True
        except SSEError as exc:
            raise ProbeError(f"POST /v1/messages: not an event stream ({exc})") from None
        if not meter.finished:
            raise ProbeError("POST /v1/messages: stream ended before message_stop (truncated)")
        return {}
