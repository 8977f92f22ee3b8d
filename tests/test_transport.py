"""The lean HTTP/1.1 transport under httpx, against raw servers on 127.0.0.1 that misbehave on cue.

Each server counts its TCP connections, so keep-alive reuse and the dropping of spoilt
connections are observed from the far side of the wire, not assumed.
"""

from __future__ import annotations

import asyncio
import gzip
import shutil
import socket
import ssl
import time
import threading
import struct
import subprocess
import zlib

import httpx
import pytest

from llmtop import transport
from llmtop.transport import backend_client


@pytest.fixture(autouse=True, params=["raw-socket", "asyncio-streams"])
def wire(request, monkeypatch):
    """Every test runs over both ways of reading plain TCP: straight off the socket with kernel
    timestamps (Linux), and asyncio streams (elsewhere, and under TLS everywhere)."""
    if request.param == "asyncio-streams":
        monkeypatch.setattr(transport, "SO_TIMESTAMPNS", None)
    elif transport.SO_TIMESTAMPNS is None:
        pytest.skip("no kernel receive timestamps on this platform")
    return request.param


class Server:
    """Answers each request with `respond(n)` bytes, n counting requests from 0; None closes at once."""

    def __init__(self, respond, tls: ssl.SSLContext | None = None):
        self.respond = respond
        self.tls = tls
        self.connections = 0
        self.requests = 0

    async def handle(self, reader, writer):
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                length = next(
                    (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0
                )
                if length:
                    await reader.readexactly(length)
                n, self.requests = self.requests, self.requests + 1
                answer = self.respond(n)
                if answer is None:
                    return
                writer.write(answer)
                await writer.drain()
                if b"connection: close" in answer.lower():
                    return
        finally:
            writer.close()

    async def __aenter__(self):
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0, ssl=self.tls)
        scheme = "https" if self.tls else "http"
        self.url = f"{scheme}://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc):
        self.server.close()
        await self.server.wait_closed()


