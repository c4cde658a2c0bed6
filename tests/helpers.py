"""Test helpers: polling with a deadline and real ``campaign-worker`` subprocesses."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

from tests.conftest import subprocess_env
from worker.embedded_redis import free_port

T = TypeVar("T")


async def eventually(
    check: Callable[[], Awaitable[T]], timeout: float = 10.0, interval: float = 0.02, what: str = ""
) -> T:
    """Poll ``check`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or check}: last={last!r}")


class WorkerProcess:
    """``campaign-worker run`` as a real subprocess, with its JSON log lines collected."""

    def __init__(self, redis_url: str, **env: str) -> None:
        self.http_port = free_port()
        self.env = subprocess_env(
            REDIS_URL=redis_url,
            CAMPAIGN_HTTP_PORT=str(self.http_port),
            CAMPAIGN_HTTP_HOST="127.0.0.1",
            CAMPAIGN_POLL_DELAY="0.01",
            **env,
        )
        self.lines: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self.proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    def start(self, *args: str) -> WorkerProcess:
        exe = Path(sys.executable).parent / "campaign-worker"
        self.proc = subprocess.Popen(
            [str(exe), *(args or ("run",))],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.raw.append(line.rstrip("\n"))
            with contextlib.suppress(ValueError):
                self.lines.append(json.loads(line))

    def messages(self) -> list[str]:
        return [str(doc.get("msg")) for doc in self.lines]

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    async def get(self, path: str) -> tuple[int, Any]:
        """GET a worker endpoint; (0, None) when nothing listens yet."""
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.get(self.base + path, timeout=aiohttp.ClientTimeout(total=2)) as resp,
            ):
                body = await resp.text()
                try:
                    return resp.status, json.loads(body)
                except ValueError:
                    return resp.status, body
        except aiohttp.ClientError:
            return 0, None

    async def wait_status(self, path: str, status: int, timeout: float = 15.0) -> Any:
        async def check() -> Any:
            code, body = await self.get(path)
            return (code == status, body)[0] and (body or True)

        return await eventually(
            check, timeout, 0.05, f"{path} -> {status}; log tail {self.raw[-5:]}"
        )

    def signal(self, sig: signal.Signals = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout)
        if self._reader is not None:
            self._reader.join(5)
        return code

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.signal(signal.SIGTERM)
        try:
            return self.wait(30)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
