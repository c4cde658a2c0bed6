"""An aiohttp stand-in for the campaign service that ``http`` actions call.

Behaviour is chosen by the URL path, so a campaign definition says what each step meets:
  /ok                 200
  /outcome/<name>     200 with {"outcome": name}
  /flaky/<n>          503 for the first n calls of each idempotency key, then 200
  /bad                400
  /toggle             503 while ``failing`` is set, else 200
  /ratelimit/<s>      429 with Retry-After: s on the first call of each key, then 200
  /hang               holds the call until ``release`` is set (then 200)
  /redirect/<code>    <code> (3xx) with Location: ``redirect_to``
  /huge/<mb>[/<st>]   status st (200) streaming <mb> MB of JSON-looking bytes, chunked and
                      generated lazily (``streamed`` counts all bytes sent)
  /hugelen/<mb>       200 declaring Content-Length: <mb> MB, streamed the same way
  /hugetext/<mb>      200 text/html of <mb> MB, streamed the same way
  /bytes/<st>         status st with a body that is not UTF-8
Every call is recorded with its time, path, idempotency key, headers, JSON body and raw bytes.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from worker.embedded_redis import free_port


@dataclass
class Call:
    at: float
    path: str
    key: str
    body: dict[str, Any]
    headers: dict[str, str]
    raw: bytes = b""


@dataclass
class FakeService:
    calls: list[Call] = field(default_factory=list)
    failing: bool = True
    release: asyncio.Event = field(default_factory=asyncio.Event)
    hung: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0
    redirect_to: str = "http://127.0.0.1:9/landing"
    streamed: int = 0
    _runner: web.AppRunner | None = None
    _per_key: Counter[tuple[str, str]] = field(default_factory=Counter)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def calls_for(self, enrollment_id: str) -> list[Call]:
        return [c for c in self.calls if c.body.get("enrollment_id") == enrollment_id]

    async def stream(
        self, request: web.Request, mb: int, *, status: int = 200, declare: bool = False,
        content_type: str = "application/json",
    ) -> web.StreamResponse:  # fmt: skip
        """Send ``mb`` MB made one 64 KiB chunk at a time, stopping when the client leaves."""
        size = mb * 1_000_000
        resp = web.StreamResponse(status=status, headers={"Content-Type": content_type})
        if declare:
            resp.content_length = size
        await resp.prepare(request)
        chunk = b'{"outcome": "' + b"x" * (65536 - 13)
        sent = 0
        try:
            while sent < size:
                piece = chunk[: size - sent]
                await resp.write(piece)
                sent += len(piece)
                self.streamed += len(piece)
            await resp.write_eof()
        except (ConnectionError, RuntimeError):
            pass  # the client hung up, as it should past its cap
        return resp

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = {}
        key = request.headers.get("Idempotency-Key", "")
        call = Call(time.time(), request.path, key, body, dict(request.headers), raw)
        self.calls.append(call)
        parts = request.path.strip("/").split("/")
        self._per_key[(request.path, key)] += 1
        n = self._per_key[(request.path, key)]
        kind = parts[0]
        if kind == "ok":
            return web.json_response({})
        if kind == "outcome":
            return web.json_response({"outcome": parts[1]})
        if kind == "flaky":
            if n <= int(parts[1]):
                return web.Response(status=503, text="try later")
            return web.json_response({})
        if kind == "bad":
            return web.Response(status=400, text="no such contact")
        if kind == "toggle":
            return web.Response(status=503) if self.failing else web.json_response({})
        if kind == "ratelimit":
            if n == 1:
                return web.Response(status=429, headers={"Retry-After": parts[1]})
            return web.json_response({})
        if kind == "hang":
            self.hung.set()
            await self.release.wait()
            return web.json_response({})
        if kind == "redirect":
            return web.Response(status=int(parts[1]), headers={"Location": self.redirect_to})
        if kind == "huge":
            return await self.stream(
                request, int(parts[1]), status=int(parts[2]) if len(parts) > 2 else 200
            )
        if kind == "hugelen":
            return await self.stream(request, int(parts[1]), declare=True)
        if kind == "hugetext":
            return await self.stream(request, int(parts[1]), content_type="text/html")
        if kind == "bytes":
            return web.Response(
                status=int(parts[1]), body=b"\xff\xfe bad \xc3\x28 contact \x80",
                content_type="text/plain", charset="utf-8",
            )  # fmt: skip
        return web.Response(status=404)

    async def start(self) -> FakeService:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        self.port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        self.release.set()
        if self._runner is not None:
            await self._runner.cleanup()
