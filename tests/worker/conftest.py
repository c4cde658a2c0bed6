"""Fixtures shared by the worker tests."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from app.client import CampaignClient
from app.settings import Settings
from worker.cli import main


@pytest.fixture
def cli(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Any:
    """``campaign-worker ARGS`` in-process on an emptied private Redis: (code, out, err)."""
    monkeypatch.setenv("REDIS_URL", settings.redis_url.get_secret_value())
    monkeypatch.setenv("CAMPAIGN_LOG_LEVEL", "WARNING")
    monkeypatch.delenv("CAMPAIGN_SHARDS", raising=False)

    async def flush() -> None:
        async with CampaignClient(settings=settings) as c:
            await c.redis.flushall()

    asyncio.run(flush())

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run
