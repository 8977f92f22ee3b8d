"""Load and validate the TOML config into plain dataclasses, with one-line errors a user can act on."""

from __future__ import annotations

import difflib
import math
import os
import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

from llmtop.paths import default_config_path
from llmtop.sanitize import for_terminal, is_clean_name

PROVIDERS = (
    "openai",
    "vllm",
    "sglang",
    "tgi",
    "llamacpp",
    "ollama",
    "lmstudio",
    "litellm",
    "anthropic",
)


class ConfigError(Exception):
    """A config problem, already phrased as the one line the user should see."""


@dataclass(frozen=True)
class Settings:
    health_interval_s: float = 5.0
    probe_interval_s: float = 60.0
    probe_max_tokens: int = 8
    timeout_s: float = 10.0
    max_concurrency: int = 512
    probe_concurrency: int = 512
    slow_ttft_ms: float = 5000.0
    degraded_error_rate: float = 0.2
    history: int = 120


DAY_S = 86_400.0
# Bounds of each number in [settings] and [breaker]: below them llmtop would poll as fast as it
# can or time nothing out; above them a duration stops meaning anything (and a timestamp built
# from one could overflow the clock that prints it).
LIMITS: dict[str, tuple[float | None, float | None]] = {
    "health_interval_s": (0.1, DAY_S),
    "probe_interval_s": (1.0, 7 * DAY_S),
    "probe_max_tokens": (1, 4096),
    "timeout_s": (0.1, 600.0),
    "max_concurrency": (1, 100_000),
    "probe_concurrency": (1, 100_000),
    "slow_ttft_ms": (1.0, DAY_S * 1000),
    "history": (2, 100_000),
    "consecutive_failures": (1, 1000),
    "consecutive_successes": (1, 1000),
    "window_s": (1.0, 7 * DAY_S),
    "min_requests": (1, 100_000),
    "cooldown_s": (0.1, DAY_S),
    "max_cooldown_s": (0.1, 7 * DAY_S),
    "health_status": (100, 599),
    "probe_tokens_per_hour": (1, 1e12),
    "tokens_per_hour": (1, 1e12),
    "price_per_1k_output_tokens": (0.0, 1e6),
    "price_per_1k_input_tokens": (0.0, 1e6),
}
PROBE_MODES = ("completion", "health", "off")


@dataclass(frozen=True)
class BreakerSettings:
    consecutive_failures: int = 3
    consecutive_successes: int = 2
    window_s: float = 300.0
    min_requests: int = 5
    error_rate: float = 0.5
    cooldown_s: float = 30.0
    max_cooldown_s: float = 600.0


DEFAULT_LISTEN = "127.0.0.1:9850"  # llmtop serve's HTTP port (in Prometheus' exporter range)


@dataclass(frozen=True)
class ServeSettings:
    """`llmtop serve` and `--listen`: where to answer, and what readiness means."""

    listen: str = DEFAULT_LISTEN
    agent_listen: str | None = None  # HAProxy agent-check port; off unless set
    ready_when: tuple[str, ...] = ("healthy", "degraded")  # statuses that take traffic
    admin_token_env: str | None = None  # NAME of the env var holding the admin API's token; no admin API without it
    log_format: str = "text"  # text | json


@dataclass(frozen=True)
class AlertRule:
    metric: str
    above: float | None = None
    below: float | None = None

    def describe(self) -> str:
        if self.above is not None:
            return f"{self.metric} > {self.above:g}"
        return f"{self.metric} < {self.below:g}"


@dataclass(frozen=True)
class EnvValue:
    """A header value read from the environment when a request is built: a secret, never shown."""

    env: str


@dataclass(frozen=True)
class SkipRule:
    """Skip a due completion probe while this metric is above `above` (the backend is saturated)."""

    metric: str
    above: float


@dataclass(frozen=True)
class PolicyKeys:
    """The probe-policy keys as one table set them ([settings] or a [[backend]]); None: not set there."""

    probe: str | None = None  # completion | health | off
    probe_interval_s: float | None = None
    probe_max_tokens: int | None = None
    health_interval_s: float | None = None
    timeout_s: float | None = None
    headers: tuple[tuple[str, str | EnvValue], ...] | None = None
    health_path: str | None = None
    health_status: int | None = None
    probe_prompt: str | None = None
    probe_messages: tuple[tuple[str, str], ...] | None = None  # (role, content)
    skip_probe_when: SkipRule | None = None
    probe_tokens_per_hour: float | None = None
    price_per_1k_output_tokens: float | None = None
    price_per_1k_input_tokens: float | None = None


