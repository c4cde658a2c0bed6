"""Wraps every job function: log context, start/finish lines, duration, lateness, outcome."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from arq import Retry
from arq.worker import Function, func

from worker.error_tracking import job_scope
from worker.logs import bind
from worker.metrics import metrics
from worker.telemetry import consumer_span, mark_error

__all__ = ["OUTCOMES", "instrument", "instrument_all"]

log = logging.getLogger("worker.jobs")

#: Jobs whose span links to its producer instead of continuing its trace (see consumer_span).
LINK_ONLY = frozenset({"fire_timeout"})

#: Outcomes a job function may return to label its metrics; anything else counts as success.
OUTCOMES = frozenset({"success", "retry", "failed", "stale", "rescheduled", "conflict"})


_POSITIONAL = ("enrollment_id", "step", "attempt")


def _job_fields(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Campaign job context for every log line of the job, start and finish included."""
    if "campaign" not in kwargs:
        return {}
    fields = dict(zip(_POSITIONAL, args, strict=False))
    fields["campaign_id"] = kwargs.get("campaign")
    fields["node"] = kwargs.get("node")
    return fields


def instrument(function: Function) -> Function:
    """A copy of ``function`` whose runs are logged, timed and counted."""
    inner = function.coroutine
    name = function.name
    # Labelled children resolved once: labels() costs more than the observation itself.
    lateness_metric = metrics.job_lateness.labels(function=name)
    duration_metric = metrics.job_duration.labels(function=name)
    outcome_metrics: dict[str, Any] = {}

    @functools.wraps(inner)
    async def wrapper(ctx: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        start = time.time()
        lateness = max(0.0, start - ctx.get("score", start * 1000) / 1000)
        lateness_metric.observe(lateness)
        if metrics.lateness_samples is not None and name != "ping":
            metrics.lateness_samples.append(lateness)
        outcome = "error"
        queue = str(ctx.get("destination") or "arq:queue")
        carrier = kwargs.get("otel")
        fields = _job_fields(args, kwargs)
        with job_scope(), bind(job_id=ctx.get("job_id"), function=name,
                               job_try=ctx.get("job_try"), **fields), consumer_span(
            name, queue, ctx.get("job_id"), ctx.get("job_try"), lateness,
            carrier if isinstance(carrier, dict) else None, link_only=name in LINK_ONLY,
        ) as span:  # fmt: skip
            log.info("job started", extra={"lateness_seconds": round(lateness, 4)})
            try:
                result = await inner(ctx, *args, **kwargs)
                outcome = result if isinstance(result, str) and result in OUTCOMES else "success"
                span.set_attribute("campaign.job.outcome", outcome)
                if outcome == "stale":
                    span.set_attribute("campaign.job.stale", True)
                elif outcome == "failed":
                    mark_error(span, description="enrollment failed")
                return result
            except Retry:
                outcome = "retry"
                raise
            except asyncio.CancelledError:
                outcome = "cancelled"
                raise
            finally:
                duration = time.time() - start
                counter = outcome_metrics.get(outcome)
                if counter is None:
                    counter = outcome_metrics[outcome] = metrics.jobs.labels(
                        function=name, outcome=outcome
                    )
                counter.inc()
                duration_metric.observe(duration)
                level = logging.WARNING if outcome in ("error", "cancelled") else logging.INFO
                log.log(
                    level,
                    "job finished",
                    extra={"outcome": outcome, "duration_seconds": round(duration, 4),
                           "lateness_seconds": round(lateness, 4)},
                )  # fmt: skip

    return Function(
        name=name,
        coroutine=wrapper,
        timeout_s=function.timeout_s,
        keep_result_s=function.keep_result_s,
        keep_result_forever=function.keep_result_forever,
        max_tries=function.max_tries,
    )


def instrument_all(functions: Sequence[Function | Callable[..., Any]]) -> list[Function]:
    """:func:`instrument` each function (plain coroutines are wrapped with ``arq.func`` first)."""
    return [instrument(f if isinstance(f, Function) else func(f)) for f in functions]
