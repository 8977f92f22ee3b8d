"""The shape every backend adapter shares: bounded HTTP requests, clear errors, and a poll of health, models and metrics."""

from __future__ import annotations

import asyncio
import codecs
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, ClassVar, NamedTuple

import httpx

from llmtop import inbound
from llmtop.config import BackendConfig, EnvValue, Policy
from llmtop.metrics import MetricNames, MetricsParseError, map_metrics
from llmtop.probe import HealthResult, ModelsResult, Phases, ProbeError, ProbeResult, StreamMeter
from llmtop.snapshot import Metrics

MAX_BODY_BYTES = 8 * 1024 * 1024
MAX_STREAM_BYTES = 4 * 1024 * 1024
MAX_ERROR_BYTES = 64 * 1024
ERROR_DETAIL_BYTES = 4096  # of an error body, what its message is read from
PROBE_PROMPT = "Count from 1 to 50, separated by spaces."


class ProbeChoice(NamedTuple):
    """The model a completion probe asks, or why there is none (`idle`: by choice, not a fault)."""

    model: str | None
    why_not: str | None = None
    idle: bool = False


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
    notes: list[str] | None = None  # the adapter's: what was read as absent, and why

    def json(self, what: str) -> Any:
        try:
            return inbound.loads(self.body, self.notes, what)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise ProbeError(f"bad JSON from {what}: {exc}") from None

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")


def arrival_clock(response: httpx.Response):
    """A clock reading when the response's latest bytes arrived (transport.py), else now."""
    return response.extensions.get("llmtop.arrival") or time.perf_counter


def phases_of(response: httpx.Response) -> Phases:
    """The request's connect, TLS and first-byte phases, as the transport timed them (transport.RequestTimings)."""
    timings = response.extensions.get("llmtop.timings")
    if timings is None:
        return Phases()

    def ms(seconds: float | None) -> float | None:
        return None if seconds is None else seconds * 1000.0

    return Phases(connect_ms=ms(timings.connect_s), tls_ms=ms(timings.tls_s), ttfb_ms=ms(timings.ttfb_s))


def sent_at(response: httpx.Response, fallback: float) -> float:
    """When the request's last byte was written (the start of a TTFT or a latency), else `fallback`."""
    timings = response.extensions.get("llmtop.timings")
    return fallback if timings is None else timings.sent_at


async def bounded(coro, seconds: float):
    """Run coro with a deadline. asyncio.timeout (3.11+) avoids the extra task wait_for creates per request."""
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(seconds):
            return await coro
    return await asyncio.wait_for(coro, seconds)  # pragma: no cover - Python 3.10


def error_message(body: bytes) -> str:
    """The human part of an error body: OpenAI, Anthropic and Ollama shapes, else the text.

    Not cut to length here: the engine masks secrets before it cuts anything (redact.py)."""
    text = body[:ERROR_DETAIL_BYTES].decode("utf-8", errors="replace").strip()
    try:
        data = inbound.loads(text)
    except (ValueError, RecursionError):
        return " ".join(text.split())
    if isinstance(data, dict):
        err = data.get("error", data.get("message", data.get("detail")))
        if isinstance(err, dict):
            err = err.get("message") or err.get("type")
        if err:
            return " ".join(str(err).split())
    return " ".join(text.split())


