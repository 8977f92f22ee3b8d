"""Stream framing as proxies deliver it: split and coalesced reads, CRLF, comments, pings, garbage.

A raw TCP server on 127.0.0.1 writes exactly the bytes each test gives it, with pauses, so the
framing and the timing are both under the test's control.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import pytest

import loopback
from llmtop.redact import Redactor

from llmtop.config import BackendConfig
from llmtop.providers import adapter_class
from llmtop.transport import backend_client
from served import WAY_IN_AND_OUT_MS, served_ttft_ms


class RawServer:
    """Answers every request with `head` then each (delay_s, bytes) piece of `pieces`."""

    def __init__(self, pieces, content_type="text/event-stream", chunked=False):
        self.pieces = pieces
        self.content_type = content_type
        self.chunked = chunked
        self.received_at: list[float] = []
        self.sent_at: list[float] = []  # when each piece went out: what a measured rate must match

    async def handle(self, reader, writer):
        try:
            await reader.readuntil(b"\r\n\r\n")
            self.received_at.append(time.perf_counter())
            enc = "Transfer-Encoding: chunked\r\n" if self.chunked else "Connection: close\r\n"
            writer.write(f"HTTP/1.1 200 OK\r\nContent-Type: {self.content_type}\r\n{enc}\r\n".encode())
            await writer.drain()
            for delay, data in self.pieces:
                if delay:
                    await asyncio.sleep(delay)
                if self.chunked:
                    data = f"{len(data):x}\r\n".encode() + data + b"\r\n"
                self.sent_at.append(time.perf_counter())
                writer.write(data)
                await writer.drain()
            if self.chunked:
                writer.write(b"0\r\n\r\n")
            await writer.drain()
            writer.close()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client hung up first, as some tests mean it to
        finally:
            writer.close()

    async def __aenter__(self):
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc):
        self.server.close()
        await self.server.wait_closed()


async def probe(provider, server, model="m", timeout=3.0):
    async with backend_client(timeout) as client:
        adapter = adapter_class(provider)(BackendConfig("x", provider, server.url, (model,)), client, timeout, 8)
        return await adapter.probe(model)


def chunk(text=None, role=False, usage=None, finish=None):
    delta = {}
    if role:
        delta["role"] = "assistant"
        delta["content"] = ""
    if text is not None:
        delta["content"] = text
    body = {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if usage is None else []}
    if usage is not None:
        body["usage"] = {"completion_tokens": usage}
    return b"data: " + json.dumps(body).encode()


async def test_split_crlf_comments_and_coalesced_chunks():
    role = chunk(role=True)
    first = chunk("Hello")
    pieces = [
        (0, role + b"\r\n\r\n"),
        (0, b": keep-alive comment\r\n\r\n"),
        (0.05, first[:9]),  # the first token's line arrives in two reads...
        (0.05, first[9:] + b"\r\n\r\n"),  # ...and only counts once it is whole
        (0.1, chunk(" wor") + b"\r\n\r\n" + chunk("ld") + b"\r\n\r\n"),  # two events in one read
        (0.1, chunk(" !") + b"\r\n\r\n" + chunk(usage=4) + b"\r\n\r\ndata: [DONE]\r\n\r\n"),
    ]
    async with RawServer(pieces, chunked=True) as server:
        result = await probe("vllm", server)
    assert result.ok, result.error
    assert 98 <= result.ttft_ms < 300  # not 50: half a line is not a token
    assert result.output_tokens == 4 and not result.tokens_estimated
    # The last token came in one read with the end marker, so its stamp may be theirs: the rate
    # runs from the piece that completed the first token to "ld", the last token whose read ended
    # with it (two tokens, as the server sent them: 0.1 s apart on a quiet machine).
    assert result.tokens_per_s == pytest.approx(2 / (server.sent_at[4] - server.sent_at[3]), rel=0.1)


async def test_stream_without_usage_counts_chunks_and_says_so():
    pieces = [(0, chunk(role=True) + b"\n\n")] + [(0.01, chunk(f"t{i}") + b"\n\n") for i in range(5)] + [(0, b"data: [DONE]\n\n")]
    async with RawServer(pieces) as server:
        result = await probe("openai", server)
    assert result.ok and result.output_tokens == 5 and result.tokens_estimated


async def test_garbage_in_stream_is_a_clear_error():
    pieces = [(0, chunk(role=True) + b"\n\n"), (0.01, b"data: {this is not json\n\n")]
    async with RawServer(pieces) as server:
        result = await probe("vllm", server)
    assert not result.ok and "bad JSON in stream" in result.error


async def test_error_object_inside_a_stream():
    pieces = [(0, b'data: {"error": {"message": "CUDA out of memory", "code": 500}}\n\n')]
    async with RawServer(pieces) as server:
        result = await probe("vllm", server)
    assert not result.ok and "CUDA out of memory" in result.error


async def test_json_body_where_a_stream_was_expected():
    pieces = [(0, b'{"id": "x", "choices": []}')]
    async with RawServer(pieces, content_type="application/json") as server:
        result = await probe("vllm", server)
    assert not result.ok and "not an event stream" in result.error


async def test_stream_that_stalls_is_bounded_by_timeout():
    pieces = [(0, chunk(role=True) + b"\n\n"), (0.02, chunk("a") + b"\n\n"), (5, chunk("b") + b"\n\n")]
    async with RawServer(pieces) as server:
        start = time.perf_counter()
        result = await probe("vllm", server, timeout=0.5)
    assert time.perf_counter() - start < 3.0  # timeout 0.5 s against a 5 s stall
    assert not result.ok and "timeout" in result.error
    assert 15 <= result.ttft_ms < 400  # what was seen before the stall is kept


async def test_anthropic_events_thinking_ping_and_cumulative_usage():
    def ev(name, data):
        return f"event: {name}\r\ndata: {json.dumps(data)}\r\n\r\n".encode()

    pieces = [
        (0, ev("message_start", {"type": "message_start", "message": {"usage": {"input_tokens": 9, "output_tokens": 1}}})),
        (0, ev("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": ""}})),
        (0, ev("ping", {"type": "ping"})),
        (0.06, ev("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "Let me"}})),
        (0.2, ev("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "abc"}})),
        (0, ev("content_block_delta", {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "1 2"}})),
        (
            0.2,  # the last text and the end in one write: the last text's stamp is not known to be its own
            ev("content_block_delta", {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": " 3"}})
            + ev("message_delta", {"type": "message_delta", "delta": {"stop_reason": "max_tokens"}, "usage": {"output_tokens": 3}})
            + ev("message_delta", {"type": "message_delta", "delta": {}, "usage": {"output_tokens": 5}})
            + ev("message_stop", {"type": "message_stop"}),
        ),
    ]
    async with RawServer(pieces) as server:
        result = await probe("anthropic", server)
    assert result.ok, result.error
    assert 55 <= result.ttft_ms < 200  # the thinking text at 60 ms is the first token, not the text at 260
    assert result.output_tokens == 5 and not result.tokens_estimated
    # From the thinking text to "1 2", the last text whose read ended with it (0.2 s when quiet):
    # 2 of the 3 text chunks, so 1 + 4 x 1/2 of the server's 5 tokens.
    assert result.tokens_per_s == pytest.approx(2 / (server.sent_at[5] - server.sent_at[3]), rel=0.1)


async def test_anthropic_overloaded_error_event():
    data = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    pieces = [(0, f"event: error\ndata: {json.dumps(data)}\n\n".encode())]
    async with RawServer(pieces) as server:
        result = await probe("anthropic", server)
    assert not result.ok and "overloaded_error: Overloaded" in result.error


async def test_ollama_ndjson_with_server_timings():
    lines = [json.dumps({"message": {"role": "assistant", "content": w}, "done": False}).encode() + b"\n" for w in ("a", "b", "c")]
    final = {"message": {"role": "assistant", "content": ""}, "done": True, "eval_count": 3, "eval_duration": 30_000_000,
             "load_duration": 5_000_000, "prompt_eval_duration": 7_000_000}
    pieces = [(0.03, lines[0]), (0.01, lines[1] + lines[2][:5]), (0.01, lines[2][5:] + json.dumps(final).encode() + b"\n")]
    async with RawServer(pieces, content_type="application/x-ndjson", chunked=True) as server:
        result = await probe("ollama", server, model="llama3.2")
    assert result.ok and result.output_tokens == 3 and not result.tokens_estimated
    assert result.server_tokens_per_s == pytest.approx(100.0)
    assert result.load_ms == pytest.approx(5.0) and result.server_ttft_ms == pytest.approx(12.0)


async def test_ollama_stream_cut_before_done():
    lines = [json.dumps({"message": {"content": "a"}, "done": False}).encode() + b"\n"]
    async with RawServer([(0, lines[0])], content_type="application/x-ndjson") as server:
        result = await probe("ollama", server, model="llama3.2")
    assert not result.ok and "without the final done:true" in result.error


@pytest.mark.parametrize(
    "provider, body",
    [
        ("vllm", b'data: {"choices": ["x"]}\n\n'),
        ("vllm", b'data: {"choices": [{"delta": {"content": "a"}}], "usage": {"completion_tokens": "n/a"}}\n\ndata: [DONE]\n\n'),
        ("vllm", b"data: [1, 2]\n\n"),
        ("anthropic", b"event: content_block_delta\ndata: [1]\n\n"),
        ("anthropic", b'event: content_block_delta\ndata: {"delta": "x"}\n\nevent: message_stop\ndata: {}\n\n'),
        ("ollama", b'{"message": "hi", "done": false}\n{"done": true, "eval_count": "many"}\n'),
        ("vllm", b"data: " + b"[" * 100_000 + b"\n\n"),
    ],
)
async def test_wrongly_shaped_json_is_a_failed_probe_never_an_exception(provider, body):
    ctype = "application/x-ndjson" if provider == "ollama" else "text/event-stream"
    async with RawServer([(0, body)], content_type=ctype) as server:
        result = await probe(provider, server, model="llama3.2" if provider == "ollama" else "m")
    # Either a clear failure, or (for harmless oddities) a success that did not invent numbers.
    assert result.error is None or result.error.startswith("POST ")
    assert result.ok is (result.error is None)


async def test_openai_stream_that_ends_early_without_done_is_truncated():
    pieces = [(0, chunk(role=True) + b"\n\n"), (0.01, chunk("a") + b"\n\n"), (0.01, chunk("b") + b"\n\n")]
    async with RawServer(pieces, chunked=True) as server:
        result = await probe("vllm", server)
    assert not result.ok and "stream ended before [DONE]" in result.error and result.ttft_ms is not None


async def test_endless_stream_is_cut_at_the_cap_not_buffered():
    pieces = [(0, b"data: " + b"x" * (6 * 1024 * 1024))]
    async with RawServer(pieces) as server:
        result = await probe("vllm", server, timeout=10)
    assert not result.ok and "stream over 4 MiB" in result.error


async def test_huge_error_body_reports_the_status_not_a_timeout():
    class ErrorServer(RawServer):
        async def handle(self, reader, writer):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n")
            try:
                for _ in range(2000):
                    writer.write(b"oops " * 2000)
                    await writer.drain()
            except ConnectionError:
                pass
            writer.close()

    async with ErrorServer([]) as server:
        start = time.perf_counter()
        result = await probe("vllm", server, timeout=5)
    assert not result.ok and "HTTP 500" in result.error and time.perf_counter() - start < 2


async def test_key_with_trailing_newline_is_trimmed_and_never_shown(monkeypatch):
    from llmtop.simulator import SimBackend, Simulator

    monkeypatch.setenv("K", "sk-SECRET123456\r\n")
    sb = SimBackend("b", api_key="sk-SECRET123456")
    async with Simulator([sb]) as sim:
        async with backend_client(3) as client:
            cfg = BackendConfig("b", "vllm", sim.url("b"), ("meta-llama/Llama-3.1-8B-Instruct",), api_key_env="K")
            adapter = adapter_class("vllm")(cfg, client, 3, 8)
            result = await adapter.probe("meta-llama/Llama-3.1-8B-Instruct")
            assert result.ok, result.error
            redact = Redactor(adapter.secrets())
            assert "SECRET" not in redact("Illegal header value b'Bearer sk-SECRET123456\\r\\n'")


async def test_anthropic_key_is_not_carried_across_a_redirect(monkeypatch):
    monkeypatch.setenv("AK", "sk-ant-SECRET-123456")
    seen = []

    async def other_origin(reader, writer):
        seen.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n{\"data\":[]}")
        await writer.drain()
        writer.close()

    other = await asyncio.start_server(other_origin, "127.0.0.1", 0)
    target = f"http://127.0.0.1:{other.sockets[0].getsockname()[1]}/v1/models"

    async def redirector(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(f"HTTP/1.1 302 Found\r\nLocation: {target}\r\nContent-Length: 0\r\n\r\n".encode())
        await writer.drain()
        writer.close()

    first = await asyncio.start_server(redirector, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{first.sockets[0].getsockname()[1]}"
    try:
        async with loopback.AsyncClient(follow_redirects=False) as client:
            adapter = adapter_class("anthropic")(BackendConfig("a", "anthropic", url, ("m",), api_key_env="AK"), client, 3, 8)
            result = await adapter.poll()
    finally:
        first.close()
        other.close()
    assert not seen  # nothing, and so no key, reached the other origin
    assert "redirect to" in result.health.error and "SECRET" not in result.health.error


@pytest.mark.skipif(sys.platform != "linux", reason="kernel receive timestamps (SO_TIMESTAMPNS) are Linux's")
async def test_a_busy_event_loop_does_not_make_the_ttft_or_the_latency_longer():
    """The first token reaches this machine at 60 ms, while the event loop is blocked until
    ~220 ms. The TTFT is the kernel's arrival time, so it stays ~60 ms; the same for a health
    latency whose answer arrives while the loop is busy."""
    from llmtop.simulator import SimBackend, Simulator

    sim = Simulator([SimBackend("b", ttft_ms=60, gap_ms=300)])
    sim.start_in_thread()  # its own thread: the blocked loop below is only the client's
    try:
        async with backend_client(5) as client:
            cfg = BackendConfig("b", "vllm", sim.url("b"), ("meta-llama/Llama-3.1-8B-Instruct",))
            adapter = adapter_class("vllm")(cfg, client, 5, 3)
            await adapter.poll()  # a warm connection, as in a running monitor
            loop = asyncio.get_running_loop()
            loop.call_later(0.02, time.sleep, 0.2)  # a callback that hogs the loop for 200 ms
            started = time.perf_counter()
            result = await adapter.probe("meta-llama/Llama-3.1-8B-Instruct")
            assert result.ok, result.error
            assert time.perf_counter() - started > 0.2  # the loop really was blocked past the first token
            # True to when the server sent it (its own stamp: on a loaded core later than 60 ms);
            # a loop stamp would add the ~160 ms the loop was blocked after it.
            served = served_ttft_ms(sim.backends["b"])
            assert served - 1 <= result.ttft_ms < served + WAY_IN_AND_OUT_MS, (result.ttft_ms, served)

            loop.call_later(0.0, time.sleep, 0.15)
            health = await adapter.health()
            assert health.latency_ms < 100, health.latency_ms  # the server answers in ~1 ms; a loop stamp says 150+
    finally:
        sim.stop_thread()


async def test_a_stream_that_trickled_in_while_the_loop_was_blocked_is_untimed_never_wrong():
    """The tokens arrive 40, 50, 60, 70 ms after the request while the loop is blocked until about
    66 to 78 ms: one read gets them all (or all but the last), stamped with the last one's arrival. Reported as a 70 ms TTFT it
    would be wrong by 30 ms; it must be untimed (a probe is timed truly or not at all). On a
    loaded core the simulator's thread may itself send late, after the block: then the tokens
    are read one by one, and the figure must be the true one."""
    import time as time_

    from llmtop.simulator import SimBackend, Simulator

    sim = Simulator([SimBackend("b", "vllm", ttft_ms=40, gap_ms=10, output_tokens=4)]).start_in_thread()
    try:
        cfg = BackendConfig("b", "vllm", sim.url("b"), ("meta-llama/Llama-3.1-8B-Instruct",))
        async with backend_client(5.0) as client:
            adapter = adapter_class("vllm")(cfg, client, 5.0, 4)
            await adapter.probe(cfg.models[0])  # a warm keep-alive connection
            # The block ends at every point around the last token's arrival, 0.5 ms apart: also
            # within a millisecond after it, where the read looks prompt but is 30 ms late for the first.
            for step in range(24):
                asyncio.get_running_loop().call_later(0.002, time_.sleep, 0.064 + step * 0.0005)
                result = await adapter.probe(cfg.models[0])
                assert result.ok
                if result.untimed:
                    assert result.ttft_ms is None and result.tokens_per_s is None, result
                else:  # the server sent after the block: timed, and truly
                    served = served_ttft_ms(sim.backends["b"], last=True)
                    assert served - 1 <= result.ttft_ms < served + WAY_IN_AND_OUT_MS, (result.ttft_ms, served)
    finally:
        sim.stop_thread()


@pytest.mark.parametrize("provider", ["vllm", "lmstudio", "openai", "anthropic"])
async def test_health_latency_is_the_servers_answer_not_the_monitors_stall(provider):
    """Where the model list is the health check (LM Studio, OpenAI, Anthropic) as where a health
    path is: a 50 ms stall of llmtop's own loop is not health latency."""
    import time as time_

    from llmtop.simulator import SimBackend, Simulator

    sim = Simulator([SimBackend("b", provider, ["m"])]).start_in_thread()
    try:
        async with backend_client(5.0) as client:
            adapter = adapter_class(provider)(BackendConfig("b", provider, sim.url("b"), ("m",)), client, 5.0, 4)
            await adapter.poll()  # a warm connection
            asyncio.get_running_loop().call_later(0.0005, time_.sleep, 0.05)
            health = (await adapter.poll()).health
    finally:
        sim.stop_thread()
    assert health.ok and health.latency_ms < 25, health.latency_ms  # the server answers in well under a millisecond