@dataclass(frozen=True)
class Policy:
    """What llmtop does to one backend, resolved: the backend's key, else [settings]', else the default."""

    probe: str = "completion"
    probe_interval_s: float = 60.0
    probe_max_tokens: int = 8
    health_interval_s: float = 5.0
    timeout_s: float = 10.0
    headers: tuple[tuple[str, str | EnvValue], ...] = ()
    health_path: str | None = None  # None: the adapter's own health check
    health_status: int = 200
    probe_prompt: str | None = None  # None: the built-in prompt (providers/base.PROBE_PROMPT)
    probe_messages: tuple[tuple[str, str], ...] | None = None
    skip_probe_when: SkipRule | None = None
    probe_tokens_per_hour: float | None = None
    price_per_1k_output_tokens: float | None = None
    price_per_1k_input_tokens: float | None = None

    @property
    def priced(self) -> bool:
        return self.price_per_1k_output_tokens is not None or self.price_per_1k_input_tokens is not None


@dataclass(frozen=True)
class BudgetSettings:
    tokens_per_hour: float | None = None  # the fleet's probe tokens (input + output) per hour; None: no cap


@dataclass(frozen=True)
class BackendConfig:
    name: str
    provider: str
    url: str
    models: tuple[str, ...] = ()
    probe_model: str | None = None
    api_key_env: str | None = None
    enabled: bool = True
    alerts: tuple[AlertRule, ...] = ()
    probe_unloaded: bool = False  # Ollama: probe a model even when it is not loaded (loading it)
    labels: tuple[tuple[str, str], ...] = ()  # extra exporter labels, e.g. team and region
    policy: PolicyKeys = PolicyKeys()  # this backend's own probe-policy keys (Config.policy resolves them)


@dataclass(frozen=True)
class RemoteConfig:
    """A `[[remote]]` table: another llmtop agent (`llmtop serve`) whose fleet this one shows."""

    url: str
    name: str | None = None  # shown in the agent column; default: the URL's host:port
    token_env: str | None = None  # NAME of the env var with its admin token; default LLMTOP_TOKEN


@dataclass(frozen=True)
class Config:
    settings: Settings = field(default_factory=Settings)
    breaker: BreakerSettings = field(default_factory=BreakerSettings)
    backends: tuple[BackendConfig, ...] = ()
    path: Path | None = None
    serve: ServeSettings = field(default_factory=ServeSettings)
    remotes: tuple[RemoteConfig, ...] = ()
    defaults: PolicyKeys = PolicyKeys()  # the policy keys [settings] set for every backend
    budget: BudgetSettings = field(default_factory=BudgetSettings)

    def backend(self, name: str) -> BackendConfig | None:
        return next((b for b in self.backends if b.name == name), None)

    def policy(self, backend: BackendConfig) -> Policy:
        """The backend's own key, else the one in [settings], else the built-in default."""
        s = self.settings
        values: dict[str, Any] = {
            "probe_interval_s": s.probe_interval_s,
            "probe_max_tokens": s.probe_max_tokens,
            "health_interval_s": s.health_interval_s,
            "timeout_s": s.timeout_s,
        }
        for f in fields(PolicyKeys):
            own, default = getattr(backend.policy, f.name), getattr(self.defaults, f.name)
            value = own if own is not None else default
            if f.name == "headers" and own is not None and default is not None:
                merged = dict(default)
                merged.update(own)  # a backend's header replaces [settings]' of the same name
                value = tuple(merged.items())
            if value is not None:
                values[f.name] = value
        return Policy(**values)


