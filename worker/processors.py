"""The campaign jobs: execute a step (``run_step``) and fire a wait's timeout (``fire_timeout``).

Both are safe to run twice, late, or after a cancel: every write is a transition that
checks the enrollment's state and step, so a job that no longer matches is *stale* and
does nothing but count itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime
from typing import Any

import orjson
from arq import Retry
from opentelemetry import trace

from app.campaigns import ActionNode, Campaign
from app.errors import CampaignNotFound
from app.models import State
from app.scheduling import JobTarget, SchedulingService, error_info
from app.settings import Settings
from app.tracing import tracer
from worker.actions import ActionContext, ActionRegistry, PermanentError, TransientError
from worker.logs import bind
from worker.metrics import metrics
from worker.retries import backoff_delay
from worker.telemetry import mark_error

__all__ = ["fire_timeout", "run_step"]

log = logging.getLogger("worker.processors")

#: arq re-runs a job whose bookkeeping failed unexpectedly (e.g. Redis went away mid-step)
#: after this many seconds; the step's transitions make the re-run safe.
_BOOKKEEPING_RETRY_SECONDS = 5


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


def _budget(ctx: dict[str, Any]) -> float:
    """Time a job may take before we give up on it ourselves. arq's own job timeout would
    *fail* the job and drop it, leaving the enrollment active with no job; ending first
    with ``Retry`` makes arq run it again instead."""
    settings: Settings = ctx["settings"]
    return max(0.1, settings.job_timeout * 0.95)


def _call_timeout(node: ActionNode, settings: Settings) -> float:
    """A handler must finish well inside the arq job timeout: if arq cut the job off, the
    enrollment would stay 'running' until the job was re-run."""
    wanted = node.timeout.total_seconds() if node.timeout else settings.http_action_timeout
    return max(0.05, min(wanted, settings.job_timeout * 0.8))


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
    """Execute one step job; returns the outcome label for metrics."""
    target = JobTarget(enrollment_id, campaign, int(version), tz, int(base))
    _annotate(target, node, step, attempt)
    with bind(
        enrollment_id=enrollment_id, campaign_id=campaign, node=node, step=step, attempt=attempt
    ):
        try:
            async with asyncio.timeout(_budget(ctx)):
                return await _run_step(ctx, target, int(step), int(attempt), node)
        except (Retry, asyncio.CancelledError):
            raise
        except TimeoutError:
            log.error("step took too long (Redis stalled?); arq will re-run the job")
            raise Retry(defer=_BOOKKEEPING_RETRY_SECONDS) from None
        except Exception:
            log.exception("step bookkeeping failed; arq will re-run the job")
            raise Retry(defer=_BOOKKEEPING_RETRY_SECONDS) from None


async def _run_step(
    ctx: dict[str, Any], target: JobTarget, step: int, attempt: int, node_id: str | None
) -> str:
    service: SchedulingService = ctx["service"]
    settings: Settings = ctx["settings"]
    try:
        campaign = await service.campaign_for(target.campaign_id, target.version)
    except CampaignNotFound as exc:
        result = await service.fail(target, node=node_id, step=step, attempt=attempt,
                                    error=error_info(exc), expect_state=State.SCHEDULED)  # fmt: skip
        return "failed" if result.ok else "stale"
    node = campaign.nodes.get(node_id) if node_id is not None else None
    if not isinstance(node, ActionNode):
        # A delay led here: enter the wait or exit now that its time has come.
        result = await service.enter(target, node=node_id, step=step, attempt=attempt)
        return "success" if result.ok else "stale"

    now = datetime.now(UTC)
    cal = campaign.calendar_for(target.timezone)
    if cal is not None and campaign.uses_business_hours(node) and not cal.is_open(now):
        return await _defer(ctx, service, target, node_id or "", node, step,
                            cal.next_open_spread(now, target.enrollment_id))  # fmt: skip

    code, record = await service.store.claim(target.enrollment_id, step, attempt, node_id,
                                             job_id=ctx.get("job_id"))  # fmt: skip
    if code <= 0:
        log.info("stale step job", extra={"current": record})
        return "stale"
    attempt = int(record["attempt"])
    trace.get_current_span().set_attribute("campaign.attempt", attempt)
    if service.on_transition is not None:
        service.on_transition(target.enrollment_id, {
            "from": "running" if code == 2 else "scheduled", "to": "running", "node": node_id,
            "step": step, "attempt": attempt,
            "reason": "job re-run after a worker stopped mid-step" if code == 2 else "job started",
        })  # fmt: skip
    with bind(attempt=attempt):
        if code == 2:
            log.warning("step re-run after a worker stopped mid-step")
            if attempt > node.retry.max_attempts:
                error = {
                    "type": "WorkerLost",
                    "message": f"worker stopped mid-step; {attempt - 1} attempts used",
                    "trace_id": _trace_id(),
                }
                result = await service.fail(
                    target, node=node_id, step=step, attempt=attempt, error=error
                )
                return "failed" if result.ok else "stale"
        try:
            return await _call_action(ctx, service, settings, campaign, target, node_id or "",
                                      node, step, attempt, record)  # fmt: skip
        except asyncio.CancelledError:
            stopping = ctx.get("stopping")
            if stopping is not None and stopping.is_set():
                # Cut off by the shutdown grace: arq re-queues the job; hand the step back
                # so the next worker runs it as the same attempt, not as a crash re-run.
                await asyncio.shield(service.release(target, node=node_id, step=step,
                                                     attempt=attempt, job_id=ctx.get("job_id")))  # fmt: skip
            raise


async def _defer(
    ctx: dict[str, Any],
    service: SchedulingService,
    target: JobTarget,
    node_id: str,
    node: ActionNode,
    step: int,
    run_at: datetime,
) -> str:
    """The window is closed: move the step to ``run_at``, keeping its attempt count (a
    crash re-run found here still counts as an attempt)."""
    job_id = ctx.get("job_id")
    rec = await service.store.record(target.enrollment_id)
    if (
        rec is None
        or rec.get("job") != job_id
        or rec.get("state") not in (State.SCHEDULED, State.RUNNING)
        or int(rec.get("step", -1)) != step
    ):
        return "stale"
    current = int(rec.get("attempt") or 1)
    attempt = current + 1 if rec["state"] == State.RUNNING else current
    if attempt > node.retry.max_attempts:
        error = {"type": "WorkerLost", "message": f"worker stopped mid-step; {current} attempts used",
                 "trace_id": _trace_id()}  # fmt: skip
        result = await service.fail(target, node=node_id, step=step, attempt=current, error=error)
        return "failed" if result.ok else "stale"
    result = await service.defer(target, node=node_id, step=step, attempt=attempt, run_at=run_at,
                                 job_id=job_id, expect_attempt=current)  # fmt: skip
    if result.ok:
        log.info("outside business hours: deferred", extra={"run_at": run_at.isoformat()})
        return "rescheduled"
    return "stale"


async def _call_action(
    ctx: dict[str, Any],
    service: SchedulingService,
    settings: Settings,
    campaign: Campaign,
    target: JobTarget,
    node_id: str,
    node: ActionNode,
    step: int,
    attempt: int,
    record: dict[str, str],
) -> str:
    registry: ActionRegistry = ctx["actions"]
    handler = registry.get(node.action)
    if handler is None:
        error = {
            "type": "UnknownAction",
            "message": f"no action handler named {node.action!r} on this worker "
            f"(known: {', '.join(registry.names())}; see CAMPAIGN_ACTIONS)",
            "trace_id": _trace_id(),
        }
        result = await service.fail(target, node=node_id, step=step, attempt=attempt, error=error)
        return "failed" if result.ok else "stale"

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
        secret=secret.get_secret_value().encode() if secret else None,
    )
    started = time.perf_counter()
    outcome_label = "success"
    try:
        with tracer.start_as_current_span(
            f"action {node.action}",
            attributes={"campaign.action": node.action, "campaign.idempotency_key": action_ctx.idempotency_key},
            record_exception=False, set_status_on_exception=False,
        ) as span:  # fmt: skip
            try:
                try:
                    outcome = await asyncio.wait_for(handler(action_ctx), timeout)
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
        result = await service.fail(target, node=node_id, step=step, attempt=attempt,
                                    error=error_info(exc, trace_id=_trace_id()))  # fmt: skip
        return "failed" if result.ok else "stale"
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
            result = await service.fail(
                target, node=node_id, step=step, attempt=attempt, error=error
            )
            return "failed" if result.ok else "stale"
        delay = backoff_delay(node.retry, attempt, retry_after)
        log.info("action failed, will retry",
                 extra={"error": str(exc), "delay_seconds": round(delay.total_seconds(), 3)})  # fmt: skip
        result = await service.retry(target, node=node_id, step=step, attempt=attempt,
                                     delay=delay, error=error)  # fmt: skip
        return "retry" if result.ok else "stale"
    finally:
        metrics.action_calls.labels(action=node.action, outcome=outcome_label).inc()
        metrics.action_duration.labels(action=node.action).observe(time.perf_counter() - started)

    to_node = (
        node.outcomes[outcome] if outcome is not None and outcome in node.outcomes else node.next
    )
    reason = f"{node.action} ok" + (f", outcome {outcome}" if outcome else "")
    result = await service.advance(target, from_node=node_id, to_node=to_node, step=step,
                                   attempt=attempt, reason=reason)  # fmt: skip
    if not result.ok:
        log.info(
            "enrollment changed while the action ran (cancelled?)", extra={"state": result.state}
        )
        return "stale"
    return "success"


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
    target = JobTarget(enrollment_id, campaign, int(version), tz, int(base))
    _annotate(target, node, step, None)
    with bind(enrollment_id=enrollment_id, campaign_id=campaign, node=node, step=step):
        try:
            async with asyncio.timeout(_budget(ctx)):
                result = await service.fire_timeout(target, node=node, step=int(step))
        except (Retry, asyncio.CancelledError):
            raise
        except TimeoutError:
            log.error("timeout job took too long (Redis stalled?); arq will re-run it")
            raise Retry(defer=_BOOKKEEPING_RETRY_SECONDS) from None
        except CampaignNotFound as exc:
            log.error("timeout for a campaign version that no longer exists")
            failed = await service.fail(target, node=node, step=int(step), attempt=None,
                                        error=error_info(exc), expect_state=State.WAITING)  # fmt: skip
            return "failed" if failed.ok else "stale"
        except Exception:
            log.exception("timeout bookkeeping failed; arq will re-run the job")
            raise Retry(defer=_BOOKKEEPING_RETRY_SECONDS) from None
        if not result.ok:
            log.info(
                "stale timeout job", extra={"state": result.state, "current_step": result.step}
            )
            return "stale"
        return "success"
