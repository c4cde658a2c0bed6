"""The two campaign job processors: run a step (``run_step``) and fire a wait's timeout
(``fire_timeout``).

The step engine (:mod:`worker.engine`) claims a job, which starts its enrollment, then
calls one of these with arq's calling convention (``ctx``, args, kwargs). Every write is a
transition that checks the enrollment's state, step, attempt and current job, so a job
that no longer matches is *stale* and does nothing but count itself; the transition that
records the outcome also retires the job and queues the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import orjson
from opentelemetry import trace
from opentelemetry.trace import INVALID_SPAN, Span

from app.campaigns import ActionNode, Campaign
from app.errors import CampaignNotFound
from app.jobs import JobTarget
from app.models import State
from app.scheduling import SchedulingService, error_info
from app.settings import Settings
from app.store import Applied
from app.tracing import enabled as tracing_enabled
from app.tracing import tracer
from worker.actions import ActionContext, ActionRegistry, PermanentError, TransientError
from worker.metrics import metrics
from worker.redis_errors import is_redis_error
from worker.retries import backoff_delay
from worker.telemetry import mark_error

__all__ = ["fire_timeout", "persist", "run_step"]

log = logging.getLogger("worker.processors")


def _trace_id() -> str | None:
    ctx = trace.get_current_span().get_span_context()
    return f"{ctx.trace_id:032x}" if ctx.is_valid else None


def _annotate(target: JobTarget, node: str | None, step: int, attempt: int | None) -> None:
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes({
            "campaign.id": target.campaign_id,
            "campaign.version": target.version,
            "campaign.enrollment_id": target.enrollment_id,
            "campaign.node": node or "",
            "campaign.step": int(step),
        })  # fmt: skip
        if attempt is not None:
            span.set_attribute("campaign.attempt", int(attempt))


def _call_timeout(node: ActionNode, settings: Settings) -> float:
    """A handler must finish well inside the job budget, leaving time to record its outcome."""
    wanted = node.timeout.total_seconds() if node.timeout else settings.http_action_timeout
    return max(0.05, min(wanted, settings.job_timeout * 0.8))


async def persist(ctx: dict[str, Any], write: Callable[[], Awaitable[Applied]]) -> Applied:
    """Run a finishing write, retrying through Redis errors while the step is still ours.

    Once an action has run, its outcome should be recorded rather than the step re-run. The
    retries stop at the job's deadline, and once the lease may have lapsed (renewals are
    writes too, and fail in the same outage): then another worker may take the step over
    as the next attempt, so this one gives up (the error is raised).
    """
    deadline: float = ctx.get("deadline", time.monotonic() + 5.0)
    lease_until = ctx.get("leases_hold_until")
    pause = 0.05
    while True:
        try:
            return await write()
        except Exception as exc:
            limit = deadline if lease_until is None else min(deadline, lease_until() - 1.0)
            if not is_redis_error(exc) or time.monotonic() + pause >= limit:
                raise
            log.warning("recording the outcome failed; retrying", extra={"error": repr(exc)})
            await asyncio.sleep(pause)
            pause = min(pause * 2, 1.0)


@functools.lru_cache(maxsize=256)
def _action_metrics(action: str) -> tuple[dict[str, Any], Any]:
    calls = {o: metrics.action_calls.labels(action=action, outcome=o)
             for o in ("success", "transient", "permanent")}  # fmt: skip
    return calls, metrics.action_duration.labels(action=action)


def _action_span(action: str, key: str) -> contextlib.AbstractContextManager[Span]:
    if not tracing_enabled():
        return contextlib.nullcontext(INVALID_SPAN)
    return tracer.start_as_current_span(
        f"action {action}",
        attributes={"campaign.action": action, "campaign.idempotency_key": key},
        record_exception=False,
        set_status_on_exception=False,
    )


def _label(result: Applied, ok: str) -> str:
    if result.job_conflict:
        metrics.job_conflicts.inc()
        log.error("job id conflict: the next job's id is taken", extra={"job": result.job_conflict})
        return "conflict"
    return ok if result.ok else "stale"


async def run_step(
    ctx: dict[str, Any],
    enrollment_id: str,
    step: int,
    attempt: int,
    *,
    campaign: str,
    version: int,
    node: str | None,
    tz: str | None = None,
    base: int = 0,
    otel: dict[str, str] | None = None,
) -> str:
    """Execute one claimed step; returns the outcome label for metrics."""
    # The engine passes the attempt the claim recorded (a re-run's is bumped), and the job
    # instrumentation has bound the log context.
    target = JobTarget(enrollment_id, campaign, int(version), tz, int(base))
    _annotate(target, node, step, attempt)
    try:
        outcome = await _run_step(ctx, target, int(step), int(attempt), node,
                                  ctx.get("record") or {})  # fmt: skip
    except Exception as exc:
        if is_redis_error(exc):
            raise  # the engine hands the step back; Redis may work in a moment
        # Not Redis: the stored version or record cannot be planned from (corrupt, past the
        # calendar's horizon, a bug). Retrying would fail the same way: fail this one.
        log.exception("step cannot be carried out; failing its enrollment")
        error = error_info(exc, trace_id=_trace_id())
        result = await persist(ctx, lambda: ctx["service"].fail(
            target, job_id=ctx["job_id"], node=node, step=int(step), attempt=int(attempt),
            error=error))  # fmt: skip
        return _label(result, "failed")
    if outcome == "conflict":
        await _fail_conflict(ctx, target, node, int(step), int(attempt), State.RUNNING)
    return outcome


async def _fail_conflict(
    ctx: dict[str, Any], target: JobTarget, node: str | None, step: int, attempt: int | None,
    state: State,
) -> None:  # fmt: skip
    """The next job's id is taken (a leftover job of this enrollment): fail the enrollment
    with a named error rather than leave it running until its lease lapses, again and again."""
    service: SchedulingService = ctx["service"]
    error = {"type": "JobConflict", "trace_id": _trace_id(),
             "message": "the id of the job this step would queue next is taken by a leftover "
                        "job; see campaign_job_conflicts_total and the dead letters"}  # fmt: skip
    await persist(ctx, lambda: service.fail(target, job_id=ctx["job_id"], node=node, step=step,
                                            attempt=attempt, error=error, expect_state=state))  # fmt: skip


async def _run_step(
    ctx: dict[str, Any],
    target: JobTarget,
    step: int,
    attempt: int,
    node_id: str | None,
    record: dict[str, str],
) -> str:
    service: SchedulingService = ctx["service"]
    job_id: str = ctx["job_id"]
    try:
        campaign = await service.campaign_for(target.campaign_id, target.version)
    except CampaignNotFound as exc:
        missing = error_info(exc)
        result = await persist(ctx, lambda: service.fail(
            target, job_id=job_id, node=node_id, step=step, attempt=attempt, error=missing))  # fmt: skip
        return _label(result, "failed")
    node = campaign.nodes.get(node_id) if node_id is not None else None
    if not isinstance(node, ActionNode):
        # A delay led here: enter the wait or exit now that its time has come.
        result = await persist(ctx, lambda: service.enter(
            target, job_id=job_id, node=node_id, step=step, attempt=attempt))  # fmt: skip
        return _label(result, "success")

    if ctx.get("rerun"):
        log.warning("step re-run: the worker running it stopped renewing its lease")
        if attempt > node.retry.max_attempts:
            error = {"type": "WorkerLost",
                     "message": f"worker stopped mid-step; {attempt - 1} attempts used",
                     "trace_id": _trace_id()}  # fmt: skip
            result = await persist(ctx, lambda: service.fail(
                target, job_id=job_id, node=node_id, step=step, attempt=attempt, error=error))  # fmt: skip
            return _label(result, "failed")

    now = datetime.now(UTC)
    cal = campaign.calendar_for(target.timezone)
    if cal is not None and campaign.uses_business_hours(node) and not cal.is_open(now):
        run_at = cal.next_open_spread(now, target.enrollment_id)
        result = await persist(ctx, lambda: service.defer(
            target, job_id=job_id, node=node_id or "", step=step, attempt=attempt, run_at=run_at))  # fmt: skip
        if result.ok:
            log.info("outside business hours: deferred", extra={"run_at": run_at.isoformat()})
        return _label(result, "rescheduled")
    return await _call_action(ctx, service, campaign, target, node_id or "", node, step, attempt,
                              record)  # fmt: skip


async def _call_action(
    ctx: dict[str, Any],
    service: SchedulingService,
    campaign: Campaign,
    target: JobTarget,
    node_id: str,
    node: ActionNode,
    step: int,
    attempt: int,
    record: dict[str, str],
) -> str:
    settings: Settings = ctx["settings"]
    registry: ActionRegistry = ctx["actions"]
    job_id: str = ctx["job_id"]
    handler = registry.get(node.action)
    if handler is None:
        error = {
            "type": "UnknownAction",
            "message": f"no action handler named {node.action!r} on this worker "
            f"(known: {', '.join(registry.names())}; see CAMPAIGN_ACTIONS)",
            "trace_id": _trace_id(),
        }
        result = await persist(ctx, lambda: service.fail(
            target, job_id=job_id, node=node_id, step=step, attempt=attempt, error=error))  # fmt: skip
        return _label(result, "failed")

    timeout = _call_timeout(node, settings)
    secret = settings.http_action_secret
    action_ctx = ActionContext(
        enrollment_id=target.enrollment_id,
        campaign_id=target.campaign_id,
        contact_id=record.get("contact", ""),
        node=node_id,
        step=step,
        attempt=attempt,
        params=node.params,
        attributes=orjson.loads(record["attributes"]) if record.get("attributes") else {},
        idempotency_key=f"{target.enrollment_id}:{step}",
        timeout=timeout,
        event=orjson.loads(record["event"]) if record.get("event") else None,
        http=ctx.get("http"),
        secret=secret.get_secret_value().encode() if secret is not None else None,
    )
    started = time.perf_counter()
    outcome_label = "success"
    try:
        with _action_span(node.action, action_ctx.idempotency_key) as span:
            try:
                try:
                    async with asyncio.timeout(timeout):
                        outcome = await handler(action_ctx)
                except TimeoutError:
                    raise TransientError(
                        f"action {node.action!r} timed out after {timeout:g}s"
                    ) from None
            except Exception as exc:
                mark_error(span, exc)
                raise
            if outcome is not None:
                span.set_attribute("campaign.action.outcome", str(outcome))
    except PermanentError as exc:
        outcome_label = "permanent"
        log.warning("action failed permanently", extra={"error": str(exc)})
        error = error_info(exc, trace_id=_trace_id())
        result = await persist(ctx, lambda: service.fail(
            target, job_id=job_id, node=node_id, step=step, attempt=attempt, error=error))  # fmt: skip
        return _label(result, "failed")
    except Exception as exc:
        # TransientError, and anything unexpected from a handler: retrying is the safe bet.
        outcome_label = "transient"
        retry_after = exc.retry_after if isinstance(exc, TransientError) else None
        error = error_info(exc, trace_id=_trace_id())
        if attempt >= node.retry.max_attempts:
            error["message"] = (
                f"{error['message']} (attempt {attempt} of {node.retry.max_attempts})"
            )
            log.warning("action failed, attempts exhausted", extra={"error": str(exc)})
            result = await persist(ctx, lambda: service.fail(
                target, job_id=job_id, node=node_id, step=step, attempt=attempt, error=error))  # fmt: skip
            return _label(result, "failed")
        delay = backoff_delay(node.retry, attempt, retry_after)
        log.info("action failed, will retry",
                 extra={"error": str(exc), "delay_seconds": round(delay.total_seconds(), 3)})  # fmt: skip
        result = await persist(ctx, lambda: service.retry(
            target, job_id=job_id, node=node_id, step=step, attempt=attempt, delay=delay,
            error=error))  # fmt: skip
        return _label(result, "retry")
    finally:
        calls, duration = _action_metrics(node.action)
        calls[outcome_label].inc()
        duration.observe(time.perf_counter() - started)

    to_node = (
        node.outcomes[outcome] if outcome is not None and outcome in node.outcomes else node.next
    )
    reason = f"{node.action} ok" + (f", outcome {outcome}" if outcome else "")
    result = await persist(ctx, lambda: service.advance(
        target, job_id=job_id, from_node=node_id, to_node=to_node, step=step, attempt=attempt,
        reason=reason))  # fmt: skip
    if not result.ok and not result.job_conflict:
        log.info(
            "enrollment changed while the action ran (cancelled?)", extra={"state": result.state}
        )
    return _label(result, "success")


async def fire_timeout(
    ctx: dict[str, Any],
    enrollment_id: str,
    step: int,
    *,
    campaign: str,
    version: int,
    node: str,
    tz: str | None = None,
    base: int = 0,
    otel: dict[str, str] | None = None,
) -> str:
    """A wait's deadline: follow ``on_timeout`` if the enrollment still waits at ``step``."""
    service: SchedulingService = ctx["service"]
    job_id: str = ctx["job_id"]
    target = JobTarget(enrollment_id, campaign, int(version), tz, int(base))
    _annotate(target, node, step, None)
    try:
        result = await persist(ctx, lambda: service.fire_timeout(
            target, job_id=job_id, node=node, step=int(step)))  # fmt: skip
        if result.job_conflict:
            await _fail_conflict(ctx, target, node, int(step), None, State.WAITING)
    except Exception as exc:
        if is_redis_error(exc):
            raise
        log.exception("timeout cannot be carried out; failing its enrollment")
        missing = error_info(exc)
        failed = await persist(ctx, lambda: service.fail(
            target, job_id=job_id, node=node, step=int(step), attempt=None,
            error=missing, expect_state=State.WAITING))  # fmt: skip
        return _label(failed, "failed")
    if not result.ok and not result.job_conflict:
        log.info("stale timeout job", extra={"state": result.state, "current_step": result.step})
    return _label(result, "success")