_BACKEND_KEYS = {
    "name": str,
    "provider": str,
    "url": str,
    "models": list,
    "probe_model": str,
    "api_key_env": str,
    "enabled": bool,
    "alert": list,
    "probe_unloaded": bool,
    "labels": dict,
}
# Keys that [settings] and each [[backend]] may both set (a backend's wins).
_POLICY_KEYS = {
    "probe": str,
    "probe_interval_s": float,
    "probe_max_tokens": int,
    "health_interval_s": float,
    "timeout_s": float,
    "headers": dict,
    "health_path": str,
    "health_status": int,
    "probe_prompt": str,
    "probe_messages": list,
    "skip_probe_when": dict,
    "probe_tokens_per_hour": float,
    "price_per_1k_output_tokens": float,
    "price_per_1k_input_tokens": float,
}
_SETTINGS_ONLY_POLICY = tuple(k for k in _POLICY_KEYS if k not in ("probe_interval_s", "probe_max_tokens", "health_interval_s", "timeout_s"))
# Headers llmtop or HTTP itself sets: a config header must not replace one.
_RESERVED_HEADERS = frozenset(("host", "content-length", "transfer-encoding", "connection", "content-type", "accept-encoding"))
# A literal value under one of these names is a credential: it belongs in an env var.
_SECRET_HEADER_WORDS = ("authorization", "key", "token", "secret", "password", "cookie", "auth")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
PROBE_ROLES = ("system", "user", "assistant")
NAME_MAX = 64  # backend names fit a table column and a log line
MODEL_MAX = 256  # longer than any model id a server uses
_ALERT_KEYS = {"metric": str, "above": (int, float), "below": (int, float)}
_TOP_KEYS = ("settings", "breaker", "backend", "serve", "budget", "remote")
_SERVE_KEYS = {"listen": str, "agent_listen": str, "ready_when": list, "admin_token_env": str, "log_format": str}
READY_STATUSES = ("healthy", "degraded")  # what ready_when may name: the rest never take traffic
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
# Labels llmtop's exporters set themselves (and Prometheus' own): a config label must not shadow one.
RESERVED_LABELS = frozenset(("backend", "provider", "model", "rule", "gpu", "name", "le", "job", "instance", "quantile"))


def _type_name(t: Any) -> str:
    names = {str: "a string", bool: "true or false", list: "a list", int: "an integer", float: "a number", dict: "a table"}
    if isinstance(t, tuple):
        return "a number"
    return names.get(t, t.__name__)


def _advice(value: Any, expected: Any, where: str) -> str:
    """How to write the value instead, as a line of valid TOML: `timeout_s = "10"` becomes
    `timeout_s = 10`, but `timeout_s = "ten"` must not become `timeout_s = ten`."""
    key = where.rsplit(".", 1)[-1]
    if expected is list and isinstance(value, str):
        return f"; write it as {key} = [{_toml_string(value)}]"
    if not isinstance(value, str):
        return ""
    unquoted = value.strip()
    if expected is bool:
        return f"; write it without quotes: {key} = {unquoted.lower()}" if unquoted.lower() in ("true", "false") else ""
    if expected not in (float, int, (int, float)):
        return ""
    if _parses_as(unquoted, expected):
        return f"; write it without quotes: {key} = {unquoted}"
    kind = "an integer" if expected is int else "a number"
    return f"; write {kind} without quotes, like {key} = 10"


def _toml_string(text: str) -> str:
    """A TOML basic string: JSON's escapes are a subset of TOML's, so JSON's quoting is valid TOML."""
    import json

    return json.dumps(text, ensure_ascii=False)


def _parses_as(text: str, expected: Any) -> bool:
    """Whether `key = text` is valid TOML giving a value of the expected type."""
    if not text or "\n" in text or "\r" in text:
        return False
    try:
        data = tomllib.loads(f"x = {text}")
    except tomllib.TOMLDecodeError:
        return False
    number = data.get("x")
    if len(data) != 1 or isinstance(number, bool):
        return False
    return isinstance(number, int) if expected is int else isinstance(number, (int, float))


