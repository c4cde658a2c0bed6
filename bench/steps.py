"""Campaign steps per second through one worker, against plain arq and BullMQ no-op jobs,
all on the same Redis in the same run.

    .venv/bin/python bench/steps.py [--jobs N] [--repeats R] [--no-bullmq]

Each repeat starts one private redis-server (the project's redis.conf: AOF everysec) and
runs, one after the other with the database flushed between them:
- "plain arq": N no-op jobs enqueued, then one arq Worker (same poll delay, max_jobs and
  JSON serializer) runs them in burst mode;
- "campaign step": N contacts enrolled (enroll_many) in a one-action campaign whose handler
  does nothing; our worker (step engine, in this process) runs every step (claim, handler,
  the transition that completes the enrollment) until all N are completed;
- "BullMQ": N no-op jobs added, then one BullMQ Worker (concurrency = max_jobs) runs them
  (bench/bullmq, a pinned bullmq; skipped with a note when node/npm are missing).
Then one more campaign run goes through a counting TCP proxy to report round trips per
step. Prints medians, every run, and the ratio to plain arq.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from arq import Worker
from bullmq_runner import bullmq_rate
from roundtrips import RoundTrips

from app import serialization
from app.client import CampaignClient
from app.connection import create_redis
from app.settings import Settings
from worker.actions import ActionContext, default_registry
from worker.embedded_redis import EmbeddedRedis
from worker.main import serve

ROOT = Path(__file__).resolve().parents[1]
POLL = 0.01
MAX_JOBS = 50


async def noop_job(ctx: dict[str, Any]) -> None:
    return None


async def noop_action(ctx: ActionContext) -> str | None:
    return None


async def flush(url: str) -> None:
    redis = create_redis(Settings(redis_url=url))  # type: ignore[arg-type]
    await redis.flushall()
    await redis.aclose()


async def plain_arq(url: str, n: int) -> float:
    settings = Settings(redis_url=url, queue_name="bench:arq")  # type: ignore[arg-type]
    redis = create_redis(settings)
    for start in range(0, n, 1000):
        await asyncio.gather(*(redis.enqueue_job("noop_job", _job_id=f"j{i}")
                               for i in range(start, min(n, start + 1000))))  # fmt: skip
    worker = Worker([noop_job], redis_pool=redis, queue_name="bench:arq", burst=True,
                    poll_delay=POLL, max_jobs=MAX_JOBS, keep_result=0, handle_signals=False,
                    job_serializer=serialization.dumps, job_deserializer=serialization.loads)  # fmt: skip
    started = time.perf_counter()
    await worker.async_run()
    elapsed = time.perf_counter() - started
    assert worker.jobs_complete == n, worker.jobs_complete
    await redis.aclose()
    return n / elapsed


async def campaign_steps(url: str, n: int, client_url: str | None = None, shards: int = 1) -> float:
    """Steps/s; the worker talks to ``url`` (maybe a proxy), the client to ``client_url``."""
    settings = Settings(redis_url=url, poll_delay=POLL, max_jobs=MAX_JOBS, http_port=0,  # type: ignore[arg-type]
                        shards=shards)  # fmt: skip
    client_settings = settings.model_copy(
        update={"redis_url": Settings(redis_url=client_url or url).redis_url}
    )  # type: ignore[arg-type]
    actions = default_registry()
    actions.register("noop", noop_action)
    async with CampaignClient(settings=client_settings) as client:
        await client.register_campaign({"id": "bench", "entry": "a", "nodes": {
            "a": {"type": "action", "action": "noop", "next": None}}})  # fmt: skip
        await client.enroll_many("bench", ({"contact_id": f"c{i}"} for i in range(n)))
        stop = asyncio.Event()
        started = time.perf_counter()
        task = asyncio.create_task(
            serve(settings, actions, install_signal_handlers=False, stop=stop)
        )
        while (await client.service.store.count_by_state("bench"))["completed"] < n:
            await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - started
        stop.set()
        await task
    return n / elapsed


async def round_trips_per_step(port: int, n: int) -> float:
    async with RoundTrips(port, quiet=0.001) as proxy:
        await campaign_steps(proxy.url, n, client_url=f"redis://127.0.0.1:{port}/0")
        return proxy.count / n


def row(name: str, rates: list[float], base: float | None) -> str:
    median = statistics.median(rates)
    ratio = f"{median / base:.2f}x" if base else "-"
    runs = ", ".join(f"{r:,.0f}" for r in rates)
    return f"| {name:<36} | {median:>9,.0f} | {ratio:>8} | {runs} |"


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-bullmq", action="store_true")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    arq_rates: list[float] = []
    our_rates: list[float] = []
    bull_rates: list[float] = []
    trips = 0.0
    for _ in range(args.repeats):
        with EmbeddedRedis(config=ROOT / "deploy" / "redis" / "redis.conf") as redis:
            arq_rates.append(await plain_arq(redis.url, args.jobs))
            await flush(redis.url)
            our_rates.append(await campaign_steps(redis.url, args.jobs))
            await flush(redis.url)
            if not args.no_bullmq:
                rate = bullmq_rate(redis.url, args.jobs, concurrency=MAX_JOBS)
                if rate is not None:
                    bull_rates.append(rate)
    with EmbeddedRedis(config=ROOT / "deploy" / "redis" / "redis.conf") as redis:
        trips = await round_trips_per_step(redis.port, min(args.jobs, 2000))
    base = statistics.median(arq_rates)
    print(f"{args.jobs} jobs per run, {args.repeats} runs, same redis-server per run, "
          f"poll_delay={POLL}s, max_jobs/concurrency={MAX_JOBS}")  # fmt: skip
    print(f"| {'what':<36} | {'median/s':>9} | {'vs arq':>8} | runs/s |")
    print(f"|{'-' * 38}|{'-' * 11}|{'-' * 10}|--------|")
    print(row("plain arq no-op job", arq_rates, base))
    print(row("campaign step (claim+action+finish)", our_rates, base))
    if bull_rates:
        print(row("BullMQ no-op job", bull_rates, base))
    else:
        print("| BullMQ no-op job | not run (--no-bullmq, or node/npm missing) | | |")
    print(f"round trips per campaign step (counting proxy, {min(args.jobs, 2000)} steps): "
          f"{trips:.3f}")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
