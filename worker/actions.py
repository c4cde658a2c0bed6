"""Action handlers: what an ``action`` node calls.

A handler is an async function taking an :class:`ActionContext` and returning an outcome
name (or None). It signals failures by raising :class:`TransientError` (retried per the
node's policy) or :class:`PermanentError` (fails the enrollment at once). Built in:
``http`` and ``log``; register more with :func:`action` in a module named by
``CAMPAIGN_ACTIONS``.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import hmac
import importlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import orjson
from opentelemetry import propagate
from opentelemetry.trace import SpanKind, Status, StatusCode

from app.settings import ConfigError
from app.tracing import tracer

__all__ = [
    "ActionContext",
    "ActionRegistry",
    "Handler",
    "PermanentError",
    "TransientError",
    "action",
    "default_registry",
    "http_action",
    "log_action",
]

log = logging.getLogger("worker.actions")

SIGNATURE_HEADER = "X-Campaign-Signature"


class TransientError(Exception):
    """A failure worth retrying; ``retry_after`` (seconds) is a floor for the next delay."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentError(Exception):
    """A failure that retrying cannot fix: the enrollment fails at once."""


@dataclass(frozen=True)
class ActionContext:
    """Everything a handler gets for one call."""

    enrollment_id: str
    campaign_id: str
    contact_id: str
    node: str
    step: int
    attempt: int
    params: Mapping[str, Any]
    attributes: Mapping[str, Any]
    idempotency_key: str
    timeout: float
    event: Mapping[str, Any] | None = None
    http: aiohttp.ClientSession | None = None
    secret: bytes | None = None
    extra: dict[str, Any] = field(default_factory=dict)


Handler = Callable[[ActionContext], Awaitable[str | None]]


class ActionRegistry:
    """Handlers by name."""

    def __init__(self, handlers: Mapping[str, Handler] | None = None) -> None:
        self._handlers: dict[str, Handler] = dict(handlers or {})

    def register(self, name: str, handler: Handler) -> None:
        if not asyncio.iscoroutinefunction(handler):
            raise TypeError(f"action handler {name!r} must be an async function")
        self._handlers[name] = handler

    def get(self, name: str) -> Handler | None:
        return self._handlers.get(name)

    def names(self) -> list[str]:
        return sorted(self._handlers)

    def load(self, spec: str) -> None:
        """Import handlers from ``CAMPAIGN_ACTIONS``: comma-separated ``module`` (its
        :func:`action` decorators register into the default registry) or ``module:attr``
        (an async function, registered under its name, or a mapping of names to them)."""
        for item in (s.strip() for s in spec.split(",")):
            if not item:
                continue
            module_name, _, attr = item.partition(":")
            try:
                module = importlib.import_module(module_name)
            except Exception as exc:
                raise ConfigError(
                    f"CAMPAIGN_ACTIONS: cannot import {module_name!r}: {exc}"
                ) from None
            if not attr:
                continue
            try:
                obj = getattr(module, attr)
            except AttributeError:
                raise ConfigError(f"CAMPAIGN_ACTIONS: {module_name!r} has no {attr!r}") from None
            if isinstance(obj, Mapping):
                for name, handler in obj.items():
                    self._register_checked(str(name), handler)
            else:
                self._register_checked(getattr(obj, "__name__", attr), obj)
        for name, handler in _decorated.items():
            self._handlers.setdefault(name, handler)

    def _register_checked(self, name: str, handler: Any) -> None:
        try:
            self.register(name, handler)
        except TypeError as exc:
            raise ConfigError(f"CAMPAIGN_ACTIONS: {exc}") from None


_decorated: dict[str, Handler] = {}


def action(name: str) -> Callable[[Handler], Handler]:
    """Decorator registering a handler under ``name`` when its module is imported."""

    def decorate(fn: Handler) -> Handler:
        if not asyncio.iscoroutinefunction(fn):
            raise TypeError(f"action handler {name!r} must be an async function")
        _decorated[name] = fn
        return fn

    return decorate


def _without_query(url: str) -> str:
    """The URL without query or credentials: either may carry secrets."""
    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