class _Checker:
    def __init__(self, source: str):
        self.source = source

    def fail(self, where: str, what: str) -> ConfigError:
        return ConfigError(f"{self.source}: {where}: {what}")

    def unknown_keys(self, table: dict, known, where: str) -> None:
        for key in table:
            if key not in known:
                guess = difflib.get_close_matches(key, list(known), n=1)
                hint = f" (did you mean '{guess[0]}'?)" if guess else f" (known keys: {', '.join(known)})"
                path = f"{where}.{key}" if where else key
                raise self.fail(path, f"unknown key{hint}")

    def typed(self, value: Any, expected: Any, where: str) -> Any:
        ok = isinstance(value, expected) and not (expected in (int, float, (int, float)) and isinstance(value, bool))
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            advice = _advice(value, expected, where)
            raise self.fail(where, f"expected {_type_name(expected)}, got {type(value).__name__} {value!r}{advice}")
        return value

    def dataclass_table(self, cls: type, table: Any, where: str, positive: bool = True) -> Any:
        if not isinstance(table, dict):
            raise self.fail(where, f"expected a table [{where}], got {type(table).__name__}")
        known = {f.name: f for f in fields(cls)}
        self.unknown_keys(table, list(known), where)
        values = {}
        for key, value in table.items():
            default = known[key].default
            expected = int if isinstance(default, int) and not isinstance(default, bool) else float
            self.typed(value, expected, f"{where}.{key}")
            if not math.isfinite(value):
                raise self.fail(f"{where}.{key}", f"must be a finite number, got {value}")
            if positive and value <= 0:
                raise self.fail(f"{where}.{key}", f"must be greater than 0, got {value}")
            low, high = LIMITS.get(key, (None, None))
            if low is not None and value < low:
                raise self.fail(f"{where}.{key}", f"must be at least {low:g}, got {value}; write it like {key} = {low:g}")
            if high is not None and value > high:
                raise self.fail(f"{where}.{key}", f"must be at most {high:g}, got {value}; write it like {key} = {high:g}")
            values[key] = expected(value)
        return cls(**values)


def shown_url(url: str) -> str:
    """A URL as it may be printed: any user:password replaced by ***, on one clean line."""
    parts = urlsplit(url)
    if "@" in parts.netloc:
        url = url.replace(parts.netloc, "***@" + parts.netloc.rpartition("@")[2], 1)
    return for_terminal(url, 120)


def _check_url(chk: _Checker, url: str, where: str) -> str:
    shown = shown_url(url)
    if not is_clean_name(url) or any(c.isspace() for c in url):
        raise chk.fail(where, f"'{shown}' holds spaces or control characters; write it like \"http://10.0.0.5:8000\"")
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise chk.fail(where, f"'{shown}' is not an http(s) URL; write it like \"http://10.0.0.5:8000\"")
    if parts.username is not None or parts.password is not None:
        # Credentials in a URL end up in logs, screens and shell histories; the config holds no secrets.
        raise chk.fail(
            where,
            f"'{shown}' carries a user name or password; remove it and put the key in an environment "
            "variable named by api_key_env",
        )
    try:
        _ = parts.port  # urlsplit checks the port only when asked
    except ValueError:
        raise chk.fail(where, f"'{shown}' has a bad port") from None
    return url.rstrip("/")


def _check_name(chk: _Checker, value: str, where: str, limit: int) -> str:
    """A name shown on screens and in logs: printable, one line, bounded."""
    if not is_clean_name(value):
        raise chk.fail(where, f"{for_terminal(value, 60)!r} holds control or invisible characters; use printable text")
    if len(value) > limit:
        raise chk.fail(where, f"is {len(value)} characters long; keep it to {limit}")
    return value


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _looks_like_env_name(value: str) -> bool:
    """A variable name, and not a pasted key: keys are long runs of letters and digits with no
    underscore (hex tokens, base62 secrets), names are words joined by underscores."""
    if not _ENV_NAME.fullmatch(value):
        return False
    return "_" in value or len(value) < 20 or value.isupper() and not any(c.isdigit() for c in value)


