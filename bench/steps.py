"""Campaign steps per second through one worker, against plain arq no-op jobs in the same run.

    .venv/bin/python bench/steps.py [--jobs N] [--repeats R]

Each repeat starts a private redis-server. "plain arq": N no-op jobs enqueued, one arq
Worker (burst, same poll delay, max_jobs and JSON serializer) runs them. "campaign step":
N contacts enrolled (enroll_many) in a one-action campaign whose handler does nothing;
our worker runs every step (claim + handler + advance to completed, each one Lua call)
until all N are completed. Prints medians and the ratio.
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

from arq import Worker

from app import serialization
from app.client import CampaignClient
from app.connection import create_redis
from app.settings import Settings
from worker.actions import ActionContext, default_registry
from worker.embedded_redis import EmbeddedRedis
from worker.main import serve

POLL = 0.01
MAX_JOBS = 50


async def noop_job(ctx: dict[str, Any]) -> None:
    return None


async def noop_action(ctx: ActionContext) -> str | None:
    return None


async def plain_arq(url: str, n: int) -> float:
    settings = Settings(redis_url=url, queue_name="bench:arq")  # type: ignore[arg-type]
    redis = create_redis(settings)
    await asyncio.gather(*(redis.enqueue_job("noop_job", _job_id=f"j{i}") for i in range(n)))
    worker = Worker([noop_job], redis_pool=redis, queue_name="bench:arq", burst=True,
                    poll_delay=POLL, max_jobs=MAX_JOBS, keep_result=0, handle_signals=False,
                    job_serializer=serialization.dumps, job_deserializer=serialization.loads)  # fmt: skip
    started = time.perf_counter()
    await worker.async_run()
    elapsed = time.perf_counter() - started
    assert worker.jobs_complete == n, worker.jobs_complete
    await redis.aclose()
    return elapsed


async def campaign_steps(url: str, n: int) -> float:
    settings = Settings(redis_url=url, poll_delay=POLL, max_jobs=MAX_JOBS, http_port=0)  # type: ignore[arg-type]
    actions = default_registry()
    actions.register("noop", noop_action)
    async with CampaignClient(settings=settings) as client:
        await client.register_campaign({"id": "bench", "entry": "a", "nodes": {
            "a": {"type": "action", "action": "noop", "next": None}}})  # fmt: skip
        await client.enroll_many("bench", ({"contact_id": f"c{i}"} for i in range(n)))
        stop = asyncio.Event()
        started = time.perf_counter()
        task = asyncio.create_task(serve(settings, actions, install_signal_handlers=False, stop=stop))
        while (await client.service.store.count_by_state("bench"))["completed"] < n:
            await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - started
        stop.set()
        await task
    return elapsed


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    arq_rates, our_rates = [], []
    for _ in range(args.repeats):
        with EmbeddedRedis() as a:
            arq_rates.append(args.jobs / await plain_arq(a.url, args.jobs))
        with EmbeddedRedis() as b:
            our_rates.append(args.jobs / await campaign_steps(b.url, args.jobs))
    arq_m, our_m = statistics.median(arq_rates), statistics.median(our_rates)
    print(f"{args.jobs} jobs per run, {args.repeats} runs, poll_delay={POLL}s, max_jobs={MAX_JOBS}")
    print(f"| {'what':<36} | {'median/s':>9} | {'runs/s':<28} |")
    print(f"|{'-' * 38}|{'-' * 11}|{'-' * 30}|")
    print(
        f"| {'plain arq no-op job':<36} | {arq_m:>9,.0f} | {', '.join(f'{r:,.0f}' for r in arq_rates):<28} |"
    )
    print(
        f"| {'campaign step (claim+action+advance)':<36} | {our_m:>9,.0f} | {', '.join(f'{r:,.0f}' for r in our_rates):<28} |"
    )
    print(f"ratio campaign step / plain arq job: {our_m / arq_m:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
