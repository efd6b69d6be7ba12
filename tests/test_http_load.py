"""The load generator's HTTP client against a scripted server: the response framings servers use,
connection reuse, and failures that must count as failed requests, never hang or crash."""
from __future__ import annotations

import asyncio
import json

import pytest

from petserve.benchmarks.http_load import HttpError, LoadClient


def framed(kind: str, payload: bytes) -> bytes:
    if kind == "length":
        return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(payload), payload)
    if kind == "chunked":
        half = len(payload) // 2
        chunks = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(p), p) for p in (payload[:half], payload[half:]))
        return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\nX-T: 1\r\n\r\n"
    if kind == "close":
        return b"HTTP/1.1 503 Busy\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (
            len(payload), payload)
    return b"HTTP/1.1 200 OK\r\n\r\n" + payload             # body to end of stream


async def scripted_server(kinds: list[str]):
    """Answers request i with kinds[i % len(kinds)] framing, echoing the JSON body it got with the
    connection's number; returns (server, connections opened)."""
    opened, served = [], [0]

    async def handle(reader, writer):
        opened.append(len(opened))
        conn = opened[-1]
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length"))
            body = json.loads(await reader.readexactly(length))
            kind = kinds[served[0] % len(kinds)]
            served[0] += 1
            writer.write(framed(kind, json.dumps({"echo": body, "conn": conn}).encode()))
            await writer.drain()
            if kind in ("close", "eof"):
                writer.close()
                return
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, opened


@pytest.mark.parametrize("kinds", [["length"], ["chunked"], ["length", "close", "eof", "chunked"]])
def test_framings_and_keep_alive(kinds):
    async def main():
        server, opened = await scripted_server(kinds)
        port = server.sockets[0].getsockname()[1]
        async with LoadClient(f"http://127.0.0.1:{port}", max_connections=2) as client:
            results = [await client.post_json("/v1/vqa", {"i": i}) for i in range(8)]
        server.close()
        return results, opened
    results, opened = asyncio.run(main())
    for i, (status, out) in enumerate(results):
        kind = kinds[i % len(kinds)]
        assert status == (503 if kind == "close" else 200) and out["echo"] == {"i": i}
    closes = sum(kinds[i % len(kinds)] in ("close", "eof") for i in range(7))
    assert len(opened) == 1 + closes        # reused unless the server ended the connection


def test_refused_connection_and_timeout_raise_http_error():
    async def main():
        async def silent(reader, writer):
            await reader.read(1 << 16)
            await asyncio.sleep(5)
        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with LoadClient(f"http://127.0.0.1:{port}", 1, timeout_s=0.2) as client:
            with pytest.raises(HttpError):
                await client.post_json("/v1/vqa", {})
        server.close()
        async with LoadClient(f"http://127.0.0.1:{port}", 1) as client:
            with pytest.raises(HttpError):
                await client.post_json("/v1/vqa", {})
    asyncio.run(main())
