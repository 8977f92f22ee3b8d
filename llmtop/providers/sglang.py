"""SGLang: /health answers 503 while the server starts, and sglang: Prometheus metrics."""

from __future__ import annotations

from llmtop.metrics import MetricNames
from llmtop.probe import HealthResult, ProbeError
from llmtop.providers import register
from llmtop.providers.openai import OpenAICompatible


@register
class SGLang(OpenAICompatible):
    provider = "sglang"
    health_path = "/health"
    metrics_path = "/metrics"
    metric_names = MetricNames(
        requests_running=("sglang:num_running_reqs",),
        requests_waiting=("sglang:num_queue_reqs",),
        kv_cache_usage=("sglang:token_usage",),
        ttft_histogram=("sglang:time_to_first_token_seconds",),
    )
    _seen_ready = False

    async def health(self) -> HealthResult:
        try:
            result = await super().health()
        except ProbeError as exc:
            # A 503 before the first success is the server warming up; after it, it is a failure.
            if exc.status_code == 503 and not self._seen_ready:
                return HealthResult(ok=False, loading=True, error="starting up (/health 503)")
            raise
        self._seen_ready = True
        return result