def _backend(chk: _Checker, raw: Any, index: int) -> BackendConfig:
    where = f"backend[{index}]"
    if not isinstance(raw, dict):
        raise chk.fail(where, "each [[backend]] must be a table")
    label = raw.get("name") if isinstance(raw.get("name"), str) else None
    if label and is_clean_name(label) and len(label) <= NAME_MAX:
        where = f"backend '{label}'"
    chk.unknown_keys(raw, [*_BACKEND_KEYS, *_POLICY_KEYS], where)
    for key in ("name", "provider", "url"):
        if key not in raw:
            raise chk.fail(where, f"missing required key '{key}'")
    for key, expected in _BACKEND_KEYS.items():
        if key in raw:
            chk.typed(raw[key], expected, f"{where}.{key}")
    name = _check_name(chk, raw["name"].strip(), f"{where}.name", NAME_MAX)
    if not name:
        raise chk.fail(f"{where}.name", "must not be empty")
    provider = raw["provider"]
    if provider not in PROVIDERS:
        guess = difflib.get_close_matches(provider, PROVIDERS, n=1)
        hint = f"did you mean '{guess[0]}'? " if guess else ""
        raise chk.fail(f"{where}.provider", f"unknown provider '{provider}'; {hint}choose one of {', '.join(PROVIDERS)}")
    url = _check_url(chk, raw["url"], f"{where}.url")
    models = raw.get("models", [])
    for i, model in enumerate(models):
        chk.typed(model, str, f"{where}.models[{i}]")
        _check_name(chk, model, f"{where}.models[{i}]", MODEL_MAX)
    if "probe_model" in raw:
        _check_name(chk, raw["probe_model"], f"{where}.probe_model", MODEL_MAX)
    if "probe_unloaded" in raw and provider != "ollama":
        raise chk.fail(f"{where}.probe_unloaded", "only applies to provider = \"ollama\"; remove it")
    api_key_env = raw.get("api_key_env")
    if api_key_env is not None and not _looks_like_env_name(api_key_env):
        # The value is not echoed: if it is a key, it must not reach a terminal or a log.
        raise chk.fail(
            f"{where}.api_key_env",
            "must be the NAME of an environment variable (like \"OPENAI_API_KEY\"), never the key itself",
        )
    alerts = []
    for i, rule in enumerate(raw.get("alert", [])):
        rwhere = f"{where}.alert[{i}]"
        if not isinstance(rule, dict):
            raise chk.fail(rwhere, "each [[backend.alert]] must be a table")
        chk.unknown_keys(rule, list(_ALERT_KEYS), rwhere)
        if "metric" not in rule:
            raise chk.fail(rwhere, "missing required key 'metric'")
        for key, expected in _ALERT_KEYS.items():
            if key in rule:
                chk.typed(rule[key], expected, f"{rwhere}.{key}")
        if ("above" in rule) == ("below" in rule):
            raise chk.fail(rwhere, "set exactly one of 'above' or 'below'")
        _check_name(chk, rule["metric"], f"{rwhere}.metric", MODEL_MAX)
        for key in ("above", "below"):
            if key in rule and not math.isfinite(rule[key]):
                raise chk.fail(f"{rwhere}.{key}", f"must be a finite number, got {rule[key]}")
        alerts.append(AlertRule(rule["metric"], rule.get("above"), rule.get("below")))
    return BackendConfig(
        name=name,
        provider=provider,
        url=url,
        models=tuple(models),
        probe_model=raw.get("probe_model"),
        api_key_env=api_key_env,
        enabled=raw.get("enabled", True),
        alerts=tuple(alerts),
        probe_unloaded=raw.get("probe_unloaded", False),
        labels=_labels(chk, raw.get("labels", {}), f"{where}.labels"),
        policy=_policy(chk, raw, where),
    )


def _number(chk: _Checker, value: Any, expected: Any, where: str, key: str) -> Any:
    """A policy number: the type the key wants, finite, and inside LIMITS (or above 0)."""
    chk.typed(value, expected, where)
    if not math.isfinite(value):
        raise chk.fail(where, f"must be a finite number, got {value}")
    low, high = LIMITS.get(key, (None, None))
    if low is None and value <= 0:
        raise chk.fail(where, f"must be greater than 0, got {value}")
    if low is not None and value < low:
        raise chk.fail(where, f"must be at least {low:g}, got {value}; write it like {key} = {low:g}")
    if high is not None and value > high:
        raise chk.fail(where, f"must be at most {high:g}, got {value}; write it like {key} = {high:g}")
    return expected(value) if expected in (int, float) else value


