"""A user's action handlers, loaded by the worker through ``CAMPAIGN_ACTIONS`` in tests."""

from __future__ import annotations

from worker.actions import ActionContext, action


@action("sms")
async def send_sms(ctx: ActionContext) -> str | None:
    """Pretend to text the contact; the 'vip' attribute picks another branch."""
    return "vip" if ctx.attributes.get("vip") else None


@action("stall_redis_once")
async def stall_redis_once(ctx: ActionContext) -> str | None:
    """On the first attempt, pause Redis writes for longer than the job may take, so the
    step's own bookkeeping stalls (as in a failover)."""
    if ctx.attempt == 1:
        import os

        from redis.asyncio import Redis

        client = Redis.from_url(os.environ["REDIS_URL"])
        await client.execute_command("CLIENT", "PAUSE", "2500", "WRITE")
        await client.aclose()
    return None


@action("block_loop_once")
async def block_loop_once(ctx: ActionContext) -> str | None:
    """On the first attempt, block the event loop (a synchronous call in an async handler)
    for longer than the job may take, so arq's own job timeout fires."""
    if ctx.attempt == 1:
        import time

        time.sleep(1.3)
    return None