async def until(condition, what: str, timeout: float = 30) -> None:
    """Wait until condition() holds; the timeout is only the outer bound for a broken build."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, f"timed out after {timeout}s waiting for {what}"
        await asyncio.sleep(0.005)


def ok(body: bytes = b"hello", extra: str = "") -> bytes:
    return f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


async def test_sequential_requests_share_one_keep_alive_connection():
    async with Server(lambda n: ok(f"r{n}".encode())) as server, backend_client(3) as client:
        bodies = [(await client.get(server.url + "/x")).text for _ in range(5)]
    assert bodies == ["r0", "r1", "r2", "r3", "r4"]
    assert server.connections == 1


async def test_an_idle_connection_the_server_dropped_is_replaced_transparently():
    async with Server(lambda n: ok(extra="Connection: keep-alive\r\n")) as server, backend_client(3) as client:
        assert (await client.get(server.url)).status_code == 200
        # The server now drops the connection the client holds idle, the way a keep-alive timeout does.
        server.respond = lambda n: None if n == 1 else ok()
        assert (await client.get(server.url)).status_code == 200
    assert server.connections == 2


async def test_a_new_connection_closed_without_an_answer_is_an_error():
    async with Server(lambda n: None) as server, backend_client(3) as client:
        with pytest.raises(httpx.RemoteProtocolError, match="without answering"):
            await client.get(server.url)


async def test_connection_close_is_honoured_and_the_next_request_reconnects():
    async with Server(lambda n: ok(extra="Connection: close\r\n")) as server, backend_client(3) as client:
        for _ in range(3):
            assert (await client.get(server.url)).text == "hello"
    assert server.connections == 3


async def test_a_body_left_unread_spoils_its_connection_but_frees_its_slot():
    big = b"x" * 200_000
    async with Server(lambda n: ok(big)) as server, backend_client(3, max_connections=1) as client:
        for _ in range(3):  # with one slot, a leaked one would hang the second request
            async with client.stream("GET", server.url) as resp:
                async for _chunk in resp.aiter_bytes():
                    break
        assert (await asyncio.wait_for(client.get(server.url), 2)).content == big
    assert server.connections == 4  # three spoilt mid-body, one for the full read


async def test_gzip_and_raw_deflate_bodies_are_decoded():
    data = b'{"data": [{"id": "m"}]}'
    raw = zlib.compressobj(wbits=-15)
    deflated = raw.compress(data) + raw.flush()  # no zlib header, as some servers send it
    answers = [ok(gzip.compress(data), "Content-Encoding: gzip\r\n"), ok(deflated, "Content-Encoding: deflate\r\n")]
    async with Server(lambda n: answers[n]) as server, backend_client(3) as client:
        assert (await client.get(server.url)).json() == {"data": [{"id": "m"}]}
        assert (await client.get(server.url)).json() == {"data": [{"id": "m"}]}


async def test_a_body_that_does_not_decode_is_an_httpx_error():
    async with Server(lambda n: ok(b"not gzip at all", "Content-Encoding: gzip\r\n")) as server, backend_client(3) as client:
        with pytest.raises(httpx.DecodingError):
            await client.get(server.url)
        # and the adapters turn it into the backend's error, not a crash of the round
        from llmtop.config import BackendConfig
        from llmtop.providers import adapter_class

        adapter = adapter_class("vllm")(BackendConfig("x", "vllm", server.url, ("m",)), client, 3, 8)
        result = await adapter.poll()
    assert not result.health.ok and "DecodingError" in result.health.error


@pytest.mark.parametrize("pause", [0, 0.02], ids=["same-read", "later-read"])
async def test_bytes_sent_on_an_idle_connection_are_not_the_next_answer(pause):
    """A proxy that times an idle connection out writes 408 and hangs up; the next request must
    go out on a new connection and get its own answer. The 408 may arrive in the same read as
    the answer before it (left in h11's buffer) or later (left in the stream's)."""

    timed_out = asyncio.Event()  # the 408 is on its way
    asked_again = asyncio.Event()

    class Proxy(Server):
        async def handle(self, reader, writer):
            self.connections += 1
            try:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(ok(b"first"))
                await writer.drain()
                if self.connections == 1:
                    await asyncio.sleep(pause)
                    writer.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    await writer.drain()
                    timed_out.set()
                    await asyncio.wait_for(asked_again.wait(), 30)  # not yet closed when the client asks again
            finally:
                writer.close()

    async with Proxy(None) as server, backend_client(3) as client:
        assert (await client.get(server.url)).text == "first"
        # The 408 arrives while the connection sits idle (a 50 ms sleep stood in for this).
        await asyncio.wait_for(timed_out.wait(), 30)
        second = await client.get(server.url)
        asked_again.set()
    assert second.status_code == 200 and server.connections == 2


async def test_a_server_flooding_an_idle_connection_is_read_once_then_left_unwatched(wire):
    """The raw socket stays registered with the loop after an answer (a stream is read a token
    at a time), so what a server writes unasked afterwards is read by the loop: once, held, and
    then the socket is no longer watched: no loop spinning on a readable socket nobody reads,
    no buffering of a flood. The next request goes out on a new connection."""
    if wire != "raw-socket":
        pytest.skip("asyncio streams buffer within their own limits")
    answered, flooded, done = asyncio.Event(), asyncio.Event(), asyncio.Event()

    class Flood(Server):
        async def handle(self, reader, writer):
            self.connections += 1
            try:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(ok(b"first"))
                await writer.drain()
                if self.connections == 1:
                    await asyncio.wait_for(answered.wait(), 30)  # the connection is idle in the pool
                    writer.write(b"x" * (4 * transport.READ_SIZE))
                    flooded.set()
                    await asyncio.wait_for(done.wait(), 30)
            finally:
                writer.close()

    async with Flood(None) as server, backend_client(3) as client:
        assert (await client.get(server.url)).text == "first"
        io = client._transport._idle[0].io
        answered.set()
        await asyncio.wait_for(flooded.wait(), 30)
        await until(lambda: io._held is not None, "the flood's first read")
        for _ in range(20):  # let the loop run: a watched readable socket would be read again
            await asyncio.sleep(0)
        held = io._held
        assert len(held[0]) <= transport.READ_SIZE and not io._watching
        assert io.fd not in asyncio.get_running_loop()._selector.get_map()
        assert (await client.get(server.url)).text == "first"
        done.set()
    assert server.connections == 2


async def test_a_reset_on_a_reused_connection_is_retried_once_on_a_new_one():
    """The usual keep-alive race: the request reaches a server that is closing the idle
    connection, and the kernel answers with a reset rather than a close."""

    class Resetting(Server):
        async def handle(self, reader, writer):
            self.connections += 1
            await reader.readuntil(b"\r\n\r\n")
            writer.write(ok(b"fine"))
            await writer.drain()
            if self.connections == 1:
                await reader.readuntil(b"\r\n\r\n")  # the second request, unread by the app...
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.close()  # ...and an abortive close: RST

    async with Resetting(None) as server, backend_client(3) as client:
        assert (await client.get(server.url)).text == "fine"
        assert (await client.get(server.url)).text == "fine"
    assert server.connections == 2


async def test_a_reset_before_any_answer_on_a_new_connection_is_a_read_error():
    class Resetting(Server):
        async def handle(self, reader, writer):
            await reader.readuntil(b"\r\n\r\n")
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.close()

    async with Resetting(None) as server, backend_client(3) as client:
        with pytest.raises(httpx.ReadError, match="(?i)reset"):
            await client.get(server.url)


async def test_closing_the_client_mid_request_neither_resends_nor_leaks():
    seen = []

    class Slow(Server):
        async def handle(self, reader, writer):
            try:
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    seen.append(head.split(b" ")[1])
                    if head.startswith(b"GET /slow"):
                        await asyncio.sleep(5)
                    writer.write(ok())
                    await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

    async with Slow(None) as server:
        client = backend_client(3)
        await client.get(server.url + "/first")
        slow = asyncio.create_task(client.get(server.url + "/slow"))
        await until(lambda: seen == [b"/first", b"/slow"], "the server to read /slow")  # 0.1 s was hoped enough
        await client.aclose()
        with pytest.raises(httpx.HTTPError):
            await asyncio.wait_for(slow, 2)
        transport = client._transport
        assert not transport._open and not transport._idle
    assert seen == [b"/first", b"/slow"]


async def test_chunked_bodies_stream_piece_by_piece():
    body = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body
    async with Server(lambda n: answer) as server, backend_client(3) as client:
        async with client.stream("GET", server.url) as resp:
            pieces = [c async for c in resp.aiter_bytes()]
        again = await client.get(server.url)
    assert b"".join(pieces) == b"hello world" and again.text == "hello world"
    assert server.connections == 1


async def test_a_body_shorter_than_its_content_length_is_a_protocol_error():
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nConnection: close\r\n\r\nonly this"
    async with Server(lambda n: answer) as server, backend_client(3) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get(server.url)


async def test_garbage_instead_of_http_is_a_protocol_error():
    async with Server(lambda n: b"SSH-2.0-OpenSSH_9.6\r\n\r\n") as server, backend_client(3) as client:
        with pytest.raises(httpx.RemoteProtocolError, match="malformed"):
            await client.get(server.url)


async def test_refused_connections_say_so():
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    async with backend_client(3) as client:
        with pytest.raises(httpx.ConnectError, match="(?i)refused"):
            await client.get(f"http://127.0.0.1:{port}/")


async def test_post_bodies_and_headers_reach_the_server():
    seen = []

    class Echo(Server):
        async def handle(self, reader, writer):
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")).split(b":")[1])
            seen.append((head, await reader.readexactly(length)))
            writer.write(ok(extra="Connection: close\r\n"))
            await writer.drain()
            writer.close()

    async with Echo(None) as server, backend_client(3) as client:
        await client.post(server.url + "/v1/chat/completions?x=1", json={"a": 1}, headers={"Authorization": "Bearer k"})
    head, body = seen[0]
    assert head.startswith(b"POST /v1/chat/completions?x=1 HTTP/1.1\r\n")
    assert b"authorization: bearer k" in head.lower() and b"user-agent: llmtop" in head.lower()
    assert body == b'{"a":1}' or body == b'{"a": 1}'


async def test_a_cookie_a_server_sets_is_never_sent_back():
    """A monitor keeps no cookies: a load balancer's sticky cookie would pin every probe to the
    replica that set it."""
    heads = []

    class Sticky(Server):
        async def handle(self, reader, writer):
            self.connections += 1
            while True:
                try:
                    heads.append(await reader.readuntil(b"\r\n\r\n"))
                except (asyncio.IncompleteReadError, ConnectionError):
                    break
                writer.write(ok(extra="Set-Cookie: replica=3; Path=/\r\nSet-Cookie: session=abc\r\n"))
                await writer.drain()
            writer.close()

    async with Sticky(None) as server, backend_client(3) as client:
        first = await client.get(server.url + "/health")
        await client.get(server.url + "/health")
        await client.post(server.url + "/v1/chat/completions", json={})
    assert first.headers.get_list("set-cookie") == ["replica=3; Path=/", "session=abc"]
    assert len(heads) == 3 and not any(b"cookie" in head.lower() for head in heads)
    assert not client.cookies


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    if not shutil.which("openssl"):
        pytest.skip("openssl not installed: cannot make a test certificate")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem")],
        check=True, capture_output=True,
    )
    return d / "cert.pem", d / "key.pem"


async def test_https_verifies_the_certificate(tls_files):
    cert, key = tls_files
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    trusting = ssl.create_default_context(cafile=str(cert))
    async with Server(lambda n: ok(b"secure"), tls=server_ctx) as server:
        async with backend_client(3, trusting) as client:
            assert (await client.get(server.url)).text == "secure"
            assert (await client.get(server.url)).text == "secure"
        assert server.connections == 1
        async with backend_client(3, ssl.create_default_context()) as client:  # does not trust the self-signed cert
            with pytest.raises(httpx.ConnectError, match="(?i)certificate"):
                await client.get(server.url)


async def test_closing_mid_upload_fails_the_upload_and_frees_the_socket_for_the_next_one():
    """A request body stalled on a server that stopped reading, then the client is closed (a
    reload does that): the upload must fail at once, and the selector must not keep the fd
    number for the next socket that gets it."""
    stalled = socket.socket()
    stalled.bind(("127.0.0.1", 0))
    stalled.listen(1)  # accepts into the backlog, never reads
    client = backend_client(10)
    upload = asyncio.create_task(client.post(f"http://127.0.0.1:{stalled.getsockname()[1]}/", content=b"x" * 8_000_000))
    # Connected, so the upload is being written (0.3 s was hoped enough for that).
    await until(lambda: client._transport._open, "the upload's connection")
    await client.aclose()
    with pytest.raises(httpx.HTTPError):
        await asyncio.wait_for(upload, 1)
    stalled.close()
    async with Server(lambda n: ok(b"next")) as server, backend_client(3) as fresh:
        assert (await asyncio.wait_for(fresh.get(server.url), 2)).text == "next"


async def test_a_wall_clock_stepped_forward_never_makes_an_answer_older_than_its_question(monkeypatch, wire):
    import time as real_time

    class Stepped:  # time.time() half a second ahead of where the kernel stamped the bytes
        perf_counter = staticmethod(real_time.perf_counter)

        @staticmethod
        def time():
            return real_time.time() + 0.5

    monkeypatch.setattr(transport, "time", Stepped)
    async with Server(lambda n: ok()) as server, backend_client(3) as client:
        from llmtop.config import BackendConfig
        from llmtop.providers import adapter_class

        adapter = adapter_class("vllm")(BackendConfig("x", "vllm", server.url, ("m",)), client, 3, 8)
        health = await adapter.health()
    assert 0 <= health.latency_ms < 250  # not 500 ms off; a loaded core may add tens of ms


# -- phases and bounded decoding (issue #7) --------------------------------------------------------


async def test_each_response_carries_its_phases_and_a_reused_connection_has_no_connect():
    async with Server(lambda n: ok()) as server, backend_client(3) as client:
        first = await client.get(server.url)
        second = await client.get(server.url)
    t1, t2 = first.extensions["llmtop.timings"], second.extensions["llmtop.timings"]
    assert t1.connect_s is not None and t1.tls_s is None and t1.ttfb_s >= 0
    assert t2.connect_s is None and t2.tls_s is None  # reused: nothing to connect
    assert t2.sent_at > t1.sent_at and t2.first_byte_at >= t2.sent_at


async def test_a_slow_tls_handshake_is_a_phase_of_its_own_not_time_to_first_byte(tls_files):
    """The server stalls 300 ms before its TLS handshake: that is the TLS phase; the request is
    written after it, so the first byte's time (and a TTFT) starts after it too."""
    cert, key = tls_files
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)

    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:  # a plain thread: the ClientHello waits in the kernel until the handshake
        conn, _ = listener.accept()
        time.sleep(0.3)
        with server_ctx.wrap_socket(conn, server_side=True) as tls:
            data = b""
            while b"\r\n\r\n" not in data:
                data += tls.recv(4096)
            tls.sendall(ok(b"late"))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        url = f"https://127.0.0.1:{listener.getsockname()[1]}"
        async with backend_client(5, ssl.create_default_context(cafile=str(cert))) as client:
            response = await client.get(url)
    finally:
        thread.join(5)
        listener.close()
    timings = response.extensions["llmtop.timings"]
    assert response.text == "late"
    assert timings.tls_s >= 0.25  # the stall is here...
    assert timings.ttfb_s < timings.tls_s  # ...and not in the time the answer took once asked


