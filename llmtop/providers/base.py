"""The shape every backend adapter shares: bounded HTTP requests, clear errors, and a poll of health, models and metrics."""

from __future__ import annotations

import asyncio
import email.utils
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, ClassVar

import httpx

from llmtop.config import BackendConfig
from llmtop.metrics import MetricNames, MetricsParseError, map_metrics
from llmtop.probe import HealthResult, ModelsResult, ProbeError, ProbeResult, StreamMeter
from llmtop.snapshot import Metrics

MAX_BODY_BYTES = 8 * 1024 * 1024
MAX_STREAM_BYTES = 4 * 1024 * 1024
MAX_ERROR_BYTES = 64 * 1024
PROBE_PROMPT = "Count from 1 to 50, separated by spaces."


@dataclass
class PollResult:
    health: HealthResult
    models: ModelsResult | None
    metrics: Metrics | None
    metrics_error: str | None = None


@dataclass
class Response:
    status: int
    headers: httpx.Headers
    body: bytes
    latency_ms: float

    def json(self, what: str) -> Any:
        try:
            return json.loads(self.body)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise ProbeError(f"bad JSON from {what}: {str(exc)[:120]}") from None

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")


def arrival_clock(response: httpx.Response):
    """A clock reading when the response's latest bytes arrived (transport.py), else now."""
    return response.extensions.get("llmtop.arrival") or time.perf_counter


async def bounded(coro, seconds: float):
    """Run coro with a deadline. asyncio.timeout (3.11+) avoids the extra task wait_for creates per request."""
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(seconds):
            return await coro
    return await asyncio.wait_for(coro, seconds)  # pragma: no cover - Python 3.10


