"""The step engine: claims campaign jobs in batches, runs them, keeps their leases.

One loop per worker process asks :class:`~worker.step_queue.StepQueue` for due jobs (one
Lua call for up to a third of ``max_jobs``, so that Redis and Python work overlap), starts
a task per job, and sleeps until the next due time or ``poll_delay``, whichever is sooner.
A second loop renews the leases of every job it runs, in one call, every lease/3, and
cuts off jobs past ``CAMPAIGN_JOB_TIMEOUT``. Nothing escapes either loop but a stop: a
Redis fault pauses it (readiness goes 503) until a claim works again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from app.jobs import STEP_FUNCTION, TIMEOUT_FUNCTION, JobTarget
from app.keys import Keys
from app.scheduling import SchedulingService
from app.settings import Settings
from worker.health import Health
from worker.metrics import metrics
from worker.redis_errors import is_redis_error
from worker.step_queue import Claim, ClaimCode, StepQueue

__all__ = ["HEARTBEAT_EVERY", "StepEngine"]

log = logging.getLogger("worker.engine")

JobFunction = Callable[..., Awaitable[Any]]

HEARTBEAT_EVERY = 5.0
#: How often running jobs are checked against CAMPAIGN_JOB_TIMEOUT.
WATCHDOG_EVERY = 0.5
#: A step whose bookkeeping failed before its outcome was known runs again after this.
HAND_BACK_DELAY_MS = 5000


class StepEngine:
    """Claims and runs campaign jobs, up to ``max_jobs`` at once."""

    def __init__(
        self,
        settings: Settings,
        ctx: dict[str, Any],
        functions: Mapping[str, JobFunction],
        health: Health,
        worker_id: str,
    ) -> None:
        self.settings = settings
        self.ctx = ctx
        self.functions = functions
        self.health = health
        self.worker_id = worker_id
        self.redis = ctx.get("campaign_redis") or ctx["redis"]
        self.keys = Keys(settings.key_prefix, settings.shards)
        self.queue = StepQueue(self.redis, self.keys, lease_seconds=settings.lease,
                               history_limit=settings.history_limit)  # fmt: skip
        self.running: dict[str, tuple[asyncio.Task[None], Claim]] = {}
        self.draining = False
        self._slot = asyncio.Event()
        self._stop = asyncio.Event()
        self._failures = 0
        self._last_beat = 0.0
        self._deadlines: dict[str, float] = {}
        # Claim in thirds of max_jobs: while one third's claim or finish is in Redis, the
        # others run their Python, instead of the whole worker waiting on each round trip
        # in turn (about +30 % steps/s in bench/steps.py).
        self._claim_chunk = max(1, (settings.max_jobs + 2) // 3)
        self._overrun: set[str] = set()
        self._superseded: set[asyncio.Task[None]] = set()
        self._renewer: asyncio.Task[None] | None = None
        #: monotonic time until which the leases of running jobs are known to hold
        self.leases_hold_until = time.monotonic() + settings.lease
        self.jobs_started = 0

    @property
    def service(self) -> SchedulingService:
        service: SchedulingService = self.ctx["service"]
        return service

    # -- the loops ------------------------------------------------------------------------

    async def run(self) -> None:
        """Claim and start jobs until :meth:`drain`; returns only then. Lease renewal goes
        on until :meth:`drain` has let the running jobs finish."""
        self._renewer = asyncio.create_task(self._renew_forever())
        try:
            while not self._stop.is_set():
                free = self.settings.max_jobs - len(self.running)
                if free <= 0:
                    if not self._failures:
                        self.health.last_poll = time.time()  # busy, not stuck
                    self._slot.clear()
                    await self._wait(self._slot, 1.0)
                    continue
                try:
                    taken, next_ms = await self._claim_round(free)
                    await self._beat()
                except Exception as exc:
                    await self._pause(exc)
                    continue
                self._serving()
                if taken >= free:
                    continue  # more may be due right now
                delay = self.settings.poll_delay
                if next_ms is not None:
                    delay = min(delay, max(0.0, next_ms / 1000 - time.time()))
                if delay > 0:
                    await self._wait(self._stop, delay)
        finally:
            if not self.draining:  # ended by a bug, not a drain: nothing left to renew for
                await self._stop_renewing()

    async def _stop_renewing(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
            self._renewer = None

    async def _claim_round(self, free: int) -> tuple[int, int | None]:
        """Claim from every shard in turn while slots are free; (entries taken, next due)."""
        taken, next_ms = 0, None
        for _ in range(self.keys.shards):
            batch = await self.queue.claim(min(free - taken, self._claim_chunk))
            taken += len(batch.claims) + len(batch.stale) + len(batch.dead)
            taken += len(batch.corrupt) + len(batch.rejected)
            if batch.next_ms is not None:
                next_ms = batch.next_ms if next_ms is None else min(next_ms, batch.next_ms)
            for job_id, reason in batch.dead:
                metrics.poison_jobs.labels(reason="malformed").inc()
                log.error("malformed job dead-lettered", extra={"job_id": job_id, "reason": reason})
            for job_id, reason in batch.corrupt:
                metrics.poison_jobs.labels(reason="corrupt_record").inc()
                log.error("enrollment record is corrupt: enrollment failed (CorruptRecord)",
                          extra={"job_id": job_id, "reason": reason})  # fmt: skip
            for job_id, eid, record, reason in batch.rejected:
                metrics.poison_jobs.labels(reason="malformed").inc()
                await self._fail_rejected(job_id, eid, record, reason)
            for job_id in batch.stale:
                function = STEP_FUNCTION if job_id.startswith("step:") else TIMEOUT_FUNCTION
                metrics.jobs.labels(function=function, outcome="stale").inc()
            for claim in batch.claims:
                self._start(claim)
            if taken >= free:
                break
        return taken, next_ms

    async def _renew_forever(self) -> None:
        """Renew the leases of running jobs every lease/3, and cut off jobs past their
        budget (one watchdog for all of them: a timer per job costs more than the job)."""
        every = self.settings.lease / 3
        next_renewal = time.monotonic() + every
        while True:
            await asyncio.sleep(min(WATCHDOG_EVERY, every))
            now = time.monotonic()
            for job_id, (task, _claim) in list(self.running.items()):
                if now > self._deadlines.get(job_id, now) and job_id not in self._overrun:
                    self._overrun.add(job_id)
                    task.cancel()
            if now < next_renewal:
                continue
            next_renewal = now + every
            held = [(claim.shard, job_id) for job_id, (_t, claim) in self.running.items()
                    if job_id not in self._overrun]  # fmt: skip
            try:
                async with asyncio.timeout(every):  # a hung call must not stall the watchdog
                    await self.queue.renew(held)
                self.leases_hold_until = now + self.settings.lease
            except Exception as exc:  # the next renewal may work; the lease has slack
                log.warning("lease renewal failed", extra={"error": repr(exc), "jobs": len(held)})

    async def _wait(self, event: asyncio.Event, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await event.wait()

    async def _pause(self, exc: Exception) -> None:
        """A claim failed: Redis is down or refusing (or a bug): back off, then try again."""
        self._failures += 1
        if self._failures == 1:
            if is_redis_error(exc):
                log.error("redis unavailable, pausing the step loop", extra={"error": repr(exc)})
            else:
                log.exception("step loop error, pausing", exc_info=exc)
        self.health.redis_down(exc)
        metrics.redis_up.set(0)
        pause = min(0.1 * 2 ** min(self._failures - 1, 10), self.settings.redis_backoff_max)
        await self._wait(self._stop, pause)

    def _serving(self) -> None:
        if self._failures:
            log.info("redis is back, resuming the step loop", extra={"failures": self._failures})
            self._failures = 0
        self.health.polled()
        metrics.heartbeat.set(self.health.last_poll)
        metrics.redis_up.set(1)
        metrics.jobs_running.set(len(self.running))

    async def _beat(self) -> None:
        """Per-worker heartbeat in Redis, read by ``campaign_workers_alive``."""
        now = time.time()
        if now - self._last_beat < HEARTBEAT_EVERY:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(self.keys.workers, {self.worker_id: now})
            pipe.zremrangebyscore(self.keys.workers, "-inf", now - 3600)
            await pipe.execute()
        self._last_beat = now

    # -- one job --------------------------------------------------------------------------

    def _start(self, claim: Claim) -> None:
        payload = claim.payload
        ctx = {
            **self.ctx,
            "job_id": claim.job_id,
            "job_try": int(claim.record.get("attempt") or 1),
            "score": claim.score_ms,
            "enqueue_time": payload.enqueue_ms,
            "record": claim.record,
            "rerun": claim.code == ClaimCode.RERUN,
            "deadline": time.monotonic() + self.settings.job_timeout,
            "leases_hold_until": lambda: self.leases_hold_until,
        }
        previous = self.running.get(claim.job_id)
        if previous is not None:
            # Our own lease on it lapsed (renewals failed for a whole lease) and we claimed it
            # again as the next attempt: the old run can no longer record anything; stop it.
            self._superseded.add(previous[0])
            previous[0].cancel()
        task = asyncio.create_task(self._run_job(claim, ctx))
        self.running[claim.job_id] = (task, claim)
        self._deadlines[claim.job_id] = ctx["deadline"]
        self._overrun.discard(claim.job_id)
        self.jobs_started += 1
        task.add_done_callback(functools.partial(self._finished, claim.job_id))

    def _finished(self, job_id: str, task: asyncio.Task[None]) -> None:
        self._superseded.discard(task)
        current = self.running.get(job_id)
        if current is not None and current[0] is task:
            del self.running[job_id]
            self._deadlines.pop(job_id, None)
            self._overrun.discard(job_id)
        self._slot.set()

    async def _fail_rejected(
        self, job_id: str, eid: str, record: dict[str, str], reason: str
    ) -> None:
        """The claim started a job whose payload we cannot use: fail its one enrollment."""
        log.error(
            "malformed job: its enrollment is failed", extra={"job_id": job_id, "reason": reason}
        )
        try:
            target = JobTarget(eid, eid.partition(":")[0], int(record.get("version") or 0),
                               record.get("timezone") or None)  # fmt: skip
            await self.service.fail(
                target, job_id=job_id, node=record.get("node") or None,
                step=int(record.get("step") or 0), attempt=int(record.get("attempt") or 1),
                error={"type": "MalformedJob", "message": f"job {job_id}: {reason}"},
            )  # fmt: skip
        except Exception as exc:  # the reconciler will find it running with no job
            log.warning("could not fail the enrollment of a malformed job",
                        extra={"job_id": job_id, "error": repr(exc)})  # fmt: skip

    def _log_claim(self, claim: Claim) -> None:
        """The claim's transition (made inside the claim script), logged and counted."""
        payload = claim.payload
        on_transition = self.service.on_transition
        if on_transition is None or payload.function != STEP_FUNCTION:
            return
        rerun = claim.code == ClaimCode.RERUN
        on_transition(payload.target.enrollment_id, {
            "from": "running" if rerun else "scheduled", "to": "running",
            "node": payload.node, "step": payload.step,
            "attempt": int(claim.record.get("attempt") or 1),
            "reason": "job re-run: its lease expired" if rerun else "job started",
            "job_id": claim.job_id, "function": payload.function,
            "campaign_id": payload.target.campaign_id,
        })  # fmt: skip

    async def _run_job(self, claim: Claim, ctx: dict[str, Any]) -> None:
        p = claim.payload
        self._log_claim(claim)
        fn = self.functions[p.function]
        kwargs: dict[str, Any] = {"campaign": p.target.campaign_id, "version": p.target.version,
                                  "node": p.node, "tz": p.target.timezone}  # fmt: skip
        if p.target.base_step:
            kwargs["base"] = p.target.base_step
        if p.otel:
            kwargs["otel"] = p.otel
        args: list[Any] = [p.target.enrollment_id, p.step]
        if p.function == STEP_FUNCTION:
            args.append(int(claim.record.get("attempt") or p.attempt or 1))
        try:
            await fn(ctx, *args, **kwargs)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task in self._superseded:
                log.warning("job claimed again after its lease lapsed: the old run stops",
                            extra={"job_id": claim.job_id})  # fmt: skip
                return
            if claim.job_id in self._overrun and not self.draining:
                # Cut off by the watchdog. Not handed back: that would re-run it as the same
                # attempt, forever if it always overruns. Its lease lapses instead, and the
                # re-run counts as a new attempt.
                log.error(
                    "job overran CAMPAIGN_JOB_TIMEOUT; it re-runs when its lease expires",
                    extra={"job_id": claim.job_id},
                )
                return
            if self.draining:
                await asyncio.shield(
                    self._hand_back(claim, "worker shutting down: step handed back", 0)
                )
            raise
        except Exception as exc:
            # The processors fail an enrollment for anything but a Redis fault themselves,
            # so this is Redis refusing the outcome write (or a bug): hand the step back.
            log.exception("could not record the job's outcome; handing it back",
                          extra={"job_id": claim.job_id, "redis": is_redis_error(exc)})  # fmt: skip
            await self._hand_back(
                claim, "outcome not recorded: step handed back", HAND_BACK_DELAY_MS
            )

    async def _hand_back(self, claim: Claim, reason: str, delay_ms: int) -> None:
        """Put a job back in the queue as the same attempt; if Redis will not take it, its
        lease runs out and any worker re-runs it."""
        p = claim.payload
        try:
            if p.function == TIMEOUT_FUNCTION:
                await self.service.release_timeout(p.target, job_id=claim.job_id, step=p.step,
                                                   delay_ms=delay_ms)  # fmt: skip
            else:
                attempt = int(claim.record.get("attempt") or p.attempt or 1)
                await self.service.release(p.target, job_id=claim.job_id, node=p.node, step=p.step,
                                           attempt=attempt, reason=reason, delay_ms=delay_ms)  # fmt: skip
        except Exception as exc:
            log.warning("could not hand the job back; its lease will expire",
                        extra={"job_id": claim.job_id, "error": repr(exc)})  # fmt: skip

    # -- stopping -------------------------------------------------------------------------

    async def drain(self, grace: float) -> None:
        """Stop claiming; give running jobs ``grace`` seconds; hand back the rest."""
        self._stop.set()
        self.draining = True
        tasks = [t for t, _ in self.running.values() if not t.done()]
        log.info("draining", extra={"running_jobs": len(tasks), "grace_seconds": grace})
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=grace)
            if pending:
                log.warning("grace period over, cancelling jobs", extra={"cancelled": len(pending)})
                for task in pending:
                    task.cancel()
                await asyncio.wait(pending, timeout=10)
        await self._stop_renewing()

    def stop(self) -> None:
        """Stop claiming (without waiting)."""
        self._stop.set()
