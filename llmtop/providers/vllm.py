"""vLLM's OpenAI server: /health (200, empty body) and vllm: Prometheus metrics."""

from __future__ import annotations

from llmtop.metrics import MetricNames
from llmtop.providers import register
from llmtop.providers.openai import OpenAICompatible


@register
class VLLM(OpenAICompatible):
    provider = "vllm"
    health_path = "/health"
    metrics_path = "/metrics"
    metric_names = MetricNames(
        requests_running=("vllm:num_requests_running",),
        requests_waiting=("vllm:num_requests_waiting",),
        # vLLM V1 renamed gpu_cache_usage_perc to kv_cache_usage_perc; both are 0..1 fractions.
        kv_cache_usage=("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
        ttft_histogram=("vllm:time_to_first_token_seconds",),
        tpot_histogram=("vllm:request_time_per_output_token_seconds", "vllm:time_per_output_token_seconds"),
    )
