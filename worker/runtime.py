"""Run the arq worker and the HTTP server in one process, supervised.

arq's own loop stops on the first Redis error and cancels running jobs on SIGTERM. This
module keeps the process up through Redis outages, drains on SIGTERM/SIGINT within a
grace period, and records jobs that cannot run (poison) instead of losing them silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import orjson
from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix, job_key_prefix
from arq.utils import timestamp_ms
from arq.worker import Function, Worker
from redis.exceptions import (
    BusyLoadingError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    WatchError,
)

from app import __version__, serialization
from app.connection import REDIS_DOWN_ERRORS, create_redis, wait_for_redis
from app.keys import Keys
from app.models import State
from app.settings import Settings
from worker.health import Health
from worker.http_server import HealthServer, build_app
from worker.instrument import ABNORMAL_ENDS, instrument_all
from worker.metrics import metrics, prime
from worker.queue_stats import QueueStats, workers_key

__all__ = ["SupervisedWorker", "check_eviction_policy", "run_worker", "worker_options"]

log = logging.getLogger("worker.runtime")

Hook = Callable[[dict[str, Any]], Awaitable[None]]

POISON_KEEP = 1000
#: Errors that pause the worker loop until Redis works again: unreachable, and also up but
#: unable to take writes (a read-only replica after a failover, out of memory, loading).
PAUSE_ERRORS: tuple[type[BaseException], ...] = (
    *REDIS_DOWN_ERRORS, ReadOnlyError, OutOfMemoryError, BusyLoadingError,
)  # fmt: skip
HEARTBEAT_EVERY = 5.0
ABNORMAL_RETRY_MS = 5000


class SupervisedWorker(Worker):
    """An arq ``Worker`` that survives Redis outages and records poison jobs."""

    def __init__(
        self,
        *args: Any,
        health: Health,
        backoff_max: float,
        keys: Keys,
        worker_id: str,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.health = health
        self.backoff_max = backoff_max
        self.keys = keys
        self.worker_id = worker_id
        self.stopping = asyncio.Event()
        self._last_beat = 0.0
        self._failures = 0

    async def _poll_iteration(self) -> None:
        try:
            await super()._poll_iteration()
            await self._beat()
        except PAUSE_ERRORS as exc:
            self._failures += 1
            await self._wait_out_outage(exc)
        else:
            self._failures = 0
            self.health.polled()
            metrics.heartbeat.set(self.health.last_poll)
            metrics.redis_up.set(1)
            metrics.jobs_running.set(sum(not t.done() for t in self.tasks.values()))

    async def _beat(self) -> None:
        """Per-worker heartbeat in Redis (arq's own health key is shared by all workers)."""
        now = time.time()
        if now - self._last_beat < HEARTBEAT_EVERY:
            return
        self._last_beat = now
        async with self.pool.pipeline(transaction=False) as pipe:
            pipe.zadd(workers_key(self.keys), {self.worker_id: now})
            pipe.zremrangebyscore(workers_key(self.keys), "-inf", now - 3600)
            await pipe.execute()

    async def _wait_out_outage(self, exc: BaseException) -> None:
        self.health.redis_down(exc)
        metrics.redis_up.set(0)
        log.error("redis unreachable, pausing the worker loop", extra={"error": repr(exc)})

        def attempt(n: int, err: BaseException) -> None:
            log.warning("waiting for redis", extra={"attempt": n, "error": repr(err)})

        # A server that answers PING but refuses writes (read-only replica after a
        # failover, out of memory) would otherwise make this a busy loop.
        pause = min(0.1 * 2 ** min(self._failures, 10), self.backoff_max)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), pause)
        if await wait_for_redis(
            self.pool, backoff_max=self.backoff_max, stop=self.stopping, on_attempt=attempt
        ):
            log.info("redis is back, resuming the worker loop")
            self.health.polled()
            metrics.redis_up.set(1)

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """arq's ``start_jobs`` with one fix: a Redis error no longer leaks a job slot.

        Upstream acquires the semaphore and bumps ``job_counter`` before its Redis calls
        and never gives them back if one raises, so each outage would shrink ``max_jobs``.
        """
        for job_id_b in job_ids:
            await self.sem.acquire()
            if self.job_counter >= self.max_jobs or not self.allow_pick_jobs:
                self.sem.release()
                return
            self.job_counter += 1
            job_id = job_id_b.decode()
            in_progress_key = in_progress_key_prefix + job_id
            try:
                async with self.pool.pipeline(transaction=True) as pipe:
                    await pipe.watch(in_progress_key)
                    ongoing_exists = await pipe.exists(in_progress_key)
                    score = await pipe.zscore(self.queue_name, job_id)
                    if ongoing_exists or not score or score > timestamp_ms():
                        self._release_sem_dec_counter_on_complete()
                        continue
                    pipe.multi()  # type: ignore[no-untyped-call]
                    pipe.psetex(in_progress_key, int(self.in_progress_timeout_s * 1000), b"1")
                    try:
                        await pipe.execute()
                    except (ResponseError, WatchError):
                        self._release_sem_dec_counter_on_complete()
                        continue
            except BaseException:
                self._release_sem_dec_counter_on_complete()
                raise
            task = self.loop.create_task(self.run_job(job_id, int(score)))
            task.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
            self.tasks[job_id] = task

    async def finish_job(
        self,
        job_id: str,
        finish: bool,
        result_data: bytes | None,
        result_timeout_s: float | None,
        keep_result_forever: bool,
        incr_score: int | None,
        keep_in_progress: float | None,
    ) -> None:
        """arq's ``finish_job``, except that a campaign job ended by arq's own timeout (or an
        exception that escaped it) while its enrollment still waits on it is put back in the
        queue instead of deleted: deleting it would leave the enrollment active forever."""
        if finish and job_id in ABNORMAL_ENDS:
            ABNORMAL_ENDS.discard(job_id)
            service = self.ctx.get("service")
            if service is not None and await service.is_pending_on(job_id):
                score = await self.pool.zscore(self.queue_name, job_id) or timestamp_ms()
                delay = ABNORMAL_RETRY_MS + max(0, timestamp_ms() - int(score))
                log.error("job ended abnormally while its enrollment still waits on it: re-queued",
                          extra={"job_id": job_id})  # fmt: skip
                await super().finish_job(job_id, False, None, result_timeout_s,
                                         keep_result_forever, delay, keep_in_progress)  # fmt: skip
                return
        ABNORMAL_ENDS.discard(job_id)
        await super().finish_job(job_id, finish, result_data, result_timeout_s,
                                 keep_result_forever, incr_score, keep_in_progress)  # fmt: skip

    async def finish_failed_job(self, job_id: str, result_data: bytes | None) -> None:
        """Jobs that fail before running (undecodable, unknown function, expired, too many
        tries) are poison: keep their payload in a capped dead-letter list, then drop them."""
        reason = "unknown"
        if result_data is not None:
            with contextlib.suppress(Exception):
                reason = str(orjson.loads(result_data).get("r"))
        raw = await self.pool.get(job_key_prefix + job_id)
        service = self.ctx.get("service")
        if (
            raw is None
            and "expired" in reason
            and service is not None
            and (await service.is_superseded(job_id))
        ):
            # A signal or cancel removed this job just as a worker picked it: a normal race,
            # not a poison job (arq reports it as expired because its key is gone).
            await super().finish_failed_job(job_id, result_data)
            metrics.jobs.labels(function="run_step" if job_id.startswith("step:") else "fire_timeout",
                                outcome="stale").inc()  # fmt: skip
            log.info("job removed while being picked up: stale", extra={"job_id": job_id})
            return
        entry = {
            "job_id": job_id,
            "reason": reason,
            "at": time.time(),
            "payload": raw.decode("utf-8", "backslashreplace")[:4096] if raw else None,
        }
        async with self.pool.pipeline(transaction=True) as pipe:
            pipe.lpush(self.keys.poison, orjson.dumps(entry))
            pipe.ltrim(self.keys.poison, 0, POISON_KEEP - 1)
            await pipe.execute()
        await super().finish_failed_job(job_id, result_data)
        label = _poison_label(reason)
        metrics.poison_jobs.labels(reason=label).inc()
        log.error("poison job dropped from the queue", extra={"job_id": job_id, "reason": reason})
        if service is not None:
            result = await service.fail_lost_job(job_id, reason)
            if result is not None and result.ok:
                log.error("enrollment failed: its job was dropped", extra={"job_id": job_id})


def _poison_label(reason: str) -> str:
    if "deserialize" in reason:
        return "undecodable"
    if "not found" in reason:
        return "unknown_function"
    if "expired" in reason:
        return "expired"
    if "retries exceeded" in reason:
        return "too_many_tries"
    return "other"


def worker_options(settings: Settings) -> dict[str, Any]:
    """The arq ``Worker`` keyword arguments derived from settings."""
    return {
        "queue_name": settings.queue_name,
        "max_jobs": settings.max_jobs,
        "job_timeout": settings.job_timeout,
        "keep_result": settings.keep_result,
        "poll_delay": settings.poll_delay,
        "max_tries": settings.max_tries,
        "job_serializer": serialization.dumps,
        "job_deserializer": serialization.loads,
        "expires_extra_ms": int(settings.job_expiry_extra * 1000),
        "handle_signals": False,
        "retry_jobs": True,
        "allow_abort_jobs": False,
        # Our own heartbeat and metrics replace arq's shared health key.
        "health_check_interval": 3600,
        "log_results": False,
    }


async def check_eviction_policy(redis: ArqRedis) -> str:
    """Warn loudly unless Redis runs with ``maxmemory-policy noeviction``.

    Uses INFO rather than CONFIG GET, which managed Redis services often disable.
    """
    info = await redis.info("memory")
    policy = str(info.get("maxmemory_policy", "unknown"))
    if policy != "noeviction":
        log.warning(
            "REDIS IS NOT SAFE FOR A JOB QUEUE: maxmemory-policy is %r, not 'noeviction'. "
            "Under memory pressure Redis will evict job keys and jobs will be LOST. "
            "Set 'maxmemory-policy noeviction' (see deploy/redis/redis.conf).",
            policy,
            extra={"maxmemory_policy": policy},
        )
    return policy


