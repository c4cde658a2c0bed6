"""Structured logging: JSON lines for machines, a readable format on a terminal.

Job context (job id, function, enrollment, ...) lives in a context variable set when a job
starts, so every line a job logs carries it without threading it through calls. A line
written inside a valid OpenTelemetry span also carries its ``trace_id`` and ``span_id``
(W3C hex), so logs, traces and error reports join up.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import time
from collections.abc import Mapping
from typing import Any

import orjson
from opentelemetry import trace

__all__ = ["bind", "configure_logging", "job_context"]

job_context: contextvars.ContextVar[Mapping[str, Any] | None] = contextvars.ContextVar(
    "job_context", default=None
)

_RESERVED = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class bind:  # lower case: it reads like a function, ``with bind(job_id=...)``
    """Add fields to every log line written inside the block (and tasks it starts).

    A class rather than a generator context manager: it runs several times per job."""

    __slots__ = ("_fields", "_token")

    def __init__(self, **fields: Any) -> None:
        self._fields = fields

    def __enter__(self) -> None:
        self._token = job_context.set({**(job_context.get() or {}), **self._fields})

    def __exit__(self, *exc: object) -> None:
        job_context.reset(self._token)


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    out: dict[str, Any] = dict(job_context.get() or {})
    for key, value in record.__dict__.items():
        if key not in _RESERVED and not key.startswith("_"):
            out[key] = value
    return out


def _span_ids() -> tuple[str, str] | None:
    """(trace_id, span_id) of the current span as W3C hex, or None outside a valid span."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, job context, extras, and the
    current span's ``trace_id``/``span_id``."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": round(record.created, 6),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        doc.update(_fields(record))
        ids = _span_ids()
        if ids is not None:  # after the extras: the current span is what a reader joins on
            doc["trace_id"], doc["span_id"] = ids
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(doc, default=str).decode()


class TextFormatter(logging.Formatter):
    """``12:00:01.123 INFO  worker.x  message  key=value ...`` for people at a terminal.

    Inside a span the line ends with ``trace_id=...`` (what Jaeger's search takes); the span
    id is left to the JSON format."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        fields = _fields(record)
        ids = _span_ids()
        if ids is not None:
            fields["trace_id"] = ids[0]
        extras = " ".join(f"{k}={v}" for k, v in fields.items())
        line = (
            f"{stamp}.{int(record.msecs):03d} {record.levelname:<7} {record.name}  "
            f"{record.getMessage()}"
        )
        if extras:
            line += f"  {extras}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure_logging(level: str = "INFO", fmt: str = "auto") -> None:
    """Send all logs to stdout in the chosen format (``auto``: text on a TTY, else JSON)."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stdout.isatty())
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter() if use_json else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # arq logs every job start and end at INFO; ours carry the same with context.
    logging.getLogger("arq").setLevel(max(logging.getLevelName(level), logging.WARNING))
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
