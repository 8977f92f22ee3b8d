"""What a streamed probe measures (TTFT, decode rate, output tokens) and the result types adapters return."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable


class ProbeError(Exception):
    """A request failed in a way worth one line to the operator (already phrased)."""

    def __init__(
        self, message: str, retry_after_s: float | None = None, status_code: int | None = None, transport: bool = False
    ):
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.status_code = status_code
        self.transport = transport  # no HTTP answer at all: timeout, refused, reset


@dataclass
class StreamMeter:
    """Turns the arrival times of stream events into the numbers of DESIGN.md.

    TTFT runs from just before the request is sent (`start`) to the first chunk that carries
    generated text; role-only or empty chunks, comments and pings are not tokens. The decode
    rate is (tokens - 1) / (t_last - t_first), so it excludes TTFT.
    """

    clock: Callable[[], float] = time.perf_counter
    start: float = 0.0
    first_at: float | None = None
    last_at: float | None = None
    text_chunks: int = 0
    usage_tokens: int | None = None
    # The protocol's end marker ([DONE], message_stop, done:true) was seen. Reading on to the end
    # of the body afterwards lets the connection go back to the pool: a fresh connection per probe
    # put ~1.2 ms of TCP setup into every TTFT (benchmarks/bench_measurement.py).
    finished: bool = False

    def begin(self) -> None:
        self.start = self.clock()

    def text(self, text: str | None) -> None:
        """Call on every chunk as it arrives, with the generated text it carries (may be empty)."""
        if not text:
            return
        now = self.clock()
        if self.first_at is None:
            self.first_at = now
        self.last_at = now
        self.text_chunks += 1

    def usage(self, output_tokens: int | None) -> None:
        if output_tokens is not None:
            self.usage_tokens = int(output_tokens)

    @property
    def ttft_ms(self) -> float | None:
        return None if self.first_at is None else (self.first_at - self.start) * 1000.0

    @property
    def output_tokens(self) -> int:
        return self.usage_tokens if self.usage_tokens is not None else self.text_chunks

    @property
    def tokens_estimated(self) -> bool:
        return self.usage_tokens is None

    @property
    def tokens_per_s(self) -> float | None:
        return decode_rate(self.output_tokens, self.first_at, self.last_at)


def decode_rate(tokens: int, t_first: float | None, t_last: float | None) -> float | None:
    """(tokens - 1) / (t_last - t_first); None when fewer than two tokens or no elapsed time."""
    if tokens is None or tokens < 2 or t_first is None or t_last is None or t_last <= t_first:
        return None
    return (tokens - 1) / (t_last - t_first)


@dataclass
class ProbeResult:
    model: str | None
    ok: bool
    ttft_ms: float | None = None
    tokens_per_s: float | None = None
    output_tokens: int | None = None
    tokens_estimated: bool = False
    error: str | None = None
    retry_after_s: float | None = None
    server_ttft_ms: float | None = None
    server_tokens_per_s: float | None = None
    load_ms: float | None = None

    @classmethod
    def from_meter(cls, model: str | None, meter: StreamMeter, what: str = "stream", **server) -> "ProbeResult":
        if meter.first_at is None:
            return cls(model, ok=False, error=f"{what}: the stream ended without any generated text")
        return cls(
            model,
            ok=True,
            ttft_ms=meter.ttft_ms,
            tokens_per_s=meter.tokens_per_s,
            output_tokens=meter.output_tokens,
            tokens_estimated=meter.tokens_estimated,
            **server,
        )


@dataclass
class HealthResult:
    ok: bool  # the server is up and ready to serve
    latency_ms: float | None = None
    loading: bool = False  # up, but still loading a model (not down)
    error: str | None = None
    unreachable: bool = False  # no HTTP answer at all (timeout, refused, reset)
    retry_after_s: float | None = None
    version: str | None = None


@dataclass
class ModelsResult:
    models: tuple[str, ...] | None  # None when the list could not be read
    error: str | None = None
    extra: dict = field(default_factory=dict)
