"""SGLang: /health answers 503 while the server starts, and sglang: Prometheus metrics."""

from __future__ import annotations

import time

from llmtop.metrics import MetricNames
from llmtop.probe import HealthResult, ProbeError
from llmtop.providers import register
from llmtop.providers.openai import OpenAICompatible


STARTUP_GRACE_S = 20 * 60  # large models take minutes to load; twenty is past any healthy start


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
        tpot_histogram=("sglang:time_per_output_token_seconds",),
    )
    _seen_ready = False
    _starting_since: float | None = None

    async def health(self) -> HealthResult:
        try:
            result = await super().health()
        except ProbeError as exc:
            # A 503 before the first success is the server warming up (loading weights, capturing
            # CUDA graphs); after it, or when it lasts longer than any start-up, it is a failure.
            if exc.status_code == 503 and not self._seen_ready:
                now = time.monotonic()
                self._starting_since = self._starting_since or now
                waited = now - self._starting_since
                if waited < STARTUP_GRACE_S:
                    return HealthResult(ok=False, loading=True, error=f"starting up (/health 503 for {waited:.0f}s)")
                raise ProbeError(f"{exc} for {waited / 60:.0f} min: not a start-up any more", status_code=503) from None
            raise
        self._seen_ready = True
        return result
