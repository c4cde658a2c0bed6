"""Action handlers: what an ``action`` node calls.

A handler is an async function taking an :class:`ActionContext` and returning an outcome
name (or None). It signals failures by raising :class:`TransientError` (retried per the
node's policy) or :class:`PermanentError` (fails the enrollment at once). Built in:
``http`` and ``log``; register more with :func:`action` in a module named by
``CAMPAIGN_ACTIONS``.

The ``http`` action's session comes from :func:`make_http_session`: its connector resolves
every host itself and applies the :class:`EgressPolicy` to each resolved address before
connecting to exactly those addresses (no second lookup), so link-local and cloud metadata
addresses, and hosts outside ``CAMPAIGN_HTTP_ALLOWED_HOSTS``, are never connected to.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import hmac
import importlib
import logging
import re
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from types import SimpleNamespace
from typing import Any
from urllib.parse import urljoin, urlsplit, urlunsplit

import aiohttp
import orjson
from aiohttp.abc import AbstractResolver, ResolveResult
from opentelemetry import propagate
from opentelemetry.trace import SpanKind, Status, StatusCode
from yarl import URL

from app.settings import ConfigError, Settings
from app.tracing import tracer

__all__ = [
    "ATTEMPT_HEADER",
    "SIGNATURE_HEADER",
    "ActionContext",
    "ActionRegistry",
    "EgressConnector",
    "EgressPolicy",
    "EgressRefused",
    "EgressResolver",
    "Handler",
    "PermanentError",
    "TransientError",
    "action",
    "default_registry",
    "egress_policy",
    "http_action",
    "http_session",
    "log_action",
    "make_http_session",
    "signature",
]

log = logging.getLogger("worker.actions")

SIGNATURE_HEADER = "X-Campaign-Signature"
ATTEMPT_HEADER = "X-Campaign-Attempt"
ALLOWED_HOSTS_VAR = "CAMPAIGN_HTTP_ALLOWED_HOSTS"
MAX_RESPONSE_VAR = "CAMPAIGN_HTTP_MAX_RESPONSE_BYTES"
DEFAULT_MAX_RESPONSE_BYTES = 1 << 20
_ERROR_BODY_BYTES = 8192  # of an error answer, only a snippet goes into the message
_SNIPPET_CHARS = 200


class TransientError(Exception):
    """A failure worth retrying; ``retry_after`` (seconds) is a floor for the next delay."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentError(Exception):
    """A failure that retrying cannot fix: the enrollment fails at once."""


class EgressRefused(PermanentError):
    """The egress policy refused a host before any connection to it was made."""


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


# --- egress policy ------------------------------------------------------------------------

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network

# Cloud instance metadata services (AWS, GCP, Azure, OpenStack, ECS tasks, Alibaba, Oracle).
_METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(
    ip_address(a)
    for a in ("169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200", "192.0.0.192")
)
_METADATA_HOSTS = frozenset(
    {"metadata", "metadata.google.internal", "metadata.goog", "instance-data",
     "instance-data.ec2.internal"}
)  # fmt: skip
_NAT64 = ip_network("64:ff9b::/96")
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")


def _normalize_host(host: str) -> str:
    return host.strip().rstrip(".").lower()


def _looks_like_ip(host: str) -> bool:
    """What aiohttp connects to without asking the resolver (see ``helpers.is_ip_address``)."""
    return ":" in host or host.replace(".", "").isdigit()


def _parse_ip(text: str) -> IPAddress | None:
    try:
        return ip_address(text.partition("%")[0])  # drop an IPv6 zone (fe80::1%eth0)
    except ValueError:
        return None


def _views(ip: IPAddress) -> list[IPAddress]:
    """The address and any IPv4 address embedded in it (mapped, 6to4, NAT64)."""
    views: list[IPAddress] = [ip]
    if isinstance(ip, IPv6Address):
        if ip.ipv4_mapped is not None:
            views.append(ip.ipv4_mapped)
        if ip.sixtofour is not None:
            views.append(ip.sixtofour)
        if ip in _NAT64:
            views.append(IPv4Address(int(ip) & 0xFFFFFFFF))
    return views


