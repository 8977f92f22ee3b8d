"""Hugging Face TGI: /health, /info (the one model it serves, its version) and tgi_ metrics, incl. its own per-token time."""

from __future__ import annotations

from llmtop.metrics import MetricNames
from llmtop.probe import ModelsResult, ProbeError
from llmtop.providers import register
from llmtop.providers.openai import OpenAICompatible


@register
class TGI(OpenAICompatible):
    provider = "tgi"
    health_path = "/health"
    models_path = "/info"
    metrics_path = "/metrics"
    metric_names = MetricNames(
        requests_running=("tgi_batch_current_size",),
        requests_waiting=("tgi_queue_size",),
        # TGI times each request's tokens itself: its decode rate, beside the probe's.
        tpot_histogram=("tgi_request_mean_time_per_token_duration",),
    )

    async def models(self) -> ModelsResult:
        data = (await self.request("GET", "/info")).json("/info")
        if not isinstance(data, dict) or not data.get("model_id"):
            raise ProbeError("/info: unexpected shape (no model_id)")
        return ModelsResult((str(data["model_id"]),), extra={"version": data.get("version")})
