"""Trace-context propagation into jobs (OpenTelemetry API only: no SDK needed here).

Enqueueing makes a PRODUCER span and puts its W3C context into the job's kwargs
(``otel``); the worker continues it. With no SDK configured the API is a no-op, so this
costs next to nothing when tracing is off.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.trace import INVALID_SPAN, ProxyTracerProvider, Span, SpanKind

__all__ = ["MESSAGING_SYSTEM", "current_carrier", "enabled", "producer_span", "refresh", "tracer"]

MESSAGING_SYSTEM = "arq"  # no registered value exists for arq; custom values are allowed

tracer = trace.get_tracer("campaign-scheduler")


class _Cache:
    at = -1.0
    on = False


def enabled() -> bool:
    """Whether a tracer provider is installed; without one every span is a no-op, and the
    hot paths skip making them at all (they cost microseconds each, per step). A provider,
    once set, stays; until one is, the answer is looked up again at most once a second
    (or at once after :func:`refresh`)."""
    if _Cache.on:
        return True
    now = time.monotonic()
    if now - _Cache.at >= 1.0:
        provider = trace.get_tracer_provider()
        _Cache.on = not isinstance(provider, ProxyTracerProvider | trace.NoOpTracerProvider)
        _Cache.at = now
    return _Cache.on


def refresh() -> None:
    """Look the tracer provider up again on the next span (call after setting one)."""
    _Cache.at = -1.0


def current_carrier() -> dict[str, str]:
    """The W3C ``traceparent``/``tracestate`` of the current span, for a job's kwargs."""
    if not enabled():
        return {}
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def producer_span(
    operation: str, queue: str, attributes: dict[str, Any] | None = None
) -> AbstractContextManager[Span]:
    """A PRODUCER span ``create <queue>`` around planning and enqueueing a job, so the job
    carries this span's context (messaging semantic conventions); a no-op context when
    tracing is off."""
    if not enabled():
        return nullcontext(INVALID_SPAN)
    return _producer_span(operation, queue, attributes)


@contextmanager
def _producer_span(operation: str, queue: str, attributes: dict[str, Any] | None) -> Iterator[Span]:
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
