"""Fixtures of the control API tests: the API in-process (``api``) or as a real
``campaign-worker api`` subprocess (``ApiProcess``), on the private Redis."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pydantic import SecretStr

from app.client import CampaignClient
from app.settings import Settings
from tests.conftest import subprocess_env
from tests.helpers import eventually
from worker.api.server import ApiMetrics, build_api, load_tokens
from worker.embedded_redis import free_port
from worker.http_server import HealthServer

#: Tokens every API test uses: read-write and read-only.
RW = "rw-token-0123456789abcdef"
RO = "ro-token-0123456789abcdef"
TOKENS = f"{RW},ro:{RO}"


@dataclass
class Reply:
    status: int
    body: Any
    headers: Any


class ApiCaller:
    """Calls the API with a token (``RW`` unless told otherwise)."""

    def __init__(
        self, base: str, session: aiohttp.ClientSession, metrics: ApiMetrics | None
    ) -> None:
        self.base = base
        self.session = session
        self.metrics = metrics

    async def call(
        self, method: str, path: str, json: Any = None, *, token: str | None = RW,
        data: bytes | None = None, headers: dict[str, str] | None = None,
    ) -> Reply:  # fmt: skip
        hdrs = dict(headers or {})
        if token is not None:
            hdrs["Authorization"] = f"Bearer {token}"
        async with self.session.request(method, self.base + path, json=json, data=data,
                                        headers=hdrs) as resp:  # fmt: skip
            text = await resp.text()
            try:
                body: Any = await resp.json(content_type=None)
            except ValueError:
                body = text
            return Reply(resp.status, body, resp.headers)

    async def get(self, path: str, **kw: Any) -> Reply:
        return await self.call("GET", path, **kw)

    async def post(self, path: str, json: Any = None, **kw: Any) -> Reply:
        return await self.call("POST", path, json, **kw)


@pytest.fixture
async def api(settings: Settings, client: CampaignClient) -> AsyncIterator[ApiCaller]:
    """The API in this test's event loop, on an emptied private Redis."""
    api_settings = settings.model_copy(update={"api_tokens": SecretStr(TOKENS)})
    metrics = ApiMetrics()
    server = HealthServer(
        build_api(client, api_settings, load_tokens(api_settings), metrics), "127.0.0.1", 0
    )
    await server.start()
    async with aiohttp.ClientSession() as session:
        yield ApiCaller(f"http://127.0.0.1:{server.port}", session, metrics)
    await server.stop()


class ApiProcess:
    """``campaign-worker api`` as a real subprocess."""

    def __init__(self, redis_url: str, **env: str) -> None:
        self.port = free_port()
        self.env = subprocess_env(
            REDIS_URL=redis_url, CAMPAIGN_API_PORT=str(self.port), CAMPAIGN_API_HOST="127.0.0.1",
            CAMPAIGN_API_TOKENS=TOKENS, **env,
        )  # fmt: skip
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[str] = []
        self._drained = threading.Event()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def call(self, method: str, path: str, json: Any = None, **kw: Any) -> Reply:
        """One call with the read-write token (``token=None``: none), as ApiCaller's."""
        async with aiohttp.ClientSession() as session:
            return await ApiCaller(self.base, session, None).call(method, path, json, **kw)

    async def start(self) -> ApiProcess:
        exe = Path(sys.executable).parent / "campaign-worker"
        self.proc = subprocess.Popen([str(exe), "api"], env=self.env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)  # fmt: skip
        # drained all along: a full pipe would block the server's logging
        threading.Thread(target=self._read, daemon=True).start()

        async def up() -> bool:
            # Its own "listening" line, not just an answer on the port: a port picked free
            # may have been taken meanwhile by another test's server.
            assert self.proc is not None
            if self.proc.poll() is not None:
                await asyncio.to_thread(self._drained.wait, 5)
                raise AssertionError(f"api exited {self.proc.returncode}: {self.lines[-10:]}")
            return any("control API listening" in line for line in self.lines)

        await eventually(up, 20, 0.05, "campaign-worker api to listen")
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
        self._drained.set()

    def stop(self) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(15)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
