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


def _each_call_a_read(clock: Callable[[], float]) -> Callable[[], tuple[int, float, float]]:
    """Read stamps for a meter fed by hand: every text chunk arrived alone, at clock()."""
    n = 0

    def read() -> tuple[int, float, float]:
        nonlocal n
        n += 1
        now = clock()
        return n, now, now

    return read


@dataclass
class StreamMeter:
    """Turns the arrival times of stream events into the numbers of DESIGN.md.

    TTFT runs from when the request's last byte was written (`start`; the transport says when,
    transport.RequestTimings) to the first chunk that carries generated text; role-only or empty
    chunks, comments and pings are not tokens. The decode rate is (tokens - 1) / (t_last - t_first),
    so it excludes TTFT.

    A chunk's arrival is that of the read that brought it (`reads`: its sequence number, the
    kernel's receive time of its bytes, and when llmtop read them). Once llmtop reads late, the
    kernel merges what arrived meanwhile, so a first token read together with later tokens is
    stamped with the last one's arrival: its true time is lost. Such a probe is not timed at
    all (`untimed`) rather than timed wrong; the engine retries it when it reads on time again.

    The same holds at the other end: a last token read together with bytes that came after it
    (the end marker, a usage chunk) carries their arrival, later than its own by however long the
    server took to send them. The decode rate then runs to the last token whose read ended with
    it, whose stamp is its own (`event()` tells the meter of every chunk that carries no text).
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
    reads: Callable[[], tuple[int, float, float]] | None = None
    first_read: int | None = None
    with_first: int = 0  # later text chunks that came in the first one's read
    spread: bool = False  # some text chunk came in a later read than the first
    reasoning_chunks: int = 0  # text chunks that were reasoning (thinking), not the answer
    input_tokens: int | None = None  # prompt tokens, from the server's usage
    hit_limit: bool = False  # the server said it stopped at max_tokens
    last_read: int | None = None  # the read that brought the last text chunk
    last_alone: bool = True  # nothing came after the last text chunk in its read: its stamp is its own
    # The latest text chunk (after the first) whose read ended with it: (its arrival, text chunks up to it)
    own_stamp: tuple[float, int] | None = None

    def begin(self) -> None:
        self.start = self.clock()

    def _read(self) -> tuple[int, float, float]:
        if self.reads is None:
            self.reads = _each_call_a_read(self.clock)
        return self.reads()

    def event(self) -> None:
        """Call on every chunk that carries no text (role, usage, end marker, ping) as it arrives:
        one read in the same read as the last text chunk means that chunk's stamp is a later one's."""
        if self.last_read is not None and self.last_alone and self._read()[0] == self.last_read:
            self.last_alone = False

    def text(self, text: str | None, reasoning: bool = False) -> None:
        """Call on every chunk as it arrives, with the generated text it carries (may be empty);
        reasoning text counts as a token like the answer's (DESIGN.md), and is counted apart."""
        if not text:
            self.event()
            return
        if reasoning:
            self.reasoning_chunks += 1
        seq, arrived, read_at = self._read()
        if self.first_at is None:
            self.first_at, self.first_read = arrived, seq
        elif seq == self.first_read:
            self.with_first += 1
        else:
            self.spread = True
        if self.last_read is not None and seq != self.last_read and self.last_alone and self.text_chunks > 1:
            self.own_stamp = (self.last_at, self.text_chunks)  # the previous text chunk ended its read
        self.last_at, self.last_read, self.last_alone = arrived, seq, True
        self.text_chunks += 1

    def usage(self, output_tokens: int | None) -> None:
        if output_tokens is not None:
            self.usage_tokens = int(output_tokens)

    def input_usage(self, input_tokens: int | None) -> None:
        if input_tokens is not None:
            self.input_tokens = int(input_tokens)

    @property
    def reasoning_only(self) -> bool:
        """Every text chunk was reasoning: the model spent the probe's tokens thinking."""
        return self.text_chunks > 0 and self.reasoning_chunks == self.text_chunks

    @property
    def untimed(self) -> str | None:
        """Why this stream's TTFT and decode rate are not true figures; None when they are.

        A read that brought the first token and later ones is stamped with the last one's
        arrival; when the first arrived is lost. Even a read that came at once after its last
        byte cannot tell a server or proxy that sent the tokens together from llmtop having been
        busy while they trickled in, so it is not timed either: the reason says both."""
        if not self.with_first:
            return None
        n = self.with_first + 1
        if self.spread:
            return f"not timed: llmtop read the first {n} tokens together, late"
        return f"not timed: all {n} tokens came in one read (a buffering proxy, or llmtop read late)"

    @property
    def ttft_ms(self) -> float | None:
        if self.first_at is None or self.untimed:
            return None
        return (self.first_at - self.start) * 1000.0

    @property
    def output_tokens(self) -> int:
        return self.usage_tokens if self.usage_tokens is not None else self.text_chunks

    @property
    def tokens_estimated(self) -> bool:
        return self.usage_tokens is None

    @property
    def tokens_per_s(self) -> float | None:
        if self.untimed:
            return None
        if self.last_alone:
            return decode_rate(self.output_tokens, self.first_at, self.last_at)
        if self.own_stamp is None:
            return None  # no token after the first has a stamp of its own: no true rate
        # Up to the last token whose stamp is its own; the server's count (usage) in proportion
        # to the chunks, exact when each chunk is a token.
        at, chunks = self.own_stamp
        tokens = 1 + (self.output_tokens - 1) * (chunks - 1) / (self.text_chunks - 1)
        return decode_rate(tokens, self.first_at, at)


