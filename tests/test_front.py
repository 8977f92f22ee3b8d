"""serve's readiness front (serve/front.py), its answerer run in the test's own loop: what it answers
itself, what it hands to serve, and that both say the same words."""

from __future__ import annotations

import asyncio
import pickle
import socket
import time

import httpx
import pytest
from aiohttp import web

import loopback
from llmtop.serve import answers
from llmtop.serve import front as front_module
from llmtop.serve.front import Entry, Front, _Answerer

FAR = time.monotonic() + 3600  # an answer no breaker's cooldown will move


async def serve_standin(request: web.Request) -> web.StreamResponse:
    """serve's Unix socket, as the front relays to it: says what it was asked, and for whom."""
    body = await request.read()
    return web.Response(text=f"serve: {request.method} {request.raw_path} {body.decode()} for {request.headers.get('X-Forwarded-For')}")


@pytest.fixture
async def front(tmp_path):
    relay = str(tmp_path / "serve.sock")
    runner = web.AppRunner(web.Application(), handle_signals=False)
    runner.app.router.add_route("*", "/{tail:.*}", serve_standin)
    await runner.setup()
    await web.UnixSite(runner, relay).start()
    listening = socket.create_server(("127.0.0.1", 0))
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    answering = asyncio.ensure_future(_Answerer(listening, theirs, relay).run())
    f = Front(None, ours)
    f.port = listening.getsockname()[1]
    yield f
    f.close()
    await asyncio.wait_for(answering, 5)  # serve's end is the front's end
    listening.close()
    theirs.close()
    await runner.cleanup()


async def handed(front: Front, many: bool = False):
    """The next connection the front passes to serve (`many`: all that are waiting, at least one)."""
    loop = asyncio.get_running_loop()
    while True:
        got = front.receive()
        assert got is not None, "the front ended"
        if got:
            if many:
                return got
            (conn,) = got
            return conn
        ready = loop.create_future()
        loop.add_reader(front.ctl.fileno(), lambda: ready.done() or ready.set_result(None))
        try:
            await asyncio.wait_for(ready, 10)
        finally:
            loop.remove_reader(front.ctl.fileno())


async def ask(front: Front, path: str) -> httpx.Response:
    async with loopback.AsyncClient(trust_env=False, timeout=10) as client:
        return await client.get(f"http://127.0.0.1:{front.port}{path}")


async def test_readiness_is_answered_by_the_front_and_in_serves_words(front):
    front.table({"a": Entry(True, "ready", FAR), "b": Entry(False, "draining", FAR)}, 0)
    r = await ask(front, "/backends/a/ready")
    assert (r.status_code, r.text) == (200, "ready\n")
    r = await ask(front, "/backends/b/ready")
    assert (r.status_code, r.text) == (503, "draining\n") == answers.backend_ready(None, (False, "draining"))
    r = await ask(front, "/backends/nope/ready")
    assert (r.status_code, r.text) == answers.backend_ready(None, None) and r.status_code == 404
    assert (await ask(front, "/readyz")).text == "ready\n"
    front.put("b", Entry(False, "not yet probed", FAR), 1)
    assert (await ask(front, "/readyz")).text == "first round not done: 1 backends not polled yet\n"
    # What serve sent before the question is in the answer: a drain acknowledged is never missed.
    front.put("a", Entry(False, "draining", FAR), 0)
    assert (await ask(front, "/backends/a/ready")).text == "draining\n"


