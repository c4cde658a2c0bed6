"""Redis as configured by deploy/redis/redis.conf: connection, persistence, memory policy."""

from __future__ import annotations

import pytest
from redis.exceptions import OutOfMemoryError

from app.connection import create_redis
from app.settings import Settings
from worker.embedded_redis import EmbeddedRedis
from worker.runtime import check_eviction_policy


def _settings(server: EmbeddedRedis) -> Settings:
    return Settings(redis_url=server.url)  # type: ignore[arg-type]


async def test_connection_and_ping(redis_server: EmbeddedRedis) -> None:
    client = create_redis(_settings(redis_server))
    try:
        assert await client.ping() is True
        await client.set("campaign:test:k", b"v")
        assert await client.get("campaign:test:k") == b"v"
    finally:
        await client.aclose()


async def test_config_is_the_projects(redis_server: EmbeddedRedis) -> None:
    client = create_redis(_settings(redis_server))
    try:
        config = await client.config_get("*")
        assert config["appendonly"] == "yes"
        assert config["appendfsync"] == "everysec"
        assert config["maxmemory-policy"] == "noeviction"
        assert int(config["maxmemory"]) > 0
        assert await check_eviction_policy(client) == "noeviction"
    finally:
        await client.aclose()


async def test_data_survives_a_restart(private_redis: EmbeddedRedis) -> None:
    client = create_redis(_settings(private_redis))
    await client.set("campaign:persist", b"kept")
    await client.zadd("campaign:queue", {"job-1": 123})
    await client.aclose()

    private_redis.restart()  # a clean shutdown flushes the AOF; nothing else saves

    client = create_redis(_settings(private_redis))
    try:
        assert await client.get("campaign:persist") == b"kept"
        assert await client.zscore("campaign:queue", "job-1") == 123
    finally:
        await client.aclose()


async def test_noeviction_refuses_writes_and_keeps_keys(private_redis: EmbeddedRedis) -> None:
    client = create_redis(_settings(private_redis))
    try:
        await client.set("campaign:precious", b"job payload")
        used = int((await client.info("memory"))["used_memory"])
        await client.config_set("maxmemory", str(used + 200_000))
        blob = b"x" * 10_000
        with pytest.raises(OutOfMemoryError, match="maxmemory"):
            for i in range(1000):
                await client.set(f"campaign:fill:{i}", blob)
        assert await client.get("campaign:precious") == b"job payload"
        assert await client.exists("campaign:fill:0") == 1  # nothing was evicted
    finally:
        await client.aclose()


async def test_eviction_policy_warning(
    private_redis: EmbeddedRedis, caplog: pytest.LogCaptureFixture
) -> None:
    client = create_redis(_settings(private_redis))
    try:
        await client.config_set("maxmemory-policy", "allkeys-lru")
        assert await check_eviction_policy(client) == "allkeys-lru"
        assert "NOT SAFE FOR A JOB QUEUE" in caplog.text
    finally:
        await client.aclose()
