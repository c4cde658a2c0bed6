"""The ``ping`` job: proves end to end that some worker takes jobs from the queue."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson

__all__ = ["PING_MAX_SECONDS", "ping"]

PING_MAX_SECONDS = 60.0


async def ping(ctx: dict[str, Any], token: str, seconds: float = 0.0) -> None:
    """Sleep ``seconds`` (at most a minute), then record which worker answered ``token``."""
    started = time.time()
    limit = min(PING_MAX_SECONDS, ctx["settings"].job_timeout * 0.8)
    await asyncio.sleep(min(max(float(seconds), 0.0), limit))
    doc = {
        "worker_id": ctx["worker_id"],
        "started": started,
        "finished": time.time(),
        "try": ctx["job_try"],
    }
    # ctx["redis"] is arq's connection: the answer lives in arq's slot, beside the job.
    await ctx["redis"].set(ctx["settings"].arq_job_id(f"pong:{token}"), orjson.dumps(doc), ex=3600)
