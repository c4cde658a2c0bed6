"""The ``ping`` job: proves end to end that some worker takes jobs from the queue."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson

from app.keys import Keys

__all__ = ["PING_MAX_SECONDS", "ping"]

PING_MAX_SECONDS = 60.0


async def ping(ctx: dict[str, Any], token: str, seconds: float = 0.0) -> None:
    """Sleep ``seconds`` (at most a minute), then record which worker answered ``token``."""
    started = time.time()
    limit = min(PING_MAX_SECONDS, ctx["settings"].job_timeout * 0.8)
    await asyncio.sleep(min(max(float(seconds), 0.0), limit))
    keys = Keys(ctx["settings"].key_prefix)
    doc = {
        "worker_id": ctx["worker_id"],
        "started": started,
        "finished": time.time(),
        "try": ctx["job_try"],
    }
    await ctx["redis"].set(keys.ping(token), orjson.dumps(doc), ex=3600)
