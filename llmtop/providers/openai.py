"""OpenAI-compatible chat API (cloud OpenAI and the servers that imitate it): models and a streamed probe."""

from __future__ import annotations

from typing import Any

from httpx_sse import EventSource, SSEError

from llmtop import inbound
from llmtop.probe import ProbeError, ProbeResult, StreamMeter
from llmtop.providers import register
from llmtop.providers.base import Adapter, CappedStream


def chunk_text(chunk: dict) -> str | None:
    """Generated text in one chat.completion.chunk: content, or reasoning text from reasoning models."""
    return chunk_text_kind(chunk)[0]


def chunk_text_kind(chunk: dict) -> tuple[str | None, bool]:
    """chunk_text, and whether the text was reasoning."""
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if not isinstance(delta, dict):
            continue
        for key in ("content", "reasoning_content", "reasoning"):
            value = delta.get(key)
            if isinstance(value, str) and value:
                return value, key != "content"
    return None, False


class OpenAICompatible(Adapter):
    """Servers speaking /v1/models and streamed /v1/chat/completions with usage in a last chunk."""

    async def probe(self, model: str | None) -> ProbeResult:
        if not model:
            return ProbeResult(None, ok=False, error="no model to probe: set models or probe_model in the config")
        body = {
            "model": model,
            "messages": self.probe_messages(),
            "stream": True,
            "stream_options": {"include_usage": True},
            **self.limits(),
        }
        return await self.stream_probe("/v1/chat/completions", body, model, self.read_stream)

    def limits(self) -> dict[str, Any]:
        """Servers imitating OpenAI know max_tokens; OpenAI itself deprecated it (see OpenAI)."""
        return {"max_tokens": self.max_tokens, "temperature": 0}

    async def read_stream(self, response: CappedStream, meter: StreamMeter) -> dict[str, Any]:
        server: dict[str, Any] = {}
        finish_reason = None
        try:
            async for event in EventSource(response).aiter_sse():
                data = event.data.strip()
                if not data or meter.finished:
                    continue
                if data == "[DONE]":
                    meter.event()
                    meter.finished = True
                    continue
                chunk = self.json_event(data, "POST /v1/chat/completions")
                if chunk.get("error"):
                    err = chunk["error"]
                    message = err.get("message") if isinstance(err, dict) else err
                    raise ProbeError(f"POST /v1/chat/completions: error in stream: {message}")
                text, reasoning = chunk_text_kind(chunk)
                meter.text(text, reasoning=reasoning)
                for choice in chunk.get("choices") or ():
                    if isinstance(choice, dict) and choice.get("finish_reason"):
                        finish_reason = choice["finish_reason"]
                usage = chunk.get("usage")
                if isinstance(usage, dict):
                    meter.usage(inbound.count(usage.get("completion_tokens")))
                    meter.input_usage(inbound.count(usage.get("prompt_tokens")))
                server.update(self.server_timings(chunk))
        except SSEError as exc:
            raise ProbeError(f"POST /v1/chat/completions: not an event stream ({exc})") from None
        meter.hit_limit = finish_reason == "length"
        if not (meter.finished or finish_reason or meter.usage_tokens is not None):
            # Neither [DONE], nor a finish_reason, nor usage: the body ended mid-answer.
            raise ProbeError(
                f"POST /v1/chat/completions: stream ended before [DONE] (truncated after {meter.text_chunks} text chunks)"
            )
        return server

    def server_timings(self, chunk: dict) -> dict[str, Any]:
        """Server-reported timings carried in chunks, for engines that send them."""
        return {}


@register
class OpenAI(OpenAICompatible):
    provider = "openai"

    def limits(self) -> dict[str, Any]:
        # OpenAI's reasoning models refuse max_tokens and any temperature but the default;
        # max_completion_tokens is accepted by every current chat model.
        return {"max_completion_tokens": self.max_tokens}