def _forbidden(ip: IPAddress) -> str | None:
    """Why no policy may allow ``ip``, or None."""
    for view in _views(ip):
        if view in _METADATA_ADDRESSES:
            return "a cloud metadata address"
        if view.is_link_local:
            return "a link-local address"
    return None


def _parse_allowed(spec: str) -> tuple[frozenset[str], tuple[str, ...], tuple[IPNetwork, ...]]:
    names: set[str] = set()
    suffixes: list[str] = []
    networks: list[IPNetwork] = []
    for raw in spec.split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        if "/" in entry or _looks_like_ip(entry):
            try:
                networks.append(ip_network(entry, strict=False))
            except ValueError:
                raise ConfigError(
                    f"{ALLOWED_HOSTS_VAR}: {entry[:100]!r} is not an IP address or CIDR"
                ) from None
            continue
        wildcard = entry.startswith("*.")
        name = entry[2:] if wildcard else entry
        try:
            name = name.rstrip(".").encode("idna").decode("ascii")
        except UnicodeError:
            name = ""
        if not name or len(name) > 253 or not all(_LABEL.fullmatch(p) for p in name.split(".")):
            raise ConfigError(
                f"{ALLOWED_HOSTS_VAR}: {entry[:100]!r} is not a host name, *.suffix or CIDR"
            )
        if wildcard:
            suffixes.append("." + name)
        else:
            names.add(name)
    return frozenset(names), tuple(suffixes), tuple(networks)


@dataclass(frozen=True)
class EgressPolicy:
    """Where the ``http`` action may connect, and how much of an answer it reads.

    Link-local and cloud metadata addresses are always refused. With an allow-list, a host
    is called only when its name is listed, matches a ``*.suffix`` (subdomains only), or
    every address it resolves to lies in a listed CIDR.
    """

    names: frozenset[str] = frozenset()
    suffixes: tuple[str, ...] = ()
    networks: tuple[IPNetwork, ...] = ()
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES

    @classmethod
    def parse(
        cls, allowed_hosts: str = "", *, max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES
    ) -> EgressPolicy:
        """From ``CAMPAIGN_HTTP_ALLOWED_HOSTS`` syntax; a bad entry is a :class:`ConfigError`."""
        if max_response_bytes < 1:
            raise ConfigError(f"{MAX_RESPONSE_VAR} must be positive")
        names, suffixes, networks = _parse_allowed(allowed_hosts)
        return cls(names, suffixes, networks, max_response_bytes)

    @property
    def restricted(self) -> bool:
        return bool(self.names or self.suffixes or self.networks)

    def _name_allowed(self, name: str) -> bool:
        return name in self.names or any(name.endswith(s) for s in self.suffixes)

    def check_host(self, host: str) -> None:
        """Decide what needs no DNS: metadata host names and IP literals."""
        name = _normalize_host(host)
        if name in _METADATA_HOSTS:
            raise EgressRefused(f"host {name!r} is a cloud metadata host")
        if _looks_like_ip(name):
            self.check_addresses(name, [name])

    def check_addresses(self, host: str, addresses: Iterable[str]) -> None:
        """Decide on every address ``host`` resolved to; one refused address refuses all."""
        name = _normalize_host(host)
        named = self._name_allowed(name)
        seen = False
        for raw in addresses:
            seen = True
            ip = _parse_ip(raw)
            where = f"address {raw}" if raw == name else f"host {name!r} ({raw})"
            if ip is None:
                raise EgressRefused(f"{where} is not a valid IP address")
            reason = _forbidden(ip)
            if reason is not None:
                raise EgressRefused(f"{where} is {reason}")
            if self.restricted and not named and not any(ip in n for n in self.networks):
                raise EgressRefused(f"{where} is not in {ALLOWED_HOSTS_VAR}")
        if not seen:
            raise EgressRefused(f"host {name!r} resolved to no address")

    def check_url(self, url: URL) -> None:
        if url.raw_host is not None:
            self.check_host(url.raw_host)


def egress_policy(settings: Settings) -> EgressPolicy:
    """The policy the settings ask for (:class:`ConfigError` on a bad allow-list entry)."""
    return EgressPolicy.parse(
        settings.http_allowed_hosts, max_response_bytes=settings.http_max_response_bytes
    )


