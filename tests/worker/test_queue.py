"""The queue path: JSON jobs through a real arq worker, retries, and poison payloads."""

from __future__ import annotations

import asyncio
import pickle
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest
from arq import Retry
from arq.constants import job_key_prefix
from arq.worker import func

from app.connection import create_redis
from app.settings import Settings
from tests.helpers import eventually
from worker.runtime import run_worker

calls: list[tuple[str, Any, int]] = []


async def record(ctx: dict[str, Any], value: Any) -> None:
    calls.append(("record", value, ctx["job_try"]))


async def flaky(ctx: dict[str, Any], value: Any) -> None:
    calls.append(("flaky", value, ctx["job_try"]))
    if ctx["job_try"] < 3:
        raise Retry(defer=0.01)


FUNCTIONS = [record, func(flaky, name="flaky", max_tries=3)]


@pytest.fixture
async def running_worker(settings: Settings, redis: Any) -> AsyncIterator[Callable[[], None]]:
    calls.clear()
    stop = asyncio.Event()
    task = asyncio.create_task(
        run_worker(settings, FUNCTIONS, install_signal_handlers=False, stop=stop)
    )
    yield stop.set
    stop.set()
    assert await asyncio.wait_for(task, 15) == 0


async def test_job_runs_with_json_payload(
    settings: Settings, redis: Any, running_worker: Any
) -> None:
    job = await redis.enqueue_job("record", {"a": [1, 2]}, _job_id="j1")
    assert job is not None
    raw = await redis.get(job_key_prefix + "j1")
    assert orjson.loads(raw)["f"] == "record"  # JSON, not pickle
    await eventually(lambda: _async(calls), what="record job to run")
    assert calls == [("record", {"a": [1, 2]}, 1)]


async def test_transient_error_is_retried_per_policy(
    settings: Settings, redis: Any, running_worker: Any
) -> None:
    await redis.enqueue_job("flaky", "x", _job_id="f1")
    await eventually(lambda: _async(len(calls) >= 3), what="three tries")
    await eventually(lambda: _async_not(redis.exists(job_key_prefix + "f1")), what="job finished")
    assert [c[2] for c in calls] == [1, 2, 3]


async def test_exhausted_tries_drop_the_job_and_the_worker_goes_on(
    settings: Settings, redis: Any
) -> None:
    calls.clear()
    strict = Settings(**{**settings.model_dump(), "redis_url": settings.redis_url, "max_tries": 1})
    stop = asyncio.Event()
    always = func(flaky, name="flaky", max_tries=2)
    task = asyncio.create_task(
        run_worker(strict, [always, record], install_signal_handlers=False, stop=stop)
    )
    await redis.enqueue_job("flaky", "y", _job_id="f2")
    await eventually(lambda: _async_not(redis.exists(job_key_prefix + "f2")), what="job dropped")
    await redis.enqueue_job("record", "after", _job_id="after2")
    await eventually(lambda: _async(("record", "after", 1) in calls), what="next job runs")
    stop.set()
    assert await task == 0
    assert [c[2] for c in calls if c[0] == "flaky"] == [1, 2]


async def test_pickled_payload_is_never_unpickled_and_the_worker_goes_on(
    settings: Settings, redis: Any, running_worker: Any
) -> None:
    evil = pickle.dumps({"t": 1, "f": "record", "a": ["pwned"], "k": {}, "et": 0})
    await redis.set(job_key_prefix + "evil", evil, px=60_000)
    await redis.zadd(settings.arq_queue, {"evil": 1})
    await redis.enqueue_job("record", "after", _job_id="after")

    await eventually(lambda: _async(("record", "after", 1) in calls), what="next job runs")
    await eventually(
        lambda: _async_not(redis.zscore(settings.arq_queue, "evil")), what="evil dropped"
    )
    assert await redis.exists(job_key_prefix + "evil") == 0
    assert ("record", "pwned", 1) not in calls


async def test_unknown_function_is_dropped(
    settings: Settings, redis: Any, running_worker: Any
) -> None:
    await redis.enqueue_job("no_such_function", _job_id="nsf")
    await eventually(lambda: _async_not(redis.zscore(settings.arq_queue, "nsf")), what="dropped")
    await redis.enqueue_job("record", "after", _job_id="after3")
    await eventually(lambda: _async(("record", "after", 1) in calls), what="next job runs")


async def test_client_serializer_never_pickles(settings: Settings) -> None:
    client = create_redis(settings)
    try:
        assert client.job_serializer is not None
        assert client.job_serializer({"a": (1, 2)}) == b'{"a":[1,2]}'
    finally:
        await client.aclose()


async def _async(value: Any) -> Any:
    return value


async def _async_not(awaitable: Any) -> bool:
    return not await awaitable