async def test_every_other_connection_reaches_serve_unread_with_its_clients_address(front):
    front.table({"a": Entry(True, "ready", time.monotonic() - 1), "b c": Entry(True, "ready", FAR)}, 0)
    for request in (  # (/metrics the front keeps: test_metrics_are_answered_...)
        b"GET /api/v1/fleet HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /api/v1/backends/a/drain HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n",  # asks the engine's loop: only serve can
        b"GET /backends/a/ready HTTP/1.1\r\nHost: x\r\n\r\n",  # past `until`: the engine decides
        b"GET /backends/b%20c/ready HTTP/1.1\r\nHost: x\r\n\r\n",  # an escape: serve's router decodes it
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", front.port)
        writer.write(request)
        await writer.drain()
        conn = await handed(front)
        try:
            assert conn.getpeername() == writer.get_extra_info("sockname")
            conn.setblocking(True)
            assert conn.recv(4096) == request  # from its first byte
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nserve")
            conn.close()
            assert (await reader.read()).endswith(b"serve")
        finally:
            conn.close()
            writer.close()


async def test_a_table_is_used_only_once_all_of_it_is_in(front):
    # A reload's table comes in several messages: never answered from half of one (a false 404).
    front.send(("full", [("a", Entry(True, "ready", FAR))], 0, False))
    reader, writer = await asyncio.open_connection("127.0.0.1", front.port)
    writer.write(b"GET /backends/a/ready HTTP/1.1\r\nHost: x\r\n\r\n")
    (await handed(front)).close()  # no table yet: serve answers
    writer.close()
    front.send(("full", [("b", Entry(False, "draining", FAR))], 0, True))
    assert (await ask(front, "/backends/a/ready")).status_code == 200
    front.send(("full", [("c", Entry(True, "ready", FAR))], 0, False))
    assert (await ask(front, "/backends/c/ready")).status_code == 404  # still the table before
    front.send(("full", [], 0, True))
    assert (await ask(front, "/backends/c/ready")).status_code == 200
    assert (await ask(front, "/backends/a/ready")).status_code == 404  # the reload removed it
    big = {f"x{i}": Entry(True, "ready", FAR) for i in range(450)}
    front.table(big, 0)
    assert [(await ask(front, f"/backends/{n}/ready")).status_code for n in ("x0", "x449")] == [200, 200]


async def test_a_table_that_stopped_coming_is_not_an_answer(front, monkeypatch):
    monkeypatch.setattr(answers, "STALL_S", 0.2)
    front.table({"a": Entry(True, "ready", FAR)}, 0)
    deadline = time.monotonic() + 10  # outer bound; the heartbeats stopped, which is the point
    while (r := await ask(front, "/backends/a/ready")).status_code == 200:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert r.status_code == 503 and "has not ticked" in r.text
    assert (await ask(front, "/readyz")).status_code == 503
    front.metrics(False, b"llmtop_up 1\n")  # written on serve's render thread: not a sign that the engine ticks
    assert (await ask(front, "/backends/a/ready")).status_code == 503
    front.beat()
    assert (await ask(front, "/backends/a/ready")).status_code == 200


async def test_metrics_are_answered_from_the_body_serve_sent_while_it_is_fresh(front, monkeypatch):
    front.table({}, 0)
    # Before any body: serve's answer, relayed; the front keeps the connection, for a scraper
    # keeps it too, and one handed to serve would never be the front's again.
    body = b"# HELP llmtop_x x\n" + b"llmtop_x 1.0\n" * 40_000  # 480 KiB: more than one message
    async with loopback.AsyncClient(trust_env=False, timeout=10, limits=httpx.Limits(max_connections=1)) as client:
        url = f"http://127.0.0.1:{front.port}/metrics"
        assert (await client.get(url)).text == "serve: GET /metrics  for 127.0.0.1"
        front.metrics(False, body)
        r = await client.get(url)  # the same connection
    assert r.status_code == 200 and r.content == body and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert front.receive() == [] and front.scraped is not None and front.scraped[1] is False  # serve hears of the scrape
    reader, writer = await asyncio.open_connection("127.0.0.1", front.port)  # HEAD, then a question on the same connection
    writer.write(b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\nGET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    answers_back = await reader.read()
    writer.close()
    head, _, rest = answers_back.partition(b"\r\n\r\n")
    assert b"Content-Length: %d" % len(body) in head and rest.startswith(b"HTTP/1.1 200")  # no body after the head
    async with loopback.AsyncClient(trust_env=False, timeout=10) as client:  # the format it holds no body of: serve's
        r = await client.get(f"http://127.0.0.1:{front.port}/metrics", headers={"Accept": "application/openmetrics-text"})
    assert r.text == "serve: GET /metrics  for 127.0.0.1"
    monkeypatch.setattr(front_module, "METRICS_FRESH_S", 0.0)  # too old to be the fleet now: serve's
    async with loopback.AsyncClient(trust_env=False, timeout=10) as client:
        assert (await client.get(f"http://127.0.0.1:{front.port}/backends/a/ready")).status_code == 404  # a kept connection
        assert (await client.get(f"http://127.0.0.1:{front.port}/metrics")).text == "serve: GET /metrics  for 127.0.0.1"


async def test_a_kept_connection_asked_something_else_is_relayed_to_serve(front):
    # Its first question was readiness, so the front keeps it: a later question for serve on it is
    # relayed, with the client's address; readiness after that is still the front's.
    front.table({"a": Entry(True, "ready", FAR)}, 0)
    async with loopback.AsyncClient(trust_env=False, timeout=10, limits=httpx.Limits(max_connections=1)) as client:
        url = f"http://127.0.0.1:{front.port}"
        assert (await client.get(url + "/backends/a/ready")).text == "ready\n"
        r = await client.get(url + "/metrics?x=1")
        assert r.text == "serve: GET /metrics?x=1  for 127.0.0.1"
        r = await client.post(url + "/api/v1/backends/a/drain", content=b"body", headers={"X-Forwarded-For": "forged"})
        assert r.text == "serve: POST /api/v1/backends/a/drain body for 127.0.0.1"  # its own word, not the client's
        assert (await client.get(url + "/backends/a/ready")).text == "ready\n"


async def test_a_body_over_serves_own_bound_is_refused_by_the_front_not_held(front):
    # serve refuses a request body over MAX_REQUEST_BYTES (413); the front, relaying a kept
    # connection's question, held up to aiohttp's default 1 MiB of it first, per connection.
    front.table({"a": Entry(True, "ready", FAR)}, 0)
    async with loopback.AsyncClient(trust_env=False, timeout=10, limits=httpx.Limits(max_connections=1)) as client:
        url = f"http://127.0.0.1:{front.port}"
        assert (await client.get(url + "/backends/a/ready")).text == "ready\n"
        r = await client.post(url + "/api/v1/backends/a/drain", content=b"x" * (front_module.MAX_REQUEST_BYTES + 1))
        assert r.status_code == 413 and "serve:" not in r.text
        r = await client.post(url + "/api/v1/backends/a/drain", content=b"x" * front_module.MAX_REQUEST_BYTES)
        assert r.text.startswith("serve: POST /api/v1/backends/a/drain xxx")


async def test_a_front_that_reads_late_gets_every_message_in_order(monkeypatch):
    # A reload of thousands of backends is more than the socket holds at once: what does not fit
    # waits on serve's side and follows in order, rather than the front being given up on.
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    f = Front(None, ours)
    try:
        f.table({f"x{i}": Entry(True, "ready " + "x" * 100, FAR) for i in range(6000)}, 0)
        f.put("x1", Entry(False, "draining", FAR), 0)
        assert not f.lost and f._backlog  # the socket is full, and it was not given up on
        theirs.setblocking(False)
        got, loop = [], asyncio.get_running_loop()
        while not got or got[-1][0] != "put":  # serve's loop sends the rest as the socket drains
            got.append(pickle.loads(await loop.sock_recv(theirs, 1 << 20)))
        assert sum(len(m[1]) for m in got if m[0] == "full") == 6000 and got[-2][3] is True
        assert got[-1][1] == [("x1", Entry(False, "draining", FAR))]
        monkeypatch.setattr(front_module, "BACKLOG_BYTES", 1000)
        f.table({f"x{i}": Entry(True, "ready " + "x" * 100, FAR) for i in range(6000)}, 0)
        assert f.lost  # too far behind: serve takes its port back (ServeSite._take)
    finally:
        f.close()
        theirs.close()


async def test_an_admin_answer_waits_until_its_change_is_in_the_fronts_socket():
    # A drain through the API answers only once the front can read it: the front reads its socket
    # before it answers (_Answerer.handle), so no question asked after the answer hears "ready".
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    theirs.setblocking(False)
    f = Front(None, ours)
    loop = asyncio.get_running_loop()
    try:
        f.table({f"x{i}": Entry(True, "ready " + "x" * 100, FAR) for i in range(6000)}, 0)  # more than the socket holds
        f.put("x1", Entry(False, "draining", FAR), 0)
        answered = asyncio.ensure_future(f.sent())
        await asyncio.sleep(0)
        assert not answered.done()  # the drain waits on serve's side
        got = []
        while not answered.done():  # the front reads; serve's loop sends the rest as room comes
            receiving = asyncio.ensure_future(loop.sock_recv(theirs, 1 << 20))
            await asyncio.wait({receiving, answered}, return_when=asyncio.FIRST_COMPLETED)
            if receiving.done():
                got.append(pickle.loads(receiving.result()))
            else:
                receiving.cancel()
        while True:  # now every message, the drain last, is in the socket
            try:
                got.append(pickle.loads(theirs.recv(1 << 20)))
            except BlockingIOError:
                break
        assert got[-1] == ("put", [("x1", Entry(False, "draining", FAR))], 0) and not f.lost
        await asyncio.wait_for(f.sent(), 1)  # nothing behind: at once
        f.table({f"x{i}": Entry(True, "ready " + "x" * 100, FAR) for i in range(6000)}, 0)
        await f.sent(within=0.05)  # a front that reads nothing in time is given up on: serve answers itself
        assert f.lost
    finally:
        f.close()
        theirs.close()


async def test_connections_wait_for_a_slow_serve_rather_than_being_dropped(front):
    # More connections for serve than the socket to it holds at once (serve stopped, or busy):
    # each waits its turn, as it would have in the listen backlog, and none is closed unanswered.
    opened = [await asyncio.open_connection("127.0.0.1", front.port) for _ in range(400)]
    for _, writer in opened:
        writer.write(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
    taken = []
    while len(taken) < len(opened):
        taken += await handed(front, many=True)
    for conn in taken:
        conn.close()
    for _, writer in opened:
        writer.close()
    assert len(taken) == 400


async def test_empty_lines_before_the_request_line_are_read_past(front):
    front.table({"a": Entry(True, "ready", FAR)}, 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", front.port)
    writer.write(b"\r\nGET /backends/a/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"ready\n")
