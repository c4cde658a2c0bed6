"""Admin commands of the CLI (they talk to Redis, never to a worker directly)."""

from __future__ import annotations

import asyncio
import sys
import time
import uuid

import orjson

from app.connection import REDIS_DOWN_ERRORS, create_redis
from app.keys import Keys
from app.settings import Settings

__all__ = ["ping_workers"]


async def ping_workers(settings: Settings, wait_seconds: float) -> int:
    """Enqueue a ``ping`` job and wait for a worker to run it: exit 0 if one did, 1 if not."""
    redis = create_redis(settings)
    token = uuid.uuid4().hex
    keys = Keys(settings.key_prefix)
    try:
        await redis.enqueue_job("ping", token, _job_id=f"ping:{token}")
        deadline = time.monotonic() + wait_seconds
        while time.monotonic() < deadline:
            raw = await redis.get(f"{keys.prefix}:ping:{token}")
            if raw:
                doc = orjson.loads(raw)
                print(f"pong from {doc['worker_id']} in {doc['finished'] - doc['started']:.3f}s")
                return 0
            await asyncio.sleep(0.05)
        await redis.zrem(settings.queue_name, f"ping:{token}")
        print(f"no worker answered within {wait_seconds:g}s", file=sys.stderr)
        return 1
    except REDIS_DOWN_ERRORS as exc:
        print(f"redis unreachable at {settings.redacted_redis_url()}: {exc}", file=sys.stderr)
        return 1
    finally:
        await redis.aclose()
