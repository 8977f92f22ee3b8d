"""httpx for the tests' requests to the servers they start, sharing the process's one CA bundle.

httpx loads the bundle again for every client made without an SSL context: 30-40 ms of CPU each.
The tests' loops that wait for a starting `llmtop serve` called httpx.get every 50 ms, so they
spent most of a core on certificates a plain-HTTP loopback never uses, beside the process they
waited for: about a tenth of the suite's CPU. These take httpx's arguments; they only add the
shared context (llmtop.transport.shared_ssl_context) and keep proxies out (trust_env=False).
"""

from __future__ import annotations

import httpx

from llmtop.transport import shared_ssl_context


def _defaults(kwargs: dict) -> dict:
    kwargs.setdefault("verify", shared_ssl_context())
    kwargs.setdefault("trust_env", False)
    return kwargs


def get(url: str, **kwargs) -> httpx.Response:
    return httpx.get(url, **_defaults(kwargs))


def Client(**kwargs) -> httpx.Client:  # noqa: N802 - stands in for httpx.Client
    return httpx.Client(**_defaults(kwargs))


def AsyncClient(**kwargs) -> httpx.AsyncClient:  # noqa: N802 - stands in for httpx.AsyncClient
    return httpx.AsyncClient(**_defaults(kwargs))