async def run_worker(
    settings: Settings,
    functions: Sequence[Function | Callable[..., Any]],
    *,
    on_startup: Hook | None = None,
    on_shutdown: Hook | None = None,
    ctx: dict[str, Any] | None = None,
    install_signal_handlers: bool = True,
    stop: asyncio.Event | None = None,
    ready: Callable[[HealthServer], None] | None = None,
) -> int:
    """Run until SIGTERM/SIGINT (or ``stop``); returns the process exit code."""
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    if install_signal_handlers:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, _on_signal, sig, stop)

    health = Health(poll_delay=settings.poll_delay)
    metrics.start_time.set(time.time())
    redis = create_redis(settings)
    keys = Keys(settings.key_prefix)
    worker_id = f"{socket.gethostname()}:{uuid.uuid4().hex[:8]}"
    server = HealthServer(
        build_app(health, metrics.registry, redis.ping, QueueStats(redis, settings).refresh),
        settings.http_host,
        settings.http_port,
    )
    await server.start()
    if ready is not None:
        ready(server)

    def attempt(n: int, err: BaseException) -> None:
        health.redis_down(err)
        metrics.redis_up.set(0)
        log.warning(
            "waiting for redis at %s",
            settings.redacted_redis_url(),
            extra={"attempt": n, "error": repr(err)},
        )

    try:
        if not await wait_for_redis(
            redis, backoff_max=settings.redis_backoff_max, stop=stop, on_attempt=attempt
        ):
            log.info("stopped before redis was reachable")
            return 0
        health.polled()
        metrics.redis_up.set(1)
        await check_eviction_policy(redis)

        instrumented = instrument_all(functions)
        prime(metrics, [f.name for f in instrumented], list(ctx.get("action_names", [])) if ctx else [],
              [s.value for s in State])  # fmt: skip
        metrics.info.labels(version=__version__).set(1)
        worker = SupervisedWorker(
            instrumented,
            redis_pool=redis,
            health=health,
            backoff_max=settings.redis_backoff_max,
            keys=keys,
            worker_id=worker_id,
            on_startup=on_startup,
            on_shutdown=on_shutdown,
            ctx={**(ctx or {}), "settings": settings, "worker_id": worker_id},
            **worker_options(settings),
        )
        worker.ctx["stopping"] = worker.stopping  # jobs can tell a drain from other cancels
        worker.main_task = main_task = asyncio.create_task(worker.main())
        health.worker_running = True
        log.info(
            "worker started",
            extra={
                "worker_id": worker_id,
                "queue": settings.queue_name,
                "functions": list(worker.functions),
            },
        )
        stop_task = asyncio.create_task(stop.wait())
        await asyncio.wait({main_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
        stop_task.cancel()
        if main_task.done():
            health.worker_running = False
            exc = main_task.exception() if not main_task.cancelled() else None
            log.error("worker loop ended unexpectedly", exc_info=exc)
            await _close_worker(worker)
            return 1
        await _drain(worker, health, settings.shutdown_grace)
        return 0
    finally:
        health.worker_running = False
        await server.stop()
        with contextlib.suppress(Exception):
            await redis.aclose()


def _on_signal(sig: signal.Signals, stop: asyncio.Event) -> None:
    if stop.is_set():
        log.warning("second %s: exiting without waiting", sig.name)
        raise SystemExit(0)
    log.info("%s received: draining", sig.name)
    stop.set()


async def _drain(worker: SupervisedWorker, health: Health, grace: float) -> None:
    """Stop taking jobs, give running ones ``grace`` seconds, cancel the rest (arq re-queues
    a cancelled job with its old score, so another worker picks it up at once)."""
    health.draining = True
    worker.allow_pick_jobs = False
    worker.stopping.set()
    running = [t for t in worker.tasks.values() if not t.done()]
    log.info("draining", extra={"running_jobs": len(running), "grace_seconds": grace})
    if running:
        _done, pending = await asyncio.wait(running, timeout=grace)
        if pending:
            log.warning("grace period over, cancelling jobs", extra={"cancelled": len(pending)})
    with contextlib.suppress(RedisError, *REDIS_DOWN_ERRORS):
        await worker.pool.zrem(workers_key(worker.keys), worker.worker_id)
    await _close_worker(worker)
    log.info(
        "worker stopped",
        extra={
            "complete": worker.jobs_complete,
            "failed": worker.jobs_failed,
            "retried": worker.jobs_retried,
        },
    )


async def _close_worker(worker: SupervisedWorker) -> None:
    # close() cancels what still runs and waits for arq to re-queue it; a job cancelled in
    # the middle of its own bookkeeping surfaces as CancelledError here, which is expected.
    with contextlib.suppress(asyncio.CancelledError, RedisError, *REDIS_DOWN_ERRORS):
        await worker.close()
    # arq's close() runs on_shutdown only after a Redis call that fails when Redis is down
    # or read-only: make sure our resources (the HTTP session) are released anyway.
    if worker.on_shutdown is not None and not worker.ctx.get("shutdown_done"):
        with contextlib.suppress(Exception):
            await worker.on_shutdown(worker.ctx)
