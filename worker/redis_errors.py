"""Which exceptions mean "Redis cannot serve us right now" (pause and retry, never crash)."""

from __future__ import annotations

import asyncio

from redis.exceptions import RedisError, SlotNotCoveredError

__all__ = ["REDIS_FAULTS", "is_redis_error"]

#: Unreachable, timed out, or up but refusing (MISCONF, READONLY, OOM, LOADING, BUSY, a
#: dropped connection mid-transaction): any RedisError, and the socket errors beneath it.
REDIS_FAULTS: tuple[type[BaseException], ...] = (
    RedisError,
    SlotNotCoveredError,  # not a RedisError: a cluster's slots during a failover
    ConnectionError,
    OSError,
    asyncio.TimeoutError,
)


def is_redis_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a Redis or network fault rather than a bug.

    An exception raised inside redis-py itself counts too: its cluster client can race
    with its own reconnection during a failover (an ``AttributeError`` on a connection
    closed under a pipeline, a RuntimeError from two refreshes of its slot map), and that
    is an outage to wait out, not a step's failure.
    Other client-side cluster errors (keys of one call in two slots) are bugs: not here."""
    return isinstance(exc, REDIS_FAULTS) or (
        isinstance(exc, (AttributeError, RuntimeError)) and _raised_in_redis_py(exc)
    )


def _raised_in_redis_py(exc: BaseException) -> bool:
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    module = str(tb.tb_frame.f_globals.get("__name__", ""))
    return module == "redis" or module.startswith("redis.")
