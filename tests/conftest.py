"""Shared fixtures: a private redis-server per test session, never the one on 6379."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from app.client import CampaignClient
from app.connection import create_redis
from app.settings import Settings
from tests.fake_service import FakeService
from worker.embedded_redis import EmbeddedRedis

ROOT = Path(__file__).resolve().parent.parent
REDIS_CONF = ROOT / "deploy" / "redis" / "redis.conf"


def start_redis(data_dir: Path | None = None, *extra: str) -> EmbeddedRedis:
    """A started private server using the project's redis.conf (paths and port overridden)."""
    server = EmbeddedRedis(
        config=REDIS_CONF if REDIS_CONF.exists() else None, data_dir=data_dir, extra_args=extra
    )
    server.start()
    return server


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    """One private redis-server for the whole session."""
    server = start_redis()
    yield server
    server.close()


@pytest.fixture
def settings(redis_server: EmbeddedRedis) -> Settings:
    """Settings pointing at the private server, with test-friendly timings."""
    return Settings(
        redis_url=redis_server.url,  # type: ignore[arg-type]
        poll_delay=0.01,
        http_port=0,
        shutdown_grace=5,
        job_timeout=10,
    )


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[object]:
    """A client on an emptied database."""
    client = create_redis(settings)
    await client.flushall()
    yield client
    await client.aclose()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A server of the test's own, for tests that stop, restart or fill it."""
    server = start_redis(tmp_path / "redis")
    yield server
    server.close()


@pytest.fixture
async def svc() -> AsyncIterator[FakeService]:
    """A stand-in for the campaign service that ``http`` actions call."""
    service = await FakeService().start()
    yield service
    await service.stop()


@pytest.fixture
async def client(settings: Settings, redis: object) -> AsyncIterator[CampaignClient]:
    """A client on the emptied private server."""
    async with CampaignClient(settings=settings) as c:
        yield c


def subprocess_env(**overrides: str) -> dict[str, str]:
    """The environment for a ``campaign-worker`` subprocess: no stray CAMPAIGN_/OTEL_ values."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("CAMPAIGN_", "OTEL_", "REDIS_URL"))
    }
    env.update({"CAMPAIGN_LOG_FORMAT": "json", "PYTHONUNBUFFERED": "1"})
    env.update(overrides)
    return env


# Real local Redis Cluster / Sentinel topologies (function scope), for any test module.
from tests.stand_ins import otlp  # noqa: E402, F401
from tests.topologies import redis_cluster, redis_sentinel  # noqa: E402, F401
