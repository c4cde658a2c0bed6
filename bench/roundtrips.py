"""A TCP proxy in front of Redis that counts round trips (used by bench/ and the tests)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

__all__ = ["RoundTrips"]


class RoundTrips:
    """A TCP proxy in front of Redis counting round trips: request bursts the client sends
    after it has received replies. Replies are held until the client has been quiet for
    ``quiet`` seconds, so a pipeline still being written when its first replies come back
    counts once, as it does for the client. Only for counting: it adds latency."""

    def __init__(self, port: int, quiet: float = 0.02) -> None:
        self.target = port
        self.quiet = quiet
        self.count = 0
        self.url = ""
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[Any]] = set()

    async def __aenter__(self) -> RoundTrips:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"redis://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/0"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._handlers:
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target)
        loop = asyncio.get_running_loop()
        last_request = loop.time()
        answered = True

        async def requests() -> None:
            nonlocal last_request, answered
            while data := await client_r.read(1 << 16):
                if answered:
                    self.count += 1
                    answered = False
                last_request = loop.time()
                server_w.write(data)
                await server_w.drain()

        async def replies() -> None:
            nonlocal answered
            while data := await server_r.read(1 << 16):
                while (left := last_request + self.quiet - loop.time()) > 0:
                    await asyncio.sleep(left)
                answered = True
                client_w.write(data)
                await client_w.drain()

        try:
            await asyncio.gather(requests(), replies())
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            for w in (server_w, client_w):
                with contextlib.suppress(Exception):
                    w.close()
