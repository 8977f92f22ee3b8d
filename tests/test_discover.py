"""Finding servers on local ports for a first run without a config, and `llmtop init` writing them down."""

import asyncio
import json

from llmtop.config import loads_config
from llmtop.discover import KNOWN_PORTS, as_backends, discover
from llmtop.starter import starter_config


async def serve(routes):
    async def handle(reader, writer):
        request = await reader.readuntil(b"\r\n\r\n")
        path = request.split(b" ")[1].decode()
        status, body = routes.get(path, (404, "not found"))
        writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n{body}".encode())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_finds_what_answers_and_skips_what_does_not():
    ollama, ollama_port = await serve({"/": (200, "Ollama is running"), "/api/tags": (200, json.dumps({"models": [{"name": "llama3.2:latest"}]}))})
    lmstudio, lm_port = await serve({"/v1/models": (200, json.dumps({"data": [{"id": "qwen2.5-7b-instruct"}]}))})
    impostor, other_port = await serve({"/": (200, "<html>a web app</html>")})
    known = (
        ("ollama", ollama_port, "/", "ollama is running"),
        ("lmstudio", lm_port, "/v1/models", '"data"'),
        ("ollama", other_port, "/", "ollama is running"),  # answers, but is not Ollama
        ("vllm", 9, "/version", '"version"'),  # nothing listens
    )
    try:
        found = await discover(known=known, timeout_s=1)
    finally:
        for s in (ollama, lmstudio, impostor):
            s.close()
    assert [(f.provider, f.models) for f in found] == [("ollama", ("llama3.2:latest",)), ("lmstudio", ("qwen2.5-7b-instruct",))]
    backends = as_backends(found)
    assert [b.name for b in backends] == ["local-ollama", "local-lmstudio"]
    config = loads_config(starter_config(found))
    assert [b.url for b in config.backends] == [f.url for f in found]


def test_the_usual_ports_are_the_ones_the_issue_names():
    assert {(p, port) for p, port, *_ in KNOWN_PORTS} == {
        ("ollama", 11434), ("vllm", 8000), ("llamacpp", 8080), ("lmstudio", 1234),
        ("sglang", 30000), ("tgi", 3000), ("litellm", 4000),
    }
