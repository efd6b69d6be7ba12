"""A lean HTTP/1.1 client for the load generator: keep-alive connections over asyncio streams.

httpx spends ~11 ms of CPU per request here (one shared 2-core machine), as much as the server it
measures, so the client, not the server, set the HTTP throughput. This client only does what the
benchmark needs (POST a JSON body, read a Content-Length or chunked response, reuse the
connection) and costs well under a millisecond per request.
"""
from __future__ import annotations

import asyncio
import json
from urllib.parse import urlsplit


class HttpError(Exception):
    """The connection failed or the response was not HTTP/1.1 as expected."""


class _Connection:
    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, head: bytes, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(head + body)
        await self.writer.drain()
        status_line = await self.reader.readline()
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise HttpError(f"bad status line {status_line[:80]!r}")
        length, chunked, close = None, False, parts[0] == b"HTTP/1.0"
        while (line := await self.reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.partition(b":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value
            elif name == b"connection":
                close = value == b"close"
        if chunked:
            data = await self._read_chunked()
        elif length is not None:
            data = await self.reader.readexactly(length)
        else:
            data, close = await self.reader.read(), True
        if close:
            self.close()
        return int(parts[1]), data

    async def _read_chunked(self) -> bytes:
        out = bytearray()
        while (size := int((await self.reader.readline()).split(b";")[0], 16)) > 0:
            out += await self.reader.readexactly(size)
            await self.reader.readline()
        while (await self.reader.readline()) not in (b"\r\n", b"\n", b""):
            pass                                                  # trailers
        return bytes(out)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


class LoadClient:
    """``await client.post_json(path, obj) -> (status, parsed JSON or None)``; at most
    ``max_connections`` requests in flight, each on an idle kept-alive connection or a new one.
    A connection error or timeout raises :class:`HttpError` (the request counts as failed)."""

    def __init__(self, url: str, max_connections: int, timeout_s: float = 300.0):
        split = urlsplit(url)
        self.host, self.port = split.hostname, split.port or 80
        self.timeout_s = timeout_s
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(max_connections)

    async def post_json(self, path: str, obj) -> tuple[int, object]:
        body = json.dumps(obj).encode()
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        async with self._slots:
            conn = self._idle.pop() if self._idle else _Connection(self.host, self.port)
            try:
                status, data = await asyncio.wait_for(conn.request(head, body), self.timeout_s)
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError,
                    HttpError) as err:
                conn.close()
                raise HttpError(str(err) or type(err).__name__) from err
            self._idle.append(conn)
        try:
            return status, json.loads(data) if data else None
        except ValueError:
            return status, None

    async def __aenter__(self) -> LoadClient:
        return self

    async def __aexit__(self, *exc) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()
