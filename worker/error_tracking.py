"""Error tracking with Sentry when ``SENTRY_DSN`` is set (the ``sentry`` extra).

What is reported:

- every enrollment that fails (a permanent error, attempts exhausted, an unknown action, a
  corrupt record, a job id conflict): one event from the failed transition (see
  :func:`report_failure`), tagged ``enrollment_id``, ``campaign_id``, ``node``, ``step``,
  ``attempt``, ``error_type`` and, inside a span, ``trace_id``, and grouped by campaign,
  node and error type (what ``campaign-worker failures`` groups by);
- exceptions of arq's own jobs (ping, the reconciler, maintenance), through sentry-sdk's
  arq integration;
- lines the worker logs at ERROR (Redis unavailable, a malformed job), through sentry-sdk's
  logging integration; lower levels become breadcrumbs, kept per job.

Campaign steps do not run through arq's ``Worker.run_job`` (the step engine runs them), so
the arq integration alone never sees them: the failed transition is where a step's failure
is decided, whatever path led there. Without ``SENTRY_DSN`` sentry-sdk is never imported.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Mapping
from typing import Any

from opentelemetry import trace

from app import __version__
from app.settings import ConfigError, Settings
from worker.logs import job_context

__all__ = [
    "check_error_tracking",
    "enabled",
    "init_error_tracking",
    "job_scope",
    "report_failure",
    "shutdown_error_tracking",
]

log = logging.getLogger("worker.error_tracking")

INSTALL_HINT = "pip install 'campaign-scheduler[sentry]'"

#: Its ERROR lines all announce an enrollment that fails next; the failed transition is
#: reported (with its tags), so the log event would only be a second copy of it.
_REPORTED_BY_TRANSITION = frozenset({"worker.processors"})
#: Job context fields copied to the tags of any event raised inside a job.
_CONTEXT_TAGS = ("enrollment_id", "campaign_id", "node", "step", "attempt", "job_id", "function")

_on = False


def enabled() -> bool:
    """Whether events are being sent (``SENTRY_DSN`` was set and the SDK initialised)."""
    return _on


def check_error_tracking(settings: Settings) -> None:
    """Raise :class:`ConfigError` (one line, never the DSN) when ``SENTRY_DSN`` is set but
    sentry-sdk is not installed or the DSN cannot be parsed. Imports nothing without a DSN."""
    if settings.sentry_dsn is None:
        return
    try:
        from sentry_sdk.utils import BadDsn, Dsn
    except ImportError:
        raise ConfigError(
            f"SENTRY_DSN: is set but sentry-sdk is not installed; {INSTALL_HINT}"
        ) from None
    try:
        Dsn(settings.sentry_dsn.get_secret_value())
    except BadDsn as exc:  # its messages name the part that is wrong, not the key
        raise ConfigError(f"SENTRY_DSN: not a valid Sentry DSN: {exc}") from None


def init_error_tracking(settings: Settings) -> bool:
    """Initialise sentry-sdk when ``SENTRY_DSN`` is set; returns whether it did.

    Call it before arq's ``create_worker`` runs (arq's CLI calls it after importing the
    settings class): the arq integration wraps the job functions there.
    """
    global _on
    check_error_tracking(settings)
    if settings.sentry_dsn is None or _on:
        return _on
    import sentry_sdk
    from sentry_sdk.integrations.arq import ArqIntegration

    sentry_sdk.init(
        dsn=settings.sentry_dsn.get_secret_value(),
        # sentry-sdk's own SENTRY_RELEASE wins; SENTRY_ENVIRONMENT is read by the SDK.
        release=os.environ.get("SENTRY_RELEASE") or f"campaign-scheduler@{__version__}",
        integrations=[ArqIntegration()],
        # Not the aiohttp, redis, ... integrations sentry-sdk would switch on by itself:
        # they would wrap every Redis command and health probe on the hot path.
        auto_enabling_integrations=False,
        # No personal data: frame locals would hold contact attributes, which the worker
        # never logs either.
        send_default_pii=False,
        include_local_variables=False,
        before_send=_before_send,
    )
    _on = True
    log.info("error tracking on", extra={"error_tracking": "sentry"})  # never the DSN
    return True


def shutdown_error_tracking(timeout: float = 2.0) -> None:
    """Send what is queued (at most ``timeout`` seconds) and stop."""
    global _on
    if _on:
        import sentry_sdk

        sentry_sdk.flush(timeout=timeout)
        _on = False


def job_scope() -> contextlib.AbstractContextManager[Any]:
    """Around one job: its own Sentry scope, so an event carries that job's breadcrumbs,
    not those of the 50 jobs running beside it. A no-op without Sentry."""
    if not _on:
        return contextlib.nullcontext()
    return _isolation_scope()


@contextlib.contextmanager
def _isolation_scope() -> Iterator[Any]:
    import sentry_sdk

    with sentry_sdk.isolation_scope() as scope:
        yield scope


def _trace_id() -> str | None:
    ctx = trace.get_current_span().get_span_context()
    return f"{ctx.trace_id:032x}" if ctx.is_valid else None


def report_failure(enrollment_id: str, entry: Mapping[str, Any]) -> None:
    """Send one event for an enrollment that just failed (a history entry ``to: failed``).

    Called from the transition hook, inside the job that failed it: the exception being
    handled, when its type is the recorded error's, gives the event its stack trace.
    """
    if not _on:
        return
    import sentry_sdk
    from sentry_sdk.utils import event_from_exception

    reason = str(entry.get("reason") or "")
    error_type, _, message = reason.partition(": ")
    fields = job_context.get() or {}
    campaign_id = str(
        entry.get("campaign_id") or fields.get("campaign_id") or enrollment_id.partition(":")[0]
    )
    node = entry.get("node") or fields.get("node") or ""
    tags = {
        "enrollment_id": enrollment_id,
        "campaign_id": campaign_id,
        "node": node,
        "step": entry.get("step"),
        "attempt": entry.get("attempt"),
        "error_type": error_type,
        "trace_id": _trace_id(),
        "job_id": entry.get("job_id") or fields.get("job_id"),
    }
    exc = sys.exc_info()[1]
    event: Any  # sentry-sdk's Event TypedDict lives in a private module
    if exc is not None and type(exc).__name__ == error_type:
        event, _hint = event_from_exception(
            exc,
            client_options=sentry_sdk.get_client().options,
            mechanism={"type": "campaign", "handled": True},
        )
    else:
        event = {"exception": {"values": [{
            "type": error_type or "EnrollmentFailed", "value": message or reason,
            "mechanism": {"type": "campaign", "handled": True},
        }]}}  # fmt: skip
    event.update(
        level="error",
        message=f"enrollment failed: {reason}"[:1000],
        tags={k: str(v) for k, v in tags.items() if v is not None},
        fingerprint=["campaign-enrollment-failed", campaign_id, str(node), error_type],
        contexts={"campaign": {"enrollment_id": enrollment_id, "reason": reason[:1000]}},
    )
    # Without a hint: sentry-sdk's dedupe drops an exception already seen, and the step's
    # own ERROR line (dropped in _before_send) may have been seen first.
    sentry_sdk.capture_event(event)


def _before_send(event: Any, hint: Any) -> Any:
    """Drop log events that duplicate a failed transition; tag every event raised inside a
    job with its context and trace id, so errors, logs and traces join up."""
    record = hint.get("log_record") if hint else None
    if isinstance(record, logging.LogRecord) and record.name in _REPORTED_BY_TRANSITION:
        return None
    tags = event.setdefault("tags", {})
    fields = job_context.get() or {}
    for key in _CONTEXT_TAGS:
        value = fields.get(key)
        if value is not None and key not in tags:
            tags[key] = str(value)
    trace_id = _trace_id()
    if trace_id is not None and "trace_id" not in tags:
        tags["trace_id"] = trace_id
    return event
