"""The remote sources a command line and a config name: --connect URLs, [[remote]] tables, and --prometheus with its selector."""

from __future__ import annotations

import os

from llmtop.config import Config
from llmtop.remote.agents import AgentSource

PROMETHEUS_TOKEN_ENV = "LLMTOP_PROMETHEUS_TOKEN"  # bearer token for the query API
PROMETHEUS_USER_ENV = "LLMTOP_PROMETHEUS_USER"  # or basic auth: user and password
PROMETHEUS_PASSWORD_ENV = "LLMTOP_PROMETHEUS_PASSWORD"


def remote_sources(args, config: Config, *, sparklines: bool = True) -> list:
    """Every source to read besides the local engine. ValueError (one line, naming the option) for
    a bad one. `sparklines`: whether a Prometheus source keeps the rows' history (a screen does;
    `check` shows none, and a 3,000-backend backfill took as long as its table)."""
    sources: list = []
    for url in getattr(args, "connect", None) or ():
        try:
            sources.append(AgentSource(url))
        except ValueError as exc:
            raise ValueError(f"--connect: {exc}") from None
    sources += [AgentSource(r.url, r.name, r.token_env) for r in config.remotes]
    url = getattr(args, "prometheus", None)
    if url:
        from urllib.parse import urlsplit

        from llmtop.remote.prometheus import PrometheusSource

        parts = urlsplit(url)
        if parts.username or parts.password:
            raise ValueError(
                f"--prometheus: the URL carries credentials; put a bearer token in ${PROMETHEUS_TOKEN_ENV}, or basic auth "
                f"in ${PROMETHEUS_USER_ENV} and ${PROMETHEUS_PASSWORD_ENV}"
            )

        basic = bool(os.environ.get(PROMETHEUS_USER_ENV) or os.environ.get(PROMETHEUS_PASSWORD_ENV))
        try:
            sources.append(PrometheusSource(
                url, getattr(args, "selector", None),
                bearer_token_env=PROMETHEUS_TOKEN_ENV if os.environ.get(PROMETHEUS_TOKEN_ENV) else None,
                basic_user_env=PROMETHEUS_USER_ENV if basic else None,
                basic_password_env=PROMETHEUS_PASSWORD_ENV if basic else None,
                sparklines=sparklines,
            ))
        except ValueError as exc:
            raise ValueError(f"--prometheus: {exc}") from None
    return sources
