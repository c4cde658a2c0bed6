"""Prometheus metrics of one worker process.

Names follow Prometheus conventions: one ``campaign_`` prefix, base units, ``_total``
counters, and labels with a small fixed set of values (never enrollment or contact ids).
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)

__all__ = ["REGISTRY", "Metrics", "metrics"]

# `_created` series double the scrape for no use in dashboards or alerts.
disable_created_metrics()  # type: ignore[no-untyped-call]

REGISTRY = CollectorRegistry(auto_describe=True)

# Steps call external services: lateness and durations need buckets from milliseconds to
# minutes, wider than the client-library defaults.
_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_LATENESS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)


class Metrics:
    """The metric families, registered on one registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.jobs = Counter(
            "campaign_jobs_total",
            "Jobs finished, by function and outcome "
            "(success, retry, failed, stale, rescheduled, conflict, error, cancelled)",
            ["function", "outcome"],
            registry=registry,
        )
        self.job_duration = Histogram(
            "campaign_job_duration_seconds",
            "Wall time of one job run",
            ["function"],
            buckets=_DURATION_BUCKETS,
            registry=registry,
        )
        self.job_lateness = Histogram(
            "campaign_job_lateness_seconds",
            "Job start minus its scheduled time",
            ["function"],
            buckets=_LATENESS_BUCKETS,
            registry=registry,
        )
        self.jobs_running = Gauge(
            "campaign_jobs_running", "Jobs running in this worker now", registry=registry
        )
        self.poison_jobs = Counter(
            "campaign_poison_jobs_total",
            "Campaign jobs dropped without running, by reason (malformed: a queue entry or "
            "payload of the wrong shape, dead-lettered; corrupt_record: its enrollment's "
            "record was unreadable, so the enrollment was failed with CorruptRecord)",
            ["reason"],
            registry=registry,
        )
        self.job_conflicts = Counter(
            "campaign_job_conflicts_total",
            "Transitions refused because the id of the job they would queue was taken",
            registry=registry,
        )
        self.reconciled = Counter(
            "campaign_reconciled_total",
            "Active enrollments the reconciler found without a job, by the state they were "
            "found in and what it did (recreated: the job; failed: a corrupt record)",
            ["state", "action"],
            registry=registry,
        )
        self.purged = Counter(
            "campaign_purged_total",
            "Finished enrollments deleted by the retention job (CAMPAIGN_RETENTION), by state",
            ["state"],
            registry=registry,
        )
        self.action_calls = Counter(
            "campaign_action_calls_total",
            "Action handler calls by action and outcome (success, transient, permanent)",
            ["action", "outcome"],
            registry=registry,
        )
        self.action_duration = Histogram(
            "campaign_action_duration_seconds",
            "Action handler call duration",
            ["action"],
            buckets=_DURATION_BUCKETS,
            registry=registry,
        )
        self.transitions = Counter(
            "campaign_transitions_total",
            "Enrollment state transitions made by this worker",
            ["to_state"],
            registry=registry,
        )
        self.heartbeat = Gauge(
            "campaign_worker_heartbeat_timestamp_seconds",
            "Unix time of the worker loop's last successful poll",
            registry=registry,
        )
        self.redis_up = Gauge(
            "campaign_redis_up", "1 when the last Redis call succeeded, else 0", registry=registry
        )
        # Queue-wide gauges, read from Redis at scrape time. Every worker exports the same
        # values: aggregate them with max (never sum) across instances.
        self.queue_jobs = Gauge(
            "campaign_queue_jobs",
            "Jobs by state: due (runnable now, not yet started), deferred (due later), "
            "in_progress (steps being executed); queue-wide",
            ["state"],
            registry=registry,
        )
        self.enrollments = Gauge(
            "campaign_enrollments",
            "Enrollments by campaign and state, from the state index sets; queue-wide",
            ["campaign", "state"],
            registry=registry,
        )
        self.dead_letters = Gauge(
            "campaign_dead_letter_jobs",
            "Poison jobs kept in the dead-letter list; queue-wide",
            registry=registry,
        )
        self.workers_alive = Gauge(
            "campaign_workers_alive",
            "Workers whose Redis heartbeat is under 30 s old; queue-wide",
            registry=registry,
        )
        self.oldest_due_age = Gauge(
            "campaign_queue_oldest_due_age_seconds",
            "How long the oldest due job has been waiting to start (0 when none); queue-wide",
            registry=registry,
        )
        self.redis_memory = Gauge(
            "campaign_redis_memory_bytes",
            "Redis memory from INFO: used and maxmemory (0 = no limit); queue-wide",
            ["kind"],
            registry=registry,
        )
        self.info = Gauge(
            "campaign_worker_info", "Always 1; labels carry the version", ["version"],
            registry=registry,
        )  # fmt: skip
        #: When set (by the demo), every job's lateness in seconds is appended here too.
        self.lateness_samples: list[float] | None = None
        self.start_time = Gauge(
            "campaign_worker_start_timestamp_seconds",
            "Unix time the worker started",
            registry=registry,
        )


POISON_REASONS = ("malformed", "corrupt_record")
JOB_OUTCOMES = (
    "success", "retry", "failed", "stale", "rescheduled", "conflict", "error", "cancelled",
)  # fmt: skip
RECONCILED_STATES = ("scheduled", "running", "waiting")
ACTION_OUTCOMES = ("success", "transient", "permanent")


def prime(m: Metrics, functions: list[str], actions: list[str], states: list[str]) -> None:
    """Create every known label combination at 0, so that ``rate()`` and ``increase()``
    see the first event after a worker starts (a counter that appears at 1 has no increase)."""
    for fn in functions:
        for outcome in JOB_OUTCOMES:
            m.jobs.labels(function=fn, outcome=outcome)
        m.job_duration.labels(function=fn)
        m.job_lateness.labels(function=fn)
    for reason in POISON_REASONS:
        m.poison_jobs.labels(reason=reason)
    for action in actions:
        for outcome in ACTION_OUTCOMES:
            m.action_calls.labels(action=action, outcome=outcome)
        m.action_duration.labels(action=action)
    for state in states:
        m.transitions.labels(to_state=state)
    for state in RECONCILED_STATES:
        for action in ("recreated", "failed"):
            m.reconciled.labels(state=state, action=action)
    for state in ("completed", "failed", "cancelled"):
        m.purged.labels(state=state)


metrics = Metrics(REGISTRY)