async def http_action(ctx: ActionContext) -> str | None:
    """POST the step as JSON to ``params.url`` with its ``Idempotency-Key``.

    2xx succeeds (an ``{"outcome": ...}`` body picks the branch); 408, 429 and 5xx,
    timeouts and network errors are transient (``Retry-After`` honoured); other 4xx are
    permanent.
    """
    url = ctx.params.get("url")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise PermanentError("http action needs params.url, an http(s) URL")
    if ctx.http is None:
        raise PermanentError("http action has no client session")
    body = orjson.dumps(
        {
            "enrollment_id": ctx.enrollment_id,
            "campaign_id": ctx.campaign_id,
            "contact_id": ctx.contact_id,
            "node": ctx.node,
            "step": ctx.step,
            "attempt": ctx.attempt,
            "attributes": ctx.attributes,
            "params": {k: v for k, v in ctx.params.items() if k != "url"},
            "event": ctx.event,
        }
    )
    headers = {"Content-Type": "application/json", "Idempotency-Key": ctx.idempotency_key}
    if ctx.secret:
        digest = hmac.new(ctx.secret, body, hashlib.sha256).hexdigest()
        headers[SIGNATURE_HEADER] = f"sha256={digest}"
    parts = urlsplit(url)
    safe_url = _without_query(url)  # messages end up in logs, history and errors
    with tracer.start_as_current_span(
        "POST", kind=SpanKind.CLIENT,
        attributes={"http.request.method": "POST", "url.full": safe_url,
                    "server.address": parts.hostname or "",
                    "server.port": parts.port or (443 if parts.scheme == "https" else 80)},
        record_exception=False, set_status_on_exception=False,
    ) as span:  # fmt: skip
        propagate.inject(headers)  # the downstream service can continue the trace
        try:
            async with ctx.http.post(
                url, data=body, headers=headers, timeout=aiohttp.ClientTimeout(total=ctx.timeout)
            ) as resp:
                text = await resp.text()
                status = resp.status
                retry_after = _retry_after(resp.headers.get("Retry-After"))
        except TimeoutError:
            span.set_attribute("error.type", "timeout")
            span.set_status(Status(StatusCode.ERROR, "timeout"))
            raise TransientError(f"POST {safe_url} timed out after {ctx.timeout:g}s") from None
        except aiohttp.InvalidURL as exc:
            span.set_attribute("error.type", type(exc).__name__)
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            raise PermanentError(f"POST {safe_url}: invalid URL") from None
        except aiohttp.ClientError as exc:
            # The exception's text may hold the raw URL (credentials, query): name its type only.
            span.set_attribute("error.type", type(exc).__name__)
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            raise TransientError(f"POST {safe_url} failed: {type(exc).__name__}") from None
        span.set_attribute("http.response.status_code", status)
        if status >= 400:
            span.set_attribute("error.type", str(status))
            span.set_status(Status(StatusCode.ERROR, f"HTTP {status}"))
    if 200 <= status < 300:
        if text:
            try:
                doc = orjson.loads(text)
            except orjson.JSONDecodeError:
                return None
            if isinstance(doc, dict) and isinstance(doc.get("outcome"), str):
                return str(doc["outcome"])
        return None
    snippet = text[:200]
    if status in (408, 429) or status >= 500:
        raise TransientError(
            f"POST {safe_url} answered HTTP {status}: {snippet}", retry_after=retry_after
        )
    raise PermanentError(f"POST {safe_url} answered HTTP {status}: {snippet}")


async def log_action(ctx: ActionContext) -> str | None:
    """Log the step (names only: param and attribute values may be secrets or personal data)."""
    log.info(
        "log action",
        extra={"param_names": sorted(ctx.params), "attribute_names": sorted(ctx.attributes)},
    )
    outcome = ctx.params.get("outcome")
    return outcome if isinstance(outcome, str) else None


def default_registry(spec: str = "") -> ActionRegistry:
    """The built-in handlers plus those named by ``spec`` (``CAMPAIGN_ACTIONS``)."""
    registry = ActionRegistry({"http": http_action, "log": log_action})
    registry.load(spec)
    return registry
