"""LiteLLM proxy: /health/readiness, /v1/models behind the proxy key, litellm_ metrics at /metrics/."""

from __future__ import annotations

from llmtop.metrics import MetricNames
from llmtop.probe import HealthResult, ProbeError
from llmtop.providers import register
from llmtop.providers.openai import OpenAICompatible


@register
class LiteLLM(OpenAICompatible):
    provider = "litellm"
    health_path = "/health/readiness"
    metrics_path = "/metrics/"  # /metrics answers with a redirect here
    metric_names = MetricNames(
        requests_running=("litellm_in_flight_requests",),
        ttft_histogram=("litellm_llm_api_time_to_first_token_metric",),
    )

    async def health(self) -> HealthResult:
        response = await self.request("GET", self.health_path)
        data = response.json(self.health_path)
        status = data.get("status") if isinstance(data, dict) else None
        if status != "healthy":
            raise ProbeError(f"{self.health_path}: proxy reports status {status!r}")
        return HealthResult(ok=True, latency_ms=response.latency_ms, version=data.get("litellm_version"))

    async def models(self):
        try:
            return await super().models()
        except ProbeError as exc:
            # The proxy answers 500, not 401, to a request without its key.
            if exc.status_code == 500 and not self.api_key():
                raise ProbeError(f"{exc} (LiteLLM answers 500 without a key: set api_key_env)") from None
            raise