def _policy(chk: _Checker, table: dict, where: str) -> PolicyKeys:
    """The probe-policy keys of one table ([settings] or a [[backend]]), each checked."""
    values: dict[str, Any] = {}
    for key, expected in _POLICY_KEYS.items():
        if key not in table:
            continue
        value, at = table[key], f"{where}.{key}"
        if expected in (int, float):
            values[key] = _number(chk, value, expected, at, key)
            continue
        chk.typed(value, expected, at)
        if key == "probe":
            if value not in PROBE_MODES:
                guess = difflib.get_close_matches(value, PROBE_MODES, n=1)
                hint = f"did you mean '{guess[0]}'? " if guess else ""
                raise chk.fail(at, f"{for_terminal(repr(value), 40)} is not a probe mode; {hint}choose one of {', '.join(PROBE_MODES)}")
        elif key == "headers":
            value = _headers(chk, value, at)
        elif key == "health_path":
            if not value.startswith("/") or not is_clean_name(value) or any(c.isspace() for c in value) or len(value) > 512:
                raise chk.fail(at, 'must be a path on the backend\'s URL, starting with /, like health_path = "/healthz"')
        elif key == "probe_prompt":
            value = _check_name(chk, value, at, 4000) if value.strip() else None
            if value is None:
                raise chk.fail(at, "must not be empty; remove it to use llmtop's own prompt")
        elif key == "probe_messages":
            value = _messages(chk, value, at)
        elif key == "skip_probe_when":
            value = _skip_rule(chk, value, at)
        values[key] = value
    if "probe_prompt" in values and "probe_messages" in values:
        raise chk.fail(f"{where}.probe_prompt", "set either probe_prompt or probe_messages, not both")
    return PolicyKeys(**values)


def _headers(chk: _Checker, table: dict, where: str) -> tuple[tuple[str, str | EnvValue], ...]:
    out: dict[str, str | EnvValue] = {}
    for name, value in table.items():
        shown = for_terminal(name, 60)
        if not _HEADER_NAME.fullmatch(name):
            raise chk.fail(f"{where}.{shown}", "is not an HTTP header name; use letters, digits and -, like \"X-Org\"")
        if name.lower() in _RESERVED_HEADERS:
            raise chk.fail(f"{where}.{name}", "is a header HTTP or llmtop sets itself; remove it")
        if name.lower() in {n.lower() for n in out}:
            raise chk.fail(f"{where}.{name}", "is set twice (header names ignore case); keep one")
        if isinstance(value, dict):
            if set(value) != {"env"} or not isinstance(value["env"], str):
                raise chk.fail(f"{where}.{name}", 'write a value from the environment as { env = "NAME" }')
            if not _looks_like_env_name(value["env"]):
                raise chk.fail(f"{where}.{name}.env", 'must be the NAME of an environment variable (like "ORG_ID"), never the value itself')
            out[name] = EnvValue(value["env"])
            continue
        if not isinstance(value, str):
            raise chk.fail(f"{where}.{name}", f'expected a string or {{ env = "NAME" }}, got {type(value).__name__}')
        if any(word in name.lower() for word in _SECRET_HEADER_WORDS):
            # The value is not echoed: it is most likely a credential, and the config holds none.
            raise chk.fail(f"{where}.{name}", 'looks like a credential; put it in an environment variable and write { env = "NAME" }')
        if not is_clean_name(value) or "\r" in value or "\n" in value or len(value) > 1024:
            raise chk.fail(f"{where}.{name}", "must be one line of printable text, at most 1024 characters")
        out[name] = value
    return tuple(out.items())


def _messages(chk: _Checker, raw: list, where: str) -> tuple[tuple[str, str], ...]:
    if not raw:
        raise chk.fail(where, 'must hold at least one message, like [{ role = "user", content = "Say hi" }]')
    out = []
    for i, message in enumerate(raw):
        at = f"{where}[{i}]"
        if not isinstance(message, dict):
            raise chk.fail(at, 'each message is a table, like { role = "user", content = "Say hi" }')
        chk.unknown_keys(message, ["role", "content"], at)
        for key in ("role", "content"):
            if key not in message:
                raise chk.fail(at, f"missing required key '{key}'")
            chk.typed(message[key], str, f"{at}.{key}")
        if message["role"] not in PROBE_ROLES:
            raise chk.fail(f"{at}.role", f"{for_terminal(repr(message['role']), 40)} is not one of {', '.join(PROBE_ROLES)}")
        if len(message["content"]) > 8000:
            raise chk.fail(f"{at}.content", f"is {len(message['content'])} characters long; a probe prompt keeps to 8000")
        out.append((message["role"], message["content"]))
    if out[-1][0] != "user":
        raise chk.fail(f"{where}[{len(out) - 1}].role", 'the last message must be the user\'s (role = "user")')
    return tuple(out)


