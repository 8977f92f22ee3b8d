"""Find LLM servers on the usual local ports, for a first run without a config and for `llmtop init`."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import httpx

from llmtop.config import BackendConfig
from llmtop.transport import shared_ssl_context

# (provider, port, path, what identifies it)
KNOWN_PORTS = (
    ("ollama", 11434, "/", "ollama is running"),
    ("vllm", 8000, "/version", '"version"'),
    ("llamacpp", 8080, "/health", ""),
    ("lmstudio", 1234, "/v1/models", '"data"'),
    ("sglang", 30000, "/health", ""),
    ("tgi", 3000, "/info", '"model_id"'),
    ("litellm", 4000, "/health/liveliness", ""),
)


@dataclass(frozen=True)
class Found:
    provider: str
    url: str
    models: tuple[str, ...]


async def _try(client: httpx.AsyncClient, host: str, provider: str, port: int, path: str, marker: str) -> Found | None:
    url = f"http://{host}:{port}"
    try:
        resp = await client.get(url + path)
    except (httpx.HTTPError, OSError):
        return None
    if resp.status_code >= 500 and provider not in ("llamacpp", "sglang"):
        return None
    if marker and marker not in resp.text.lower():
        return None
    models: tuple[str, ...] = ()
    try:
        if provider == "ollama":
            data = (await client.get(url + "/api/tags")).json()
            models = tuple(m["name"] for m in data.get("models", []))
        elif provider == "tgi":
            models = (resp.json()["model_id"],)
        else:
            data = (await client.get(url + "/v1/models")).json()
            models = tuple(m["id"] for m in data.get("data", []))
    except (httpx.HTTPError, OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return Found(provider, url, models)


async def discover(host: str = "127.0.0.1", timeout_s: float = 1.0, known=KNOWN_PORTS) -> list[Found]:
    async with httpx.AsyncClient(timeout=timeout_s, trust_env=False, verify=shared_ssl_context()) as client:
        results = await asyncio.gather(*(_try(client, host, *spec) for spec in known))
    return [r for r in results if r is not None]


def as_backends(found: list[Found]) -> list[BackendConfig]:
    return [
        BackendConfig(name=f"local-{f.provider}", provider=f.provider, url=f.url, models=f.models[:1])
        for f in found
    ]