class EgressResolver(AbstractResolver):
    """Resolves with ``getaddrinfo`` and hands aiohttp only addresses the policy allows."""

    def __init__(self, policy: EgressPolicy) -> None:
        self.policy = policy

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.policy.check_host(host)  # a metadata name is not even looked up
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, port, type=socket.SOCK_STREAM, family=family, flags=socket.AI_ADDRCONFIG
        )
        results = [
            ResolveResult(
                hostname=host, host=str(addr[0]), port=int(addr[1]), family=fam, proto=proto,
                flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
            )
            for fam, _, proto, _, addr in infos
        ]  # fmt: skip
        self.policy.check_addresses(host, [r["host"] for r in results])
        return results  # aiohttp connects to these very addresses: no second lookup

    async def close(self) -> None:
        return None


class EgressConnector(aiohttp.TCPConnector):
    """A TCP connector whose every DNS answer passes ``policy`` before a connection."""

    def __init__(self, policy: EgressPolicy, **kwargs: Any) -> None:
        super().__init__(resolver=EgressResolver(policy), **kwargs)
        self.policy = policy


def _egress_trace(policy: EgressPolicy) -> aiohttp.TraceConfig:
    """Checks IP-literal URLs, which aiohttp connects to without its resolver, for any
    request on the session (user handlers too), including a followed redirect's target."""

    async def on_start(
        _: aiohttp.ClientSession, __: SimpleNamespace, params: aiohttp.TraceRequestStartParams
    ) -> None:
        policy.check_url(params.url)

    async def on_redirect(
        _: aiohttp.ClientSession, __: SimpleNamespace, params: aiohttp.TraceRequestRedirectParams
    ) -> None:
        location = params.response.headers.get("Location")
        if location:
            try:
                target = params.url.join(URL(location))
            except ValueError:
                raise EgressRefused("redirect to an invalid Location") from None
            policy.check_url(target)

    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(on_start)
    trace.on_request_redirect.append(on_redirect)
    return trace


def http_session(policy: EgressPolicy, *, limit: int = 100) -> aiohttp.ClientSession:
    """A client session that applies ``policy`` to every request made through it."""
    return aiohttp.ClientSession(
        connector=EgressConnector(policy, limit=limit),
        trace_configs=[_egress_trace(policy)],
        trust_env=False,  # a proxy would resolve hosts out of the policy's sight
    )


def make_http_session(settings: Settings) -> aiohttp.ClientSession:
    """The worker's shared session for actions (call inside the running loop)."""
    return http_session(egress_policy(settings), limit=max(settings.max_jobs, 10))


# --- the http action --------------------------------------------------------------------


def _without_query(url: str) -> str:
    """The URL without query or credentials: either may carry secrets."""
    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if ":" in netloc:
        netloc = f"[{netloc}]"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _location(base: str, location: str | None) -> str:
    if not location:
        return "no Location"
    try:
        return f"Location {_without_query(urljoin(base, location.strip()))[:300]}"
    except ValueError:
        return "an invalid Location"


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


