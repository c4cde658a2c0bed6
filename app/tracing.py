"""Trace-context propagation into jobs (OpenTelemetry API only: no SDK needed here).

With no SDK configured the global propagator injects nothing, so this costs next to nothing.
"""

from __future__ import annotations

from opentelemetry import propagate

__all__ = ["current_carrier"]


def current_carrier() -> dict[str, str]:
    """The W3C ``traceparent``/``tracestate`` of the current span, for a job's kwargs."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier
