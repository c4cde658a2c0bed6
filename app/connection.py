"""Redis connections shared by the client and the worker."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from arq.connections import ArqRedis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app import serialization
from app.settings import Settings

__all__ = [
    "REDIS_DOWN_ERRORS",
    "connect",
    "connection_options",
    "create_redis",
    "wait_for_redis",
]

log = logging.getLogger(__name__)

#: Errors that mean "Redis is not reachable right now" (as opposed to a bad command).
REDIS_DOWN_ERRORS: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    ConnectionError,
    OSError,
    asyncio.TimeoutError,
)

_WAIT_ERRORS: tuple[type[BaseException], ...] = (*REDIS_DOWN_ERRORS, RedisError)


#: Connection options that only TCP connections accept (a unix socket refuses them).
_TCP_ONLY = frozenset({"socket_keepalive", "socket_keepalive_options", "socket_type"})


def connection_options(url: str, **overrides: Any) -> dict[str, Any]:
    """The redis-py connection options for ``url``'s scheme, then ``overrides``.

    TCP keepalive applies to ``redis://`` and ``rediss://`` only (a unix socket connection
    refuses the option), and the TLS hostname check to ``rediss://`` only.
    """
    scheme = urlsplit(url).scheme
    options: dict[str, Any] = {
        "socket_connect_timeout": 2.0,
        # A command that hangs (a stalled or paused server) must fail rather than hold a
        # job until arq's timeout drops it. No command we send blocks by design.
        "socket_timeout": 10.0,
        "health_check_interval": 15,
    }
    if scheme in {"redis", "rediss"}:
        options["socket_keepalive"] = True
    if scheme == "rediss":
        options["ssl_check_hostname"] = True
    options.update(overrides)
    if scheme == "unix":
        options = {k: v for k, v in options.items() if k not in _TCP_ONLY}
    return options


def create_redis(settings: Settings, **kwargs: Any) -> ArqRedis:
    """An arq-capable Redis client for ``REDIS_URL`` with JSON job serialization.

    ``from_url`` understands auth, ``rediss://`` (TLS, hostname checked) and ``unix://``.
    Nothing is connected until the first command.
    """
    url = settings.redis_url.get_secret_value()
    redis: ArqRedis = ArqRedis.from_url(url, **connection_options(url, **kwargs))
    redis.job_serializer = serialization.dumps
    redis.job_deserializer = serialization.loads
    redis.default_queue_name = settings.arq_queue
    redis.expires_extra_ms = int(settings.job_expiry_extra * 1000)
    return redis


async def wait_for_redis(
    redis: ArqRedis,
    *,
    backoff_max: float,
    stop: asyncio.Event | None = None,
    on_attempt: Callable[[int, BaseException], None] | None = None,
) -> bool:
    """PING until Redis answers, backing off exponentially up to ``backoff_max`` seconds.

    Returns False if ``stop`` was set first.
    """
    delay = 0.1
    attempt = 0
    while True:
        attempt += 1
        try:
            await redis.ping()
            return True
        except _WAIT_ERRORS as exc:
            if on_attempt is not None:
                on_attempt(attempt, exc)
        if stop is not None:
            try:
                await asyncio.wait_for(stop.wait(), delay)
                return False
            except TimeoutError:
                pass
        else:
            await asyncio.sleep(delay)
        delay = min(delay * 2, backoff_max)


async def connect(settings: Settings) -> ArqRedis:
    """Create a client and check it answers (raises the connection error if not)."""
    redis = create_redis(settings)
    try:
        await redis.ping()
    except BaseException:
        await redis.aclose()
        raise
    return redis
