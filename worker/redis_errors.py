"""Which exceptions mean "Redis cannot serve us right now" (pause and retry, never crash)."""

from __future__ import annotations

import asyncio

from redis.exceptions import RedisError

__all__ = ["REDIS_FAULTS", "is_redis_error"]

#: Unreachable, timed out, or up but refusing (MISCONF, READONLY, OOM, LOADING, BUSY, a
#: dropped connection mid-transaction): any RedisError, and the socket errors beneath it.
REDIS_FAULTS: tuple[type[BaseException], ...] = (
    RedisError,
    ConnectionError,
    OSError,
    asyncio.TimeoutError,
)


def is_redis_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a Redis or network fault rather than a bug."""
    return isinstance(exc, REDIS_FAULTS)
