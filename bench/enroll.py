"""Enrollment throughput, against plain arq ``enqueue_job`` in the same run.

    .venv/bin/python bench/enroll.py [--contacts N] [--batch B] [--single N] [--runs R]

Starts a private redis-server with the project's ``deploy/redis/redis.conf`` (AOF,
``appendfsync everysec``, as in production). Each run starts from an empty database and
a fresh client. Rows (median of R runs, each on new ids):

- ``enroll_many``: N contacts in batches of B (one pipelined round trip per batch), into a
  one-action campaign; and into the business-hours example of PRODUCT.md section 2 (which
  adds the business-hours computation per contact).
- ``enroll``: single calls, awaited one after the other.
- plain arq: N deferred ``enqueue_job`` calls with the same JSON serializer, awaited one
  after the other, and with ``asyncio.gather`` in chunks of B.

Then what one operation costs in Redis: round trips counted by a TCP proxy between client
and server (a round trip is a request burst sent after the previous replies arrived), and
commands from ``INFO commandstats`` deltas, split into those the client sends and those the
Lua script runs inside Redis.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.client import CampaignClient
from app.connection import create_redis
from app.jobs import JobTarget, step_job_id
from app.settings import Settings
from bench.roundtrips import RoundTrips
from worker.embedded_redis import EmbeddedRedis
from worker.step_queue import ClaimCode, StepQueue

REDIS_CONF = ROOT / "deploy" / "redis" / "redis.conf"
SIMPLE = {"id": "bench", "entry": "send", "nodes": {"send": {"type": "action", "action": "log"}}}
BUSINESS = {
    "id": "bench",
    "timezone": "America/New_York",
    "business_hours": {
        "weekly": {d: ["09:00-12:00", "13:00-17:00"] for d in ("mon", "tue", "wed", "thu", "fri")},
        "holiday_country": "US",
        "spread": "PT15M",
    },
    "entry": "welcome",
    "nodes": {
        "welcome": {"type": "action", "action": "log", "next": "wait_reply"},
        "wait_reply": {
            "type": "wait",
            "event": "replied",
            "timeout": "P3D",
            "on_event": "done",
            "on_timeout": "done",
        },
        "done": {"type": "exit"},
    },
}
LUA_COMMANDS = {  # counted as run inside Lua (an HGET the client sends would be too)
    name.lower()
    for script in ("transition.lua", "enroll.lua")
    for name in re.findall(r"redis\.call\('(\w+)'", (ROOT / "app/lua" / script).read_text())
}


# --- timed runs ------------------------------------------------------------------------


async def timed(
    url: str, definition: dict[str, Any] | None, body: Callable[[CampaignClient], Awaitable[int]]
) -> float:
    """Items per second of ``body`` on an empty database with a fresh client."""
    settings = Settings(redis_url=url)
    async with CampaignClient(settings=settings) as client:
        await client.redis.flushall()
        if definition is not None:
            await client.register_campaign(definition)
        await client.redis.ping()  # connect outside the timing
        started = time.perf_counter()
        items = await body(client)
        elapsed = time.perf_counter() - started
        return items / elapsed


def enroll_many(n: int, batch: int) -> Callable[[CampaignClient], Awaitable[int]]:
    async def body(client: CampaignClient) -> int:
        contacts = [{"contact_id": f"contact-{i}", "attributes": {"i": i}} for i in range(n)]
        enrolled = await client.enroll_many("bench", contacts, batch_size=batch)
        assert enrolled == n, enrolled
        return n

    return body


def enroll_single(n: int) -> Callable[[CampaignClient], Awaitable[int]]:
    async def body(client: CampaignClient) -> int:
        for i in range(n):
            await client.enroll("bench", f"contact-{i}", attributes={"i": i})
        return n

    return body


def arq_sequential(n: int) -> Callable[[CampaignClient], Awaitable[int]]:
    async def body(client: CampaignClient) -> int:
        for i in range(n):
            job = await client.redis.enqueue_job(
                "run_step", f"bench:{i}", 1, 1, _job_id=f"step:bench:{i}:1:1", _defer_by=60
            )
            assert job is not None
        return n

    return body


def arq_gathered(n: int, chunk: int) -> Callable[[CampaignClient], Awaitable[int]]:
    async def body(client: CampaignClient) -> int:
        for start in range(0, n, chunk):
            jobs = await asyncio.gather(
                *(
                    client.redis.enqueue_job(
                        "run_step", f"bench:{i}", 1, 1, _job_id=f"step:bench:{i}:1:1", _defer_by=60
                    )
                    for i in range(start, min(start + chunk, n))
                )
            )
            assert all(j is not None for j in jobs)
        return n

    return body


# --- what one operation costs -------------------------------------------------------------


async def commandstats(redis: Any) -> dict[str, int]:
    stats = await redis.info("commandstats")
    return {k.removeprefix("cmdstat_"): v["calls"] for k, v in stats.items()}


async def cost(
    server: EmbeddedRedis,
    times: int,
    op: Callable[[CampaignClient, int], Awaitable[Any]],
    prepare: Callable[[CampaignClient], Awaitable[Any]] | None = None,
    lua: bool = True,
) -> tuple[float, dict[str, float], dict[str, float]]:
    """(round trips, client commands, in-Lua commands) per call of ``op``, averaged.
    With ``lua``, commands that transition.lua and enroll.lua run are counted as run inside
    Lua."""
    observer = create_redis(Settings(redis_url=server.url))
    async with RoundTrips(server.port, quiet=0.01) as trips:
        settings = Settings(redis_url=trips.url)
        async with CampaignClient(settings=settings) as client:
            await client.redis.flushall()
            await client.register_campaign(SIMPLE)
            if prepare is not None:
                await prepare(client)
            await op(client, -1)  # warm: connection open, scripts loaded, campaign cached
            trips.count = 0
            before = await commandstats(observer)
            for i in range(times):
                await op(client, i)
            after = await commandstats(observer)
            round_trips = trips.count / times
    await observer.aclose()
    delta = {k: (v - before.get(k, 0)) / times for k, v in after.items() if k != "info"}
    delta = {k: v for k, v in delta.items() if v}
    inside = LUA_COMMANDS if lua else set()
    client_side = {k: v for k, v in delta.items() if k not in inside}
    in_lua = {k: v for k, v in delta.items() if k in inside}
    return round_trips, client_side, in_lua


async def op_enroll(client: CampaignClient, i: int) -> None:
    await client.enroll("bench", f"cost-{i}")


async def op_transition(client: CampaignClient, i: int) -> None:
    """One step transition as a worker makes it: running -> completed (service.advance),
    finishing the claimed job in the same call."""
    eid = f"bench:cost-{i}"
    applied = await client.service.advance(
        JobTarget(eid, "bench", 1, None),
        job_id=step_job_id(eid, 1, 1),
        from_node="send",
        to_node=None,
        step=1,
        attempt=1,
        reason="ok",
    )
    assert applied.ok, applied


async def prepare_running(client: CampaignClient) -> None:
    """Enrollments cost--1 .. cost-49 claimed (running) the way a worker claims them (one
    claim.lua call), ready for op_transition."""
    ids = [(await client.enroll("bench", f"cost-{i}")).enrollment_id for i in range(-1, 50)]
    service = client.service
    queue = StepQueue(
        client.redis, service.keys, lease_seconds=300, history_limit=service.settings.history_limit
    )
    batch = await queue.claim(len(ids) + 10)
    claimed = {c.job_id for c in batch.claims if c.code == ClaimCode.STARTED}
    assert claimed == {step_job_id(eid, 1, 1) for eid in ids}, batch


def batch_op(size: int) -> Callable[[CampaignClient, int], Awaitable[None]]:
    async def op(client: CampaignClient, i: int) -> None:
        contacts = [{"contact_id": f"batch{i}-{k}"} for k in range(size)]
        assert await client.enroll_many("bench", contacts, batch_size=size) == size

    return op


async def op_arq(client: CampaignClient, i: int) -> None:
    await client.redis.enqueue_job("run_step", _job_id=f"arq-cost-{i}", _defer_by=60)


def fmt_commands(commands: dict[str, float]) -> str:
    total = sum(commands.values())
    parts = ", ".join(f"{k.upper()} {v:g}" for k, v in sorted(commands.items()))
    return f"{total:g} ({parts})" if commands else "0"


# --- main --------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> None:
    n, batch, single, chunk = args.contacts, args.batch, args.single, args.batch
    server = EmbeddedRedis(config=REDIS_CONF if REDIS_CONF.exists() else None)
    server.start()
    try:
        probe = create_redis(Settings(redis_url=server.url))
        info = await probe.info("server")
        await probe.aclose()
        rows: list[tuple[str, int, Callable[[], Awaitable[float]]]] = [
            (
                f"enroll_many, batches of {batch}",
                n,
                lambda: timed(server.url, SIMPLE, enroll_many(n, batch)),
            ),
            (
                f"enroll_many, batches of {batch}, business hours",
                n,
                lambda: timed(server.url, BUSINESS, enroll_many(n, batch)),
            ),
            (
                "enroll, one call at a time",
                single,
                lambda: timed(server.url, SIMPLE, enroll_single(single)),
            ),
            (
                "arq enqueue_job, one at a time",
                n,
                lambda: timed(server.url, None, arq_sequential(n)),
            ),
            (
                f"arq enqueue_job, gather in chunks of {chunk}",
                n,
                lambda: timed(server.url, None, arq_gathered(n, chunk)),
            ),
        ]
        rates: dict[str, list[float]] = {name: [] for name, _, _ in rows}
        for _ in range(args.runs):  # interleaved, so that drift hits every row alike
            for name, _, bench in rows:
                rates[name].append(await bench())
        median = {name: statistics.median(r) for name, r in rates.items()}
        base_name = rows[3][0]
        gathered_name = rows[4][0]

        print(
            f"Python {sys.version.split()[0]}, redis-server {info['redis_version']} "
            f"(deploy/redis/redis.conf: AOF everysec), median of {args.runs} runs"
        )
        print()
        print(
            f"| {'operation':<47} | {'items':>6} | {'items/s':>8} | {'vs arq 1-by-1':>13} "
            f"| {'vs arq gather':>13} |"
        )
        print(f"|{'-' * 49}|{'-' * 7}:|{'-' * 9}:|{'-' * 14}:|{'-' * 14}:|")
        for name, items, _ in rows:
            r = median[name]
            print(
                f"| {name:<47} | {items:>6} | {r:>8,.0f} | {r / median[base_name]:>12.2f}x "
                f"| {r / median[gathered_name]:>12.2f}x |"
            )
        print()
        spread = {name: f"{min(r):,.0f}-{max(r):,.0f}" for name, r in rates.items()}
        print("range over runs: " + "; ".join(f"{k}: {v}" for k, v in spread.items()))
        print()

        costs = [
            (
                "step transition (service.advance: 1 Lua call)",
                await cost(server, 50, op_transition, prepare_running),
            ),
            ("enroll (one call)", await cost(server, 50, op_enroll)),
            (f"enroll_many, per batch of {batch}", await cost(server, 5, batch_op(batch))),
            ("arq enqueue_job (one call)", await cost(server, 50, op_arq, lua=False)),
        ]
        print(
            "| operation (per call)                            | round trips | "
            "commands sent by the client | commands run inside Lua |"
        )
        print(f"|{'-' * 49}|{'-' * 12}:|{'-' * 29}|{'-' * 25}|")
        for name, (trips, client_side, in_lua) in costs:
            print(
                f"| {name:<47} | {trips:>11g} | {fmt_commands(client_side):<27} "
                f"| {fmt_commands(in_lua)} |"
            )
        per_contact = costs[2][1]
        print()
        print(
            f"enroll_many per contact: {per_contact[0] / batch:.4f} round trips, "
            f"{sum(per_contact[1].values()) / batch:.3f} client commands "
            f"({per_contact[1].get('evalsha', 0) / batch:g} EVALSHA)"
        )
    finally:
        server.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--contacts", type=int, default=20_000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--single", type=int, default=2000, help="single enroll calls per run")
    ap.add_argument("--runs", type=int, default=3)
    asyncio.run(run(ap.parse_args()))


if __name__ == "__main__":
    main()