def _skip_rule(chk: _Checker, raw: dict, where: str) -> SkipRule:
    chk.unknown_keys(raw, ["metric", "above"], where)
    for key in ("metric", "above"):
        if key not in raw:
            raise chk.fail(where, f'missing required key \'{key}\'; write it like {{ metric = "requests_waiting", above = 20 }}')
    chk.typed(raw["metric"], str, f"{where}.metric")
    _check_name(chk, raw["metric"], f"{where}.metric", MODEL_MAX)
    chk.typed(raw["above"], (int, float), f"{where}.above")
    if not math.isfinite(raw["above"]):
        raise chk.fail(f"{where}.above", f"must be a finite number, got {raw['above']}")
    return SkipRule(raw["metric"], float(raw["above"]))


def _budget(chk: _Checker, table: Any) -> BudgetSettings:
    if not isinstance(table, dict):
        raise chk.fail("budget", f"expected a table [budget], got {type(table).__name__}")
    chk.unknown_keys(table, ["tokens_per_hour"], "budget")
    if "tokens_per_hour" not in table:
        return BudgetSettings()
    return BudgetSettings(_number(chk, table["tokens_per_hour"], float, "budget.tokens_per_hour", "tokens_per_hour"))


def _labels(chk: _Checker, table: dict, where: str) -> tuple[tuple[str, str], ...]:
    """Extra labels for exporters: names Prometheus accepts and llmtop does not set itself."""
    out = []
    for name, value in table.items():
        if not _LABEL_NAME.fullmatch(name) or name.startswith("__"):
            raise chk.fail(f"{where}.{for_terminal(name, 40)}", "is not a label name; use letters, digits and _ (like team or region)")
        if name in RESERVED_LABELS or name.startswith("llmtop_"):
            raise chk.fail(f"{where}.{name}", f"is a label llmtop sets itself; pick another name (reserved: {', '.join(sorted(RESERVED_LABELS))})")
        chk.typed(value, str, f"{where}.{name}")
        out.append((name, _check_name(chk, value, f"{where}.{name}", 128)))
    return tuple(sorted(out))


def split_address(value: str) -> tuple[str, int]:
    """HOST:PORT (or [v6]:PORT) as (host, port); ValueError with the reason."""
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"'{for_terminal(value, 60)}' is not HOST:PORT; write it like \"127.0.0.1:9850\"")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"'{for_terminal(value, 60)}' has a bad port; write it like \"127.0.0.1:9850\"")
    return host, int(port)


def _serve(chk: _Checker, table) -> ServeSettings:
    if not isinstance(table, dict):
        raise chk.fail("serve", f"expected a table [serve], got {type(table).__name__}")
    chk.unknown_keys(table, list(_SERVE_KEYS), "serve")
    for key, expected in _SERVE_KEYS.items():
        if key in table:
            chk.typed(table[key], expected, f"serve.{key}")
    for key in ("listen", "agent_listen"):
        if key in table:
            try:
                split_address(table[key])
            except ValueError as exc:
                raise chk.fail(f"serve.{key}", str(exc)) from None
    ready_when = table.get("ready_when", list(ServeSettings.ready_when))
    for i, status in enumerate(ready_when):
        if status not in READY_STATUSES:
            raise chk.fail(
                f"serve.ready_when[{i}]",
                f"{for_terminal(repr(status), 40)} cannot take traffic; choose from {', '.join(READY_STATUSES)}",
            )
    env = table.get("admin_token_env")
    if env is not None and not _looks_like_env_name(env):
        raise chk.fail("serve.admin_token_env", 'must be the NAME of an environment variable (like "LLMTOP_TOKEN"), never the token itself')
    log_format = table.get("log_format", "text")
    if log_format not in ("text", "json"):
        raise chk.fail("serve.log_format", f"{for_terminal(repr(log_format), 40)} is not one of text, json")
    return ServeSettings(
        listen=table.get("listen", DEFAULT_LISTEN),
        agent_listen=table.get("agent_listen"),
        ready_when=tuple(ready_when),
        admin_token_env=env,
        log_format=log_format,
    )