def retry_after_seconds(value: str | None) -> float | None:
    """Retry-After is either delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def error_message(body: bytes) -> str:
    """The human part of an error body: OpenAI, Anthropic and Ollama shapes, else the text."""
    text = body[:2000].decode("utf-8", errors="replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        return " ".join(text.split())[:160]
    if isinstance(data, dict):
        err = data.get("error", data.get("message", data.get("detail")))
        if isinstance(err, dict):
            err = err.get("message") or err.get("type")
        if err:
            return str(err)[:160]
    return " ".join(text.split())[:160]


class Adapter:
    """Base for one protocol. Subclasses set the class attributes and override what differs."""

    provider: ClassVar[str] = ""
    health_path: ClassVar[str | None] = None  # None: health is the models request itself
    models_path: ClassVar[str] = "/v1/models"
    metrics_path: ClassVar[str | None] = None
    metric_names: ClassVar[MetricNames | None] = None
    ollama_names: ClassVar[bool] = False  # untagged names mean ':latest'

    def __init__(self, backend: BackendConfig, client: httpx.AsyncClient, timeout_s: float, max_tokens: int):
        self.backend = backend
        self.client = client
        self.timeout_s = timeout_s
        self.max_tokens = max_tokens
        url = backend.url
        self.base = url[: -len("/v1")] if url.endswith("/v1") else url

    # -- plumbing ---------------------------------------------------------------------------

    def api_key(self) -> str | None:
        """The key from the environment, trimmed: a key pasted from a CRLF .env file ends in \\r."""
        if not self.backend.api_key_env:
            return None
        key = os.environ.get(self.backend.api_key_env, "").strip()
        if key and not key.isascii():
            raise ProbeError(f"${self.backend.api_key_env} holds non-ASCII characters; an API key never does")
        return key or None

    def headers(self) -> dict[str, str]:
        key = self.api_key()
        return {"Authorization": f"Bearer {key}"} if key else {}

    def redact(self, message: str) -> str:
        """Never let a key reach the screen, also in the forms an error message may quote it."""
        raw = os.environ.get(self.backend.api_key_env or "", "") if self.backend.api_key_env else ""
        for form in {raw, raw.strip(), repr(raw)[1:-1], repr(raw.strip())[1:-1]}:
            if len(form) >= 4:
                message = message.replace(form, "***")
        return message

    def describe_exception(self, exc: BaseException, what: str) -> str:
        if isinstance(exc, (asyncio.TimeoutError, httpx.TimeoutException)):
            return f"{what}: no complete answer within {self.timeout_s:g}s (timeout)"
        if isinstance(exc, httpx.ConnectError):
            reason = str(exc) or "connection failed"
            if "refused" in reason.lower():
                reason = "connection refused"
            return f"{what}: cannot connect ({reason})"
        if isinstance(exc, httpx.RemoteProtocolError):
            return f"{what}: server closed the connection mid-response ({exc})"
        if isinstance(exc, httpx.ReadError):
            return f"{what}: connection reset while reading ({exc or 'reset by peer'})"
        if isinstance(exc, httpx.HTTPError):
            return f"{what}: {type(exc).__name__}: {exc}"
        return f"{what}: {exc}"

    async def request(self, method: str, path: str, *, json_body: Any = None, ok_statuses=(200,)) -> Response:
        """One request, bounded from connect to last byte by timeout_s, body capped at MAX_BODY_BYTES.
        Raises ProbeError with a readable message on any failure or unexpected status."""
        what = f"{method} {path}" if method != "GET" else path
        try:
            return await bounded(self._request(method, path, json_body, what, ok_statuses), self.timeout_s)
        except ProbeError as exc:
            exc.args = (self.redact(str(exc)),)
            raise
        except (asyncio.TimeoutError, httpx.HTTPError, OSError) as exc:
            raise ProbeError(self.redact(self.describe_exception(exc, what)), transport=True) from None

    async def _request(self, method, path, json_body, what, ok_statuses) -> Response:
        start = time.perf_counter()
        async with self.client.stream(method, self.base + path, json=json_body, headers=self.headers()) as resp:
            body = bytearray()
            async for chunk in resp.aiter_bytes():
                body += chunk
                if len(body) > MAX_BODY_BYTES:
                    raise ProbeError(f"{what}: response body over {MAX_BODY_BYTES // (1024 * 1024)} MiB, not read further")
            # When the last byte reached this machine (the kernel's stamp, transport.py), not when
            # the event loop got to it: a busy monitor must not make a backend look slow.
            latency_ms = (arrival_clock(resp)() - start) * 1000.0
        response = Response(resp.status_code, resp.headers, bytes(body), latency_ms)
        if response.status not in ok_statuses:
            self.raise_for_status(response, what)
        return response

    def raise_for_status(self, response: Response, what: str) -> None:
        if 300 <= response.status < 400:
            # Redirects are not followed: httpx would carry a custom auth header (x-api-key) to
            # another origin. Point the config at the final address instead.
            where = response.headers.get("location", "?")
            raise ProbeError(f"{what}: HTTP {response.status} redirect to {where}; put that address in the config")
        retry = retry_after_seconds(response.headers.get("retry-after")) if response.status in (429, 503) else None
        if response.status == 429:
            hint = f", retry after {retry:.0f}s" if retry is not None else ""
            raise ProbeError(f"{what}: HTTP 429 rate limited{hint}", retry_after_s=retry, status_code=429)
        detail = error_message(response.body)
        if response.status in (401, 403):
            env = self.backend.api_key_env
            fix = f"check ${env}" if env else "set api_key_env to the name of the env var holding the key"
            raise ProbeError(f"{what}: HTTP {response.status} unauthorised ({fix})", status_code=response.status)
        raise ProbeError(
            f"{what}: HTTP {response.status}" + (f": {detail}" if detail else ""),
            retry_after_s=retry,
            status_code=response.status,
        )

    async def stream_probe(self, path: str, body: dict, model: str | None, read_events) -> ProbeResult:
        """POST a streamed request and feed its events to `read_events(response, meter)`.

        The whole exchange, first byte to last, is bounded by timeout_s. A failure after text
        arrived still reports the TTFT seen, with the error, so a truncated stream reads as what it is.
        """
        meter = StreamMeter()
        what = f"POST {path}"

        async def run() -> ProbeResult:
            # Built first, so the clock starts just before the request is sent, not before the
            # ~0.4 ms httpx spends assembling it (measured in benchmarks/bench_measurement.py).
            request = self.client.build_request("POST", self.base + path, json=body, headers=self.headers())
            meter.begin()
            resp = await self.client.send(request, stream=True)
            meter.clock = arrival_clock(resp)  # token times as the kernel received them, where it says
            try:
                if resp.status_code != 200:
                    raw = bytearray()
                    async for chunk in resp.aiter_bytes():
                        raw += chunk
                        if len(raw) > MAX_ERROR_BYTES:
                            break  # an error page needs no more than its first lines
                    self.raise_for_status(Response(resp.status_code, resp.headers, bytes(raw[:MAX_ERROR_BYTES]), 0.0), what)
                server = await read_events(CappedStream(resp, what), meter) or {}
            finally:
                await resp.aclose()
            return ProbeResult.from_meter(model, meter, what, **server)

        try:
            return await bounded(run(), self.timeout_s)
        except ProbeError as exc:
            return self._failed(model, meter, self.redact(str(exc)), exc.retry_after_s)
        except (TypeError, AttributeError, KeyError, IndexError, ValueError, RecursionError) as exc:
            # JSON that parsed but is not shaped like this protocol's chunks.
            message = f"{what}: unexpected stream content ({type(exc).__name__}: {exc})"
            return self._failed(model, meter, self.redact(message[:300]), None)
        except (asyncio.TimeoutError, httpx.HTTPError, OSError) as exc:
            if meter.finished:  # everything was measured; only the tail after the end marker failed
                return ProbeResult.from_meter(model, meter, what)
            message = self.describe_exception(exc, what)
            if isinstance(exc, (httpx.RemoteProtocolError, httpx.ReadError)) and meter.text_chunks:
                message = f"{what}: stream truncated after {meter.text_chunks} text chunks ({type(exc).__name__})"
            return self._failed(model, meter, self.redact(message), None)

    @staticmethod
    def _failed(model, meter: StreamMeter, error: str, retry_after_s: float | None) -> ProbeResult:
        return ProbeResult(
            model,
            ok=False,
            ttft_ms=meter.ttft_ms,
            output_tokens=meter.text_chunks or None,
            tokens_estimated=True,
            error=error,
            retry_after_s=retry_after_s,
        )

    @staticmethod
    def json_event(data: str, what: str) -> dict:
        try:
            obj = json.loads(data)
        except (ValueError, RecursionError) as exc:
            raise ProbeError(f"{what}: bad JSON in stream: {exc}: {data[:60]!r}") from None
        if not isinstance(obj, dict):
            raise ProbeError(f"{what}: unexpected stream chunk {data[:60]!r}")
        return obj

    # -- what each protocol answers ---------------------------------------------------------

    async def health(self) -> HealthResult:
        if self.health_path is None:
            raise NotImplementedError("adapters without a health path derive health from models")
        response = await self.request("GET", self.health_path)
        return HealthResult(ok=True, latency_ms=response.latency_ms)

    async def models(self) -> ModelsResult:
        response = await self.request("GET", self.models_path)
        return ModelsResult(self.parse_models(response.json(self.models_path)))

    def parse_models(self, data: Any) -> tuple[str, ...]:
        try:
            return tuple(str(m["id"]) for m in data["data"])
        except (KeyError, TypeError) as exc:
            raise ProbeError(f"{self.models_path}: unexpected shape (no data[].id: {exc})") from None

    async def metrics(self, previous: Metrics | None) -> Metrics | None:
        if not self.metrics_path or self.metric_names is None:
            return None
        response = await self.request("GET", self.metrics_path, ok_statuses=(200, 404))
        if response.status == 404:
            return None  # metrics not enabled on this server: not an error
        try:
            extra = tuple(rule.metric for rule in self.backend.alerts)
            return map_metrics(response.text, self.metric_names, previous, extra)
        except MetricsParseError as exc:
            raise ProbeError(f"{self.metrics_path}: {exc}") from None

    async def poll(self, previous_metrics: Metrics | None = None) -> PollResult:
        """Health, models and metrics; each failure is kept apart so one does not hide another."""
        if self.health_path is None:
            models = await self._models_outcome()
            if models.models is None:
                extra = models.extra
                health = HealthResult(
                    ok=False, error=models.error, retry_after_s=extra.get("retry_after_s"), unreachable=extra.get("unreachable", False)
                )
            else:
                health = HealthResult(ok=True, latency_ms=models.extra.get("latency_ms"))
            metrics, metrics_error = await self._metrics_outcome(previous_metrics)
            return PollResult(health, models, metrics, metrics_error)
        # One after another on one keep-alive connection: three small requests cost a few ms of
        # latency this way, against three TCP connections per backend per poll the other way.
        health = await self._health_outcome()
        if health.unreachable:
            # Timed out, refused or reset: the next two would fail the same way, one timeout each.
            return PollResult(health, ModelsResult(None, error=health.error), None, None)
        models = await self._models_outcome()
        metrics, metrics_error = await self._metrics_outcome(previous_metrics)
        return PollResult(health, models, metrics, metrics_error)

    async def _health_outcome(self) -> HealthResult:
        try:
            return await self.health()
        except (TypeError, AttributeError, KeyError, IndexError, ValueError) as exc:
            return HealthResult(ok=False, error=self.redact(f"{self.health_path}: unexpected answer ({type(exc).__name__}: {exc})"[:300]))
        except ProbeError as exc:
            return HealthResult(
                ok=False, error=str(exc), retry_after_s=exc.retry_after_s, unreachable=exc.transport
            )

    async def _models_outcome(self) -> ModelsResult:
        start = time.perf_counter()
        try:
            result = await self.models()
        except ProbeError as exc:
            return ModelsResult(None, error=str(exc), extra={"retry_after_s": exc.retry_after_s, "unreachable": exc.transport})
        except (TypeError, AttributeError, KeyError, IndexError, ValueError) as exc:
            return ModelsResult(None, error=self.redact(f"{self.models_path}: unexpected answer ({type(exc).__name__}: {exc})"[:300]))
        result.extra.setdefault("latency_ms", (time.perf_counter() - start) * 1000.0)
        return result

    async def _metrics_outcome(self, previous: Metrics | None) -> tuple[Metrics | None, str | None]:
        try:
            return await self.metrics(previous), None
        except ProbeError as exc:
            return None, str(exc)

    async def probe(self, model: str | None) -> ProbeResult:
        raise NotImplementedError


class CappedStream:
    """The parts of a streamed response the stream readers use, failing past MAX_STREAM_BYTES.

    A probe asks for a handful of tokens; a server that streams megabytes, or one endless line,
    is misbehaving, and must not be buffered until the timeout.
    """

    def __init__(self, response: httpx.Response, what: str):
        self._response = response
        self.headers = response.headers
        self.what = what

    async def aiter_text(self) -> AsyncIterator[str]:
        async for text in self._response.aiter_text():
            if self._response.num_bytes_downloaded > MAX_STREAM_BYTES:
                raise ProbeError(f"{self.what}: stream over {MAX_STREAM_BYTES // (1024 * 1024)} MiB, not read further")
            yield text


async def iter_ndjson(stream: CappedStream) -> AsyncIterator[str]:
    buffer = ""
    async for text in stream.aiter_text():
        buffer += text
        *lines, buffer = buffer.split("\n")
        for line in lines:
            if line.strip():
                yield line
    if buffer.strip():
        yield buffer
