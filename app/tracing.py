"""Trace-context propagation into jobs (OpenTelemetry API only: no SDK needed here).

Enqueueing makes a PRODUCER span and puts its W3C context into the job's kwargs
(``otel``); the worker continues it. With no SDK configured the API is a no-op, so this
costs next to nothing when tracing is off.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind

__all__ = ["MESSAGING_SYSTEM", "current_carrier", "producer_span", "tracer"]

MESSAGING_SYSTEM = "arq"  # no registered value exists for arq; custom values are allowed

tracer = trace.get_tracer("campaign-scheduler")


def current_carrier() -> dict[str, str]:
    """The W3C ``traceparent``/``tracestate`` of the current span, for a job's kwargs."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


@contextmanager
def producer_span(
    operation: str, queue: str, attributes: dict[str, Any] | None = None
) -> Iterator[Span]:
    """A PRODUCER span ``create <queue>`` around planning and enqueueing a job, so the job
    carries this span's context (messaging semantic conventions)."""
    attrs: dict[str, Any] = {
        "messaging.system": MESSAGING_SYSTEM,
        "messaging.operation.type": "create",
        "messaging.operation.name": operation,
        "messaging.destination.name": queue,
    }
    if attributes:
        attrs.update({k: v for k, v in attributes.items() if v is not None})
    with tracer.start_as_current_span(
        f"create {queue}", kind=SpanKind.PRODUCER, attributes=attrs
    ) as span:
        yield span