def parse_config(data: dict, source: str = "<config>", path: Path | None = None) -> Config:
    """Validate an already-parsed TOML document."""
    chk = _Checker(source)
    chk.unknown_keys(data, list(_TOP_KEYS), "")
    raw_settings = data.get("settings", {})
    defaults = PolicyKeys()
    if isinstance(raw_settings, dict):
        own = {k: raw_settings[k] for k in _SETTINGS_ONLY_POLICY if k in raw_settings}
        raw_settings = {k: v for k, v in raw_settings.items() if k not in own}
        defaults = _policy(chk, own, "settings")
        chk.unknown_keys(raw_settings, [f.name for f in fields(Settings)] + list(_SETTINGS_ONLY_POLICY), "settings")
    settings = chk.dataclass_table(Settings, raw_settings, "settings")
    breaker = chk.dataclass_table(BreakerSettings, data.get("breaker", {}), "breaker")
    if breaker.error_rate > 1:
        raise chk.fail("breaker.error_rate", f"is a fraction between 0 and 1, got {breaker.error_rate}")
    if settings.degraded_error_rate > 1:
        raise chk.fail("settings.degraded_error_rate", "is a fraction between 0 and 1")
    raw_backends = data.get("backend", [])
    if not isinstance(raw_backends, list):
        raise chk.fail("backend", "write backends as [[backend]] tables")
    backends: list[BackendConfig] = []
    seen: set[str] = set()
    for i, raw in enumerate(raw_backends):
        backend = _backend(chk, raw, i)
        if backend.name in seen:
            raise chk.fail(f"backend[{i}].name", f"duplicate backend name '{backend.name}'; names must be unique")
        seen.add(backend.name)
        backends.append(backend)
    serve = _serve(chk, data.get("serve", {}))
    raw_remotes = data.get("remote", [])
    if not isinstance(raw_remotes, list):
        raise chk.fail("remote", 'write agents as [[remote]] tables with url = "http://host:9850"')
    remotes = tuple(_remote(chk, raw, i) for i, raw in enumerate(raw_remotes))
    config = Config(
        settings=settings, breaker=breaker, backends=tuple(backends), path=path, serve=serve,
        defaults=defaults, budget=_budget(chk, data.get("budget", {})), remotes=remotes,
    )
    for i, backend in enumerate(config.backends):
        policy = config.policy(backend)
        if policy.health_status != 200 and policy.health_path is None:
            where = "settings" if backend.policy.health_status is None else f"backend '{backend.name}'"
            raise chk.fail(f"{where}.health_status", "applies to a health_path of your own; set health_path too")
    return config


def _remote(chk: _Checker, raw: Any, index: int) -> RemoteConfig:
    where = f"remote[{index}]"
    if not isinstance(raw, dict):
        raise chk.fail(where, 'expected a [[remote]] table with url = "http://host:9850"')
    chk.unknown_keys(raw, ["url", "name", "token_env"], where)
    if "url" not in raw:
        raise chk.fail(f"{where}.url", 'missing; write it like url = "http://gpu-box-1:9850"')
    url = _check_url(chk, chk.typed(raw["url"], str, f"{where}.url"), f"{where}.url")
    name = raw.get("name")
    if name is not None:
        name = _check_name(chk, chk.typed(name, str, f"{where}.name"), f"{where}.name", 64)
    env = raw.get("token_env")
    if env is not None:
        chk.typed(env, str, f"{where}.token_env")
        if not _looks_like_env_name(env):
            raise chk.fail(f"{where}.token_env", 'must be the NAME of an environment variable (like "LLMTOP_TOKEN"), never the token itself')
    return RemoteConfig(url=url, name=name, token_env=env)


def loads_config(text: str, source: str = "<config>", path: Path | None = None) -> Config:
    """Parse and validate TOML text."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    return parse_config(data, source, path)


def load_config(path: str | os.PathLike) -> Config:
    """Read and validate a config file; every failure is a ConfigError with one line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file; run `llmtop init` to write a starter config") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    return loads_config(text, str(path), path)


def resolve_config_path(explicit: str | None) -> Path:
    """--config, else $LLMTOP_CONFIG, else the user config dir."""
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get("LLMTOP_CONFIG")
    if env:
        return Path(env).expanduser()
    return default_config_path()