def decode_rate(tokens: float, t_first: float | None, t_last: float | None) -> float | None:
    """(tokens - 1) / (t_last - t_first); None when fewer than two tokens or no elapsed time."""
    if tokens is None or tokens <= 1 or t_first is None or t_last is None or t_last <= t_first:
        return None
    return (tokens - 1) / (t_last - t_first)


@dataclass
class Phases:
    """Where a probe's time went, like curl's -w timings; None where a phase did not happen
    (a reused connection has no connect or TLS) or was not seen."""

    connect_ms: float | None = None
    tls_ms: float | None = None
    ttfb_ms: float | None = None  # request written -> first byte of the answer (its head)


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
    status_code: int | None = None  # the HTTP status of a refused probe (429: rate limited)
    phases: Phases = field(default_factory=Phases)
    untimed: str | None = None  # why a probe that generated text has no TTFT or rate (probe.StreamMeter)
    input_tokens: int | None = None  # prompt tokens, where the server's usage says
    reasoning_only: bool = False  # all its text was reasoning (its TTFT is the first reasoning token)
    note: str | None = None  # what is worth knowing about a probe that did not fail (not an error)

    @property
    def rate_limited(self) -> bool:
        return self.status_code == 429

    @classmethod
    def from_meter(
        cls, model: str | None, meter: StreamMeter, what: str = "stream", phases: Phases | None = None, **server
    ) -> "ProbeResult":
        if meter.first_at is None:
            if meter.hit_limit:
                # A reasoning model that thinks without streaming its thoughts (OpenAI's o-series)
                # spends a small max_tokens before any text: it answered, there is just nothing to time.
                return cls(
                    model,
                    ok=True,
                    output_tokens=meter.usage_tokens,
                    tokens_estimated=meter.usage_tokens is None,
                    phases=phases or Phases(),
                    input_tokens=meter.input_tokens,
                    reasoning_only=True,
                    note="max_tokens reached before any text (hidden reasoning): nothing to time; raise probe_max_tokens to time it",
                    **server,
                )
            return cls(
                model, ok=False, error=f"{what}: the stream ended without any generated text", phases=phases or Phases(),
                input_tokens=meter.input_tokens,
            )
        return cls(
            model,
            ok=True,
            ttft_ms=meter.ttft_ms,
            tokens_per_s=meter.tokens_per_s,
            output_tokens=meter.output_tokens,
            tokens_estimated=meter.tokens_estimated,
            phases=phases or Phases(),
            untimed=meter.untimed,
            input_tokens=meter.input_tokens,
            reasoning_only=meter.reasoning_only,
            **server,
        )


@dataclass
class HealthResult:
    ok: bool  # the server is up and ready to serve
    latency_ms: float | None = None  # request written -> last byte of the answer
    loading: bool = False  # up, but still loading a model (not down)
    error: str | None = None
    unreachable: bool = False  # no HTTP answer at all (timeout, refused, reset)
    retry_after_s: float | None = None
    version: str | None = None
    status_code: int | None = None  # of a refused poll (429: rate limited, not down)

    @property
    def rate_limited(self) -> bool:
        return self.status_code == 429


@dataclass
class ModelsResult:
    models: tuple[str, ...] | None  # None when the list could not be read
    error: str | None = None
    extra: dict = field(default_factory=dict)
