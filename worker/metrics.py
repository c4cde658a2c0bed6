"""Prometheus metrics of one worker process.

Names follow Prometheus conventions: one ``campaign_`` prefix, base units, ``_total``
counters, and labels with a small fixed set of values (never enrollment or contact ids).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["REGISTRY", "Metrics", "metrics"]

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
            "(success, retry, failed, stale, rescheduled, error)",
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
            "Jobs dropped from the queue without running, by reason",
            ["reason"],
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
            "Jobs in the arq queue by state (due: runnable now, deferred: later); queue-wide",
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
        #: When set (by the demo), every job's lateness in seconds is appended here too.
        self.lateness_samples: list[float] | None = None
        self.start_time = Gauge(
            "campaign_worker_start_timestamp_seconds",
            "Unix time the worker started",
            registry=registry,
        )


metrics = Metrics(REGISTRY)