def signature(secret: bytes, body: bytes, *, now: float | None = None) -> str:
    """``t=<unix seconds>,v1=<hex HMAC-SHA256 of "t.body">``."""
    if not secret:
        raise ConfigError("CAMPAIGN_HTTP_ACTION_SECRET is empty: set a secret or unset it")
    t = str(int(time.time() if now is None else now))
    mac = hmac.new(secret, t.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def _request_body(ctx: ActionContext) -> bytes:
    """The same bytes for every attempt of one idempotency key (no attempt, no clock)."""
    return orjson.dumps(
        {
            "enrollment_id": ctx.enrollment_id,
            "campaign_id": ctx.campaign_id,
            "contact_id": ctx.contact_id,
            "node": ctx.node,
            "step": ctx.step,
            "attributes": ctx.attributes,
            "params": {k: v for k, v in ctx.params.items() if k != "url"},
            "event": ctx.event,
        }
    )


async def _read_capped(content: aiohttp.StreamReader, cap: int) -> tuple[bytes, bool]:
    """Up to ``cap`` bytes of the body, and whether there was more."""
    buf = bytearray()
    while len(buf) <= cap:
        chunk = await content.read(cap + 1 - len(buf))
        if not chunk:
            return bytes(buf), False
        buf += chunk
    return bytes(buf[:cap]), True


def _may_hold_outcome(content_type: str | None) -> bool:
    if not content_type:
        return True
    media = content_type.partition(";")[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def _egress_session(
    session: aiohttp.ClientSession | None,
) -> tuple[aiohttp.ClientSession, EgressPolicy]:
    if session is None:
        raise PermanentError("http action has no client session")
    connector = session.connector
    if not isinstance(connector, EgressConnector):
        raise PermanentError(
            "http action's session applies no egress policy (create it with make_http_session)"
        )
    return session, connector.policy


async def http_action(ctx: ActionContext) -> str | None:
    """POST the step as JSON to ``params.url`` with its ``Idempotency-Key``.

    2xx succeeds (an ``{"outcome": ...}`` body picks the branch); 408, 429 and 5xx,
    timeouts and network errors are transient (``Retry-After`` honoured); 3xx (never
    followed), other 4xx, a refused host and a 2xx body past the cap are permanent.
    """
    url = ctx.params.get("url")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise PermanentError("http action needs params.url, an http(s) URL")
    session, policy = _egress_session(ctx.http)
    body = _request_body(ctx)
    headers = {
        "Content-Type": "application/json",
        "Idempotency-Key": ctx.idempotency_key,
        ATTEMPT_HEADER: str(ctx.attempt),
    }
    if ctx.secret is not None:
        headers[SIGNATURE_HEADER] = signature(ctx.secret, body)
    parts = urlsplit(url)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        safe_url = _without_query(url)  # messages end up in logs, history and errors
    except ValueError:
        raise PermanentError("http action: params.url is not a valid URL") from None
    cap = policy.max_response_bytes
    with tracer.start_as_current_span(
        "POST", kind=SpanKind.CLIENT,
        attributes={"http.request.method": "POST", "url.full": safe_url,
                    "server.address": parts.hostname or "", "server.port": port},
        record_exception=False, set_status_on_exception=False,
    ) as span:  # fmt: skip
        propagate.inject(headers)  # the downstream service can continue the trace
        try:
            try:
                policy.check_url(URL(url))
            except ValueError:
                raise aiohttp.InvalidURL(url) from None
            async with session.post(
                url,
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=ctx.timeout),
                allow_redirects=False,
            ) as resp:
                status = resp.status
                retry_after = _retry_after(resp.headers.get("Retry-After"))
                location = resp.headers.get("Location")
                content_type = resp.headers.get("Content-Type")
                if 300 <= status < 400:
                    data, over = b"", False
                elif 200 <= status < 300 and (resp.content_length or 0) > cap:
                    data, over = b"", True
                else:
                    limit = cap if 200 <= status < 300 else min(cap, _ERROR_BODY_BYTES)
                    data, over = await _read_capped(resp.content, limit)
                if over:
                    resp.close()  # drop the connection rather than drain the rest
        except EgressRefused as exc:
            span.set_attribute("error.type", "egress_refused")
            span.set_status(Status(StatusCode.ERROR, "egress refused"))
            raise EgressRefused(f"POST {safe_url} refused: {exc}") from None
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
        if status >= 300 or over:
            span.set_attribute("error.type", "response_too_large" if over else str(status))
            span.set_status(Status(StatusCode.ERROR, f"HTTP {status}"))
    if 200 <= status < 300:
        if over:
            if not _may_hold_outcome(content_type):
                return None  # a body that is not JSON holds no outcome: nothing is lost
            raise PermanentError(
                f"POST {safe_url} answered HTTP {status} with a body over {cap} bytes, "
                f"the limit ({MAX_RESPONSE_VAR})"
            )
        if data:
            try:
                doc = orjson.loads(data)
            except orjson.JSONDecodeError:
                return None
            if isinstance(doc, dict) and isinstance(doc.get("outcome"), str):
                return str(doc["outcome"])
        return None
    if 300 <= status < 400:
        raise PermanentError(
            f"POST {safe_url} answered HTTP {status} with {_location(url, location)}; "
            "redirects are not followed"
        )
    text = data.decode("utf-8", errors="replace")
    snippet = text[:_SNIPPET_CHARS] + ("..." if over or len(text) > _SNIPPET_CHARS else "")
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