async def test_a_gzip_bomb_is_inflated_a_bounded_piece_at_a_time():
    import gzip

    bomb = gzip.compress(b"\0" * (50 * 1024 * 1024), 9)  # ~50 KB that inflates to 50 MiB
    async with Server(lambda n: ok(bomb, "Content-Encoding: gzip\r\n")) as server, backend_client(3) as client:
        async with client.stream("GET", server.url) as response:
            assert "content-encoding" not in response.headers  # decoded here, never again by httpx
            sizes, total = [], 0
            async for piece in response.aiter_raw():
                sizes.append(len(piece))
                total += len(piece)
                if total > 4 * 1024 * 1024:
                    break  # as a reader's cap does: memory never held more than this and one piece
    assert max(sizes) <= transport.DECODED_PIECE and total > 4 * 1024 * 1024


async def test_a_coding_llmtop_did_not_ask_for_is_refused_by_name():
    async with Server(lambda n: ok(b"\x1b\x00\x00", "Content-Encoding: br\r\n")) as server, backend_client(3) as client:
        with pytest.raises(httpx.DecodingError, match="'br'"):
            await client.get(server.url)


async def test_llmtop_asks_for_identity():
    seen = []

    async def handle(reader, writer):
        seen.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(ok())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        async with backend_client(3) as client:
            await client.get(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/")
    finally:
        server.close()
        await server.wait_closed()
    assert b"accept-encoding: identity" in seen[0].lower()


def test_a_deflate_body_whose_first_chunk_is_one_byte_decodes():
    import zlib as zlib_

    from llmtop.transport import _BoundedDecoder

    body = b'{"data": [{"id": "m"}]}' * 10
    request = httpx.Request("GET", "http://x/")
    for encoded in (zlib_.compress(body), zlib_.compress(body)[2:-4]):  # zlib-wrapped, and raw deflate
        for split in (1, 2, len(encoded)):
            decoder = _BoundedDecoder.for_coding("deflate", request)
            out = b"".join(piece for chunk in (encoded[:split], encoded[split:]) for piece in decoder.pieces(chunk))
            assert out == body, split