class Adapter:
    """Base for one protocol. Subclasses set the class attributes and override what differs."""

    provider: ClassVar[str] = ""
    health_path: ClassVar[str | None] = None  # None: health is the models request itself
    models_path: ClassVar[str] = "/v1/models"
    metrics_path: ClassVar[str | None] = None
    metric_names: ClassVar[MetricNames | None] = None
    ollama_names: ClassVar[bool] = False  # untagged names mean ':latest'

    def __init__(
        self, backend: BackendConfig, client: httpx.AsyncClient, timeout_s: float, max_tokens: int, policy: Policy | None = None
    ):
        self.backend = backend
        self.client = client
        self.timeout_s = timeout_s
        self.max_tokens = max_tokens
        self.policy = policy or Policy(timeout_s=timeout_s, probe_max_tokens=max_tokens)
        # A health route of the operator's own (a proxy's): asked instead of the protocol's, and
        # judged by its status alone.
        self.custom_health = self.policy.health_path is not None
        if self.custom_health:
            self.health_path = self.policy.health_path
        url = backend.url
        self.base = url[: -len("/v1")] if url.endswith("/v1") else url
        self._urls: dict[str, httpx.URL] = {}  # path -> parsed URL: httpx parses a string URL anew per request
        self.notes: list[str] = []  # values read as absent (NaN, Infinity) since the engine last took them

    def take_notes(self) -> list[str]:
        notes, self.notes = self.notes, []
        return notes

    # -- plumbing ---------------------------------------------------------------------------

    def url(self, path: str) -> httpx.URL:
        """The backend's URL for one of the protocol's fixed paths, parsed once."""
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = httpx.URL(self.base + path)
        return url

    def api_key(self) -> str | None:
        """The key from the environment, trimmed: a key pasted from a CRLF .env file ends in \\r."""
        if not self.backend.api_key_env:
            return None
        key = os.environ.get(self.backend.api_key_env, "").strip()
        if key and not key.isascii():
            raise ProbeError(f"${self.backend.api_key_env} holds non-ASCII characters; an API key never does")
        return key or None

    def auth_headers(self) -> dict[str, str]:
        key = self.api_key()
        return {"Authorization": f"Bearer {key}"} if key else {}

    def headers(self) -> dict[str, str]:
        """The protocol's own headers, then the config's `headers` (which win over them)."""
        return {**self.auth_headers(), **self.config_headers()}

    def config_headers(self) -> dict[str, str]:
        """The config's headers, values named by env read now. An env var that is empty or unset
        fails this backend's requests with a line that says which (never a header sent empty)."""
        out = {}
        for name, value in self.policy.headers:
            if isinstance(value, EnvValue):
                text = os.environ.get(value.env, "").strip()
                if not text:
                    raise ProbeError(f"header {name}: ${value.env} is empty or unset; export it, or remove the header from the config")
                if not text.isascii() or not text.isprintable():
                    raise ProbeError(f"header {name}: ${value.env} holds characters a header cannot carry")
                value = text
            out[name] = value
        return out

    def secrets(self) -> tuple[str, ...]:
        """What this adapter sends that must never be shown: the engine masks it in every text
        it keeps from this backend (redact.py)."""
        names = [self.backend.api_key_env] if self.backend.api_key_env else []
        names += [v.env for _, v in self.policy.headers if isinstance(v, EnvValue)]
        found = []
        for name in names:
            value = os.environ.get(name, "")
            found += [value, value.strip()]
        return tuple(found)

    def probe_messages(self) -> list[dict[str, str]]:
        """The probe's conversation: probe_messages, else probe_prompt, else llmtop's own prompt."""
        if self.policy.probe_messages:
            return [{"role": role, "content": content} for role, content in self.policy.probe_messages]
        return [{"role": "user", "content": self.policy.probe_prompt or PROBE_PROMPT}]

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
        except (asyncio.TimeoutError, httpx.HTTPError, OSError) as exc:
            raise ProbeError(self.describe_exception(exc, what), transport=True) from None

    async def _request(self, method, path, json_body, what, ok_statuses) -> Response:
        start = time.perf_counter()
        async with self.client.stream(method, self.url(path), json=json_body, headers=self.headers()) as resp:
            body = bytearray()
            async for chunk in resp.aiter_bytes():
                body += chunk
                if len(body) > MAX_BODY_BYTES:
                    raise ProbeError(f"{what}: response body over {MAX_BODY_BYTES // (1024 * 1024)} MiB, not read further")
            # From the request's last byte written (not from waiting for a connection, nor
            # connecting) to when the answer's last byte reached this machine (the kernel's stamp,
            # transport.py), not when the event loop got to it: a busy monitor must not make a
            # backend look slow.
            latency_ms = (arrival_clock(resp)() - sent_at(resp, start)) * 1000.0
        response = Response(resp.status_code, resp.headers, bytes(body), latency_ms, self.notes)
        if response.status not in ok_statuses:
            self.raise_for_status(response, what)
        return response

    def raise_for_status(self, response: Response, what: str) -> None:
        if 300 <= response.status < 400:
            # Redirects are not followed: httpx would carry a custom auth header (x-api-key) to
            # another origin. Point the config at the final address instead.
            where = response.headers.get("location", "?")
            raise ProbeError(f"{what}: HTTP {response.status} redirect to {where}; put that address in the config")
        retry = inbound.retry_after_s(response.headers.get("retry-after")) if response.status in (429, 503) else None
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
        phases = Phases()

        async def run() -> ProbeResult:
            nonlocal phases
            request = self.client.build_request("POST", self.url(path), json=body, headers=self.headers())
            meter.begin()  # replaced by the time the request's last byte was written, where the transport says
            resp = await self.client.send(request, stream=True)
            # TTFT starts when the request was written: waiting for a connection, connecting and a
            # TLS handshake are phases of their own, not time to first token.
            meter.start = sent_at(resp, meter.start)
            phases = phases_of(resp)
            meter.clock = arrival_clock(resp)  # token times as the kernel received them, where it says
            meter.reads = resp.extensions.get("llmtop.reads")
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
            return ProbeResult.from_meter(model, meter, what, phases, **server)

        try:
            return await bounded(run(), self.timeout_s)
        except ProbeError as exc:
            return self._failed(model, meter, phases, str(exc), exc.retry_after_s, exc.status_code)
        except (TypeError, AttributeError, KeyError, IndexError, ValueError, RecursionError) as exc:
            # JSON that parsed but is not shaped like this protocol's chunks.
            message = f"{what}: unexpected stream content ({type(exc).__name__}: {exc})"
            return self._failed(model, meter, phases, message, None)
        except (asyncio.TimeoutError, httpx.HTTPError, OSError) as exc:
            if meter.finished:  # everything was measured; only the tail after the end marker failed
                return ProbeResult.from_meter(model, meter, what, phases)
            message = self.describe_exception(exc, what)
            if isinstance(exc, (httpx.RemoteProtocolError, httpx.ReadError)) and meter.text_chunks:
                message = f"{what}: stream truncated after {meter.text_chunks} text chunks ({type(exc).__name__})"
            return self._failed(model, meter, phases, message, None)

    @staticmethod
    def _failed(
        model, meter: StreamMeter, phases: Phases, error: str, retry_after_s: float | None, status_code: int | None = None
    ) -> ProbeResult:
        return ProbeResult(
            model,
            ok=False,
            ttft_ms=meter.ttft_ms,
            output_tokens=meter.text_chunks or None,
            tokens_estimated=True,
            error=error,
            retry_after_s=retry_after_s,
            status_code=status_code,
            phases=phases,
            input_tokens=meter.input_tokens,
        )

    def json_event(self, data: str, what: str) -> dict:
        # The chunk is quoted last and uncut beyond ERROR_DETAIL_BYTES: a key it echoes is then
        # masked whole, or as a cut-off piece at the very end (redact.py).
        try:
            obj = inbound.loads(data, self.notes, what)
        except (ValueError, RecursionError) as exc:
            reason = getattr(exc, "msg", None) or str(exc)
            raise ProbeError(f"{what}: bad JSON in stream ({reason}): {data[:ERROR_DETAIL_BYTES]}") from None
        if not isinstance(obj, dict):
            raise ProbeError(f"{what}: unexpected stream chunk: {data[:ERROR_DETAIL_BYTES]}")
        return obj

    # -- what each protocol answers ---------------------------------------------------------

    async def custom_health_check(self) -> HealthResult:
        """The operator's health_path: up when it answers health_status, whatever the body says."""
        response = await self.request("GET", self.health_path, ok_statuses=(self.policy.health_status,))
        return HealthResult(ok=True, latency_ms=response.latency_ms)

    async def health(self) -> HealthResult:
        if self.health_path is None:
            raise NotImplementedError("adapters without a health path derive health from models")
        response = await self.request("GET", self.health_path)
        return HealthResult(ok=True, latency_ms=response.latency_ms)

    async def models(self) -> ModelsResult:
        response = await self.request("GET", self.models_path)
        # Where the model list is the health check, its latency is the request's own (written to
        # answered, transport.RequestTimings), not a stopwatch around connecting and the loop.
        return ModelsResult(self.parse_models(response.json(self.models_path)), extra={"latency_ms": response.latency_ms})

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
                    ok=False,
                    error=models.error,
                    retry_after_s=extra.get("retry_after_s"),
                    unreachable=extra.get("unreachable", False),
                    status_code=extra.get("status_code"),
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
            return await (self.custom_health_check() if self.custom_health else self.health())
        except (TypeError, AttributeError, KeyError, IndexError, ValueError) as exc:
            return HealthResult(ok=False, error=f"{self.health_path}: unexpected answer ({type(exc).__name__}: {exc})")
        except ProbeError as exc:
            return HealthResult(
                ok=False, error=str(exc), retry_after_s=exc.retry_after_s, unreachable=exc.transport, status_code=exc.status_code
            )

    async def _models_outcome(self) -> ModelsResult:
        start = time.perf_counter()
        try:
            result = await self.models()
        except ProbeError as exc:
            return ModelsResult(
                None,
                error=str(exc),
                extra={"retry_after_s": exc.retry_after_s, "unreachable": exc.transport, "status_code": exc.status_code},
            )
        except (TypeError, AttributeError, KeyError, IndexError, ValueError) as exc:
            return ModelsResult(None, error=f"{self.models_path}: unexpected answer ({type(exc).__name__}: {exc})")
        result.extra.setdefault("latency_ms", (time.perf_counter() - start) * 1000.0)
        return result

    async def _metrics_outcome(self, previous: Metrics | None) -> tuple[Metrics | None, str | None]:
        try:
            return await self.metrics(previous), None
        except ProbeError as exc:
            return None, str(exc)

    async def probe(self, model: str | None) -> ProbeResult:
        raise NotImplementedError

    def probe_model(self, served: tuple[str, ...] | None, loaded: tuple[str, ...] | None) -> ProbeChoice:
        """probe_model, else the first expected model, else the first one the server lists: a
        backend with no expected models is still asked to generate, never silently passed."""
        backend = self.backend
        if backend.probe_model or backend.models:
            return ProbeChoice(backend.probe_model or backend.models[0])
        if served:
            return ProbeChoice(served[0])
        if served is None:
            return ProbeChoice(None, "not probed: no model known (the model list was not read)")
        return ProbeChoice(None, "not probed: the server lists no model (set probe_model)")


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
        """The body as UTF-8 text (what event streams and NDJSON are), piece by piece as read.

        Straight from the transport's body, which has already undone any content coding: httpx's
        three text, byte and raw layers cost an async generator step each per read, and a probe's
        stream is read a token at a time."""
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        size = 0
        async for chunk in self._response.stream:
            size += len(chunk)
            if size > MAX_STREAM_BYTES:
                raise ProbeError(f"{self.what}: stream over {MAX_STREAM_BYTES // (1024 * 1024)} MiB, not read further")
            text = decoder.decode(chunk)
            if text:
                yield text
        text = decoder.decode(b"", True)
        if text:
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
