"""A user's action handlers, loaded by the worker through ``CAMPAIGN_ACTIONS`` in tests."""

from __future__ import annotations

from worker.actions import ActionContext, action


@action("sms")
async def send_sms(ctx: ActionContext) -> str | None:
    """Pretend to text the contact; the 'vip' attribute picks another branch."""
    return "vip" if ctx.attributes.get("vip") else None


@action("refuse_writes_once")
async def refuse_writes_once(ctx: ActionContext) -> str | None:
    """On the first call, make Redis refuse every write (NOREPLICAS) for 2 s, so recording
    this step's outcome fails after the action ran (as during a failover)."""
    import os
    import threading

    import redis
    from redis.asyncio import Redis

    client = Redis.from_url(os.environ["REDIS_URL"])
    calls = await client.incr("user-actions:refuse_writes_once:calls")
    if calls == 1:
        await client.config_set("min-replicas-to-write", 1)

        def restore() -> None:
            redis.Redis.from_url(os.environ["REDIS_URL"]).config_set("min-replicas-to-write", 0)

        threading.Timer(2.0, restore).start()
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
