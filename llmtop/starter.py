"""The commented starter config `llmtop init` writes, with any local servers it found."""

from __future__ import annotations

from dataclasses import fields

import tomli_w

from llmtop.config import BreakerSettings, Settings
from llmtop.discover import Found

SETTING_NOTES = {
    "health_interval_s": "seconds between health + models + metrics polls (cheap)",
    "probe_interval_s": "seconds between streamed completion probes (these cost tokens)",
    "probe_max_tokens": "output tokens per probe",
    "timeout_s": "bound on any one request, connect to last byte",
    "max_concurrency": "backends polled at once (a poll is up to 3 requests in a row)",
    "probe_concurrency": "cap on probes at once (fewer are admitted when timing would suffer)",
    "slow_ttft_ms": "a probe TTFT above this marks the backend degraded",
    "degraded_error_rate": "a window error rate at or above this marks it degraded",
    "history": "points kept per sparkline",
    "consecutive_failures": "closed -> open after this many failures in a row",
    "consecutive_successes": "half-open -> closed after this many trial successes",
    "window_s": "sliding window for the error rate",
    "min_requests": "the error-rate rule needs at least this many outcomes in the window",
    "error_rate": "closed -> open when the window's error rate reaches this",
    "cooldown_s": "open -> half-open after this (doubles on each re-open)",
    "max_cooldown_s": "cap on the growing cooldown",
}

EXAMPLE = """\
# [[backend]]
# name = "gpu1-vllm"
# provider = "vllm"        # openai | vllm | sglang | tgi | llamacpp | ollama | lmstudio | litellm | anthropic
# url = "http://10.0.0.5:8000"
# models = ["meta-llama/Llama-3.1-8B-Instruct"]   # expected; any not served raises an alert
# api_key_env = "VLLM_API_KEY"                     # the NAME of an env var, never the key
"""


def _table(title: str, cls) -> str:
    lines = [f"[{title}]"]
    for f in fields(cls):
        line = tomli_w.dumps({f.name: f.default}).rstrip()
        lines.append(f"{line:<32} # {SETTING_NOTES.get(f.name, '')}".rstrip(" #"))
    return "\n".join(lines)


def starter_config(found: list[Found]) -> str:
    parts = [
        "# llmtop config: every key is documented in sample-config.toml in the llmtop repository.",
        "# Secrets never go here: api_key_env names an environment variable that holds the key.",
        "",
        _table("settings", Settings),
        "",
        _table("breaker", BreakerSettings),
        "",
    ]
    if found:
        parts.append("# Found on this machine when `llmtop init` ran:")
        backends = []
        for f in found:
            entry = {"name": f"local-{f.provider}", "provider": f.provider, "url": f.url}
            if f.models:
                entry["models"] = list(f.models[:1])
            backends.append(entry)
        parts.append(tomli_w.dumps({"backend": backends}))
    else:
        parts.append("# No server answered on the usual local ports; add yours like this:")
        parts.append(EXAMPLE)
    return "\n".join(parts)
