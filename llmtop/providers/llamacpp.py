"""llama.cpp's llama-server: /health says 503 "Loading model" while loading, llamacpp: metrics, timings in the usage chunk."""

from __future__ import annotations

from typing import Any

from llmtop import inbound
from llmtop.metrics import MetricNames
from llmtop.probe import HealthResult, ProbeError
from llmtop.providers import register
from llmtop.providers.openai import OpenAICompatible


@register
class LlamaCpp(OpenAICompatible):
    provider = "llamacpp"
    health_path = "/health"
    metrics_path = "/metrics"  # only with --metrics; a 404 otherwise is not an error
    metric_names = MetricNames(
        requests_running=("llamacpp:requests_processing",),
        requests_waiting=("llamacpp:requests_deferred",),
        kv_cache_usage=("llamacpp:kv_cache_usage_ratio",),
        tokens_per_s_gauge=("llamacpp:predicted_tokens_seconds",),
    )

    async def health(self) -> HealthResult:
        try:
            return await super().health()
        except ProbeError as exc:
            if exc.status_code == 503 and "loading" in str(exc).lower():
                return HealthResult(ok=False, loading=True, error="loading model")
            raise

    def server_timings(self, chunk: dict) -> dict[str, Any]:
        timings = chunk.get("timings")
        if not isinstance(timings, dict):
            return {}
        out = {}
        rate = inbound.finite(timings.get("predicted_per_second"))
        if rate is not None and rate > 0:
            out["server_tokens_per_s"] = rate
        prompt_s = inbound.duration_s(timings.get("prompt_ms"), 1e-3)
        if prompt_s is not None:
            out["server_ttft_ms"] = prompt_s * 1000.0
        return out
