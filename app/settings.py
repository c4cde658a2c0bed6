"""Configuration from the environment: one place for every setting.

``REDIS_URL`` and the project's own ``CAMPAIGN_*`` variables are read here; the
standard ``OTEL_*`` variables are read by the OpenTelemetry SDK itself.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from functools import lru_cache
from typing import Literal
from urllib.parse import parse_qsl, unquote, unquote_plus, urlsplit

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = [
    "ConfigError",
    "SentinelURL",
    "Settings",
    "get_settings",
    "parse_api_tokens",
    "parse_sentinel_url",
]


class ConfigError(Exception):
    """A setting has a bad value; the message names the variable and never echoes secrets."""


#: The highest ``CAMPAIGN_MAX_DURATION`` (10 years); run-time caps rely on it.
MAX_DURATION_CEILING = timedelta(days=3650)

#: Seconds between reconciler passes that divide a minute or an hour.
RECONCILE_EVERY_ALLOWED: tuple[int, ...] = tuple(
    [n for n in range(1, 61) if 60 % n == 0] + [n for n in range(120, 3601, 60) if 3600 % n == 0]
)


class Settings(BaseSettings):
    """Every setting of the client and the worker, with its default."""

    model_config = SettingsConfigDict(env_prefix="CAMPAIGN_", extra="ignore", frozen=True)

    redis_url: SecretStr = Field(
        default=SecretStr("redis://localhost:6379/0"),
        validation_alias=AliasChoices("REDIS_URL", "CAMPAIGN_REDIS_URL"),
        description="Redis to use: redis://[user:pass@]host:port/db, rediss:// for TLS, "
        "unix:///path/to/redis.sock?db=N",
    )
    key_prefix: str = Field(
        default="campaign", min_length=1, description="Prefix of every key this service writes"
    )
    queue_name: str = Field(
        default="",
        description="arq's own queue (maintenance jobs such as ping and the reconciler); "
        "default <prefix>:{arq:abort}; on Redis Cluster it must hold the hash tag {arq:abort}",
    )
    max_jobs: int = Field(default=50, gt=0, le=10_000, description="Jobs one worker runs at once")
    job_timeout: float = Field(
        default=60.0,
        gt=0,
        le=86_400,
        allow_inf_nan=False,
        description="Seconds one job may take, at most 86400 (its handler gets at most 80 %); "
        "a step past it is cut off and re-runs as a new attempt when its lease expires",
    )
    max_tries: int = Field(
        default=20,
        gt=0,
        le=1000,
        description="Starts of one of arq's own maintenance jobs (ping, reconciler) before arq "
        "drops it, 1 to 1000",
    )
    keep_result: float = Field(
        default=0.0,
        ge=0,
        le=30 * 86_400,
        allow_inf_nan=False,
        description="Seconds arq keeps a maintenance job's result, at most 2592000 (30 days; "
        "campaign state lives in the enrollment)",
    )
    poll_delay: float = Field(
        default=0.05,
        gt=0,
        le=5,
        allow_inf_nan=False,
        description="Longest sleep of the step loop when nothing is due sooner (bounds how late a "
        "step enqueued by another process starts), at most 5",
    )
    job_expiry_extra: float = Field(
        default=7 * 86_400.0,
        ge=60,
        le=366 * 86_400,
        allow_inf_nan=False,
        description="Seconds an arq maintenance job key outlives its due time, 60 to 31622400 "
        "(366 days); campaign jobs have no expiry",
    )
    http_host: str = Field(default="0.0.0.0", description="Health and metrics server address")  # noqa: S104
    http_port: int = Field(
        default=8080, ge=0, le=65535, description="Health and metrics server port"
    )
    shutdown_grace: float = Field(
        default=20.0,
        ge=0,
        le=3600,
        allow_inf_nan=False,
        description="Seconds running jobs get to finish after SIGTERM, at most 3600",
    )
    redis_backoff_max: float = Field(
        default=2.0,
        ge=0.1,
        le=300,
        allow_inf_nan=False,
        description="Cap of the reconnect backoff in seconds",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Log level"
    )
    log_format: Literal["auto", "json", "text"] = Field(
        default="auto", description="json lines, text, or auto (text on a terminal)"
    )
    history_limit: int = Field(
        default=100,
        gt=0,
        le=10_000,
        description="History entries kept per enrollment, 1 to 10000",
    )
    max_steps: int = Field(
        default=1000,
        gt=0,
        le=1_000_000,
        description="Steps one enrollment may take before it is failed, 1 to 1000000",
    )
    actions: str = Field(
        default="",
        description="Comma-separated import paths of modules or objects that register action handlers",
    )
    http_action_timeout: float = Field(
        default=10.0,
        gt=0,
        le=3600,
        allow_inf_nan=False,
        description="Default seconds for an http action call, at most 3600",
    )
    http_action_secret: SecretStr | None = Field(
        default=None,
        description="When set, http actions carry an HMAC-SHA256 signature header; "
        "set but empty is an error",
    )
    http_allowed_hosts: str = Field(
        default="",
        description="Comma-separated hosts the http action may call (names, *.example.com, "
        "CIDRs); empty: any host except link-local and metadata addresses",
    )
    http_max_response_bytes: int = Field(
        default=1_048_576,
        ge=1024,
        le=104_857_600,
        description="Bytes of an http action's response read at most",
    )
    lease: float = Field(
        default=10.0,
        ge=1,
        le=300,
        allow_inf_nan=False,
        description="Seconds a running step's lease lasts; a step whose worker died is re-run "
        "after this (renewed every lease/3 while it runs)",
    )
    reconcile_every: int = Field(
        default=60,
        description="Seconds between reconciler passes (re-creates missing jobs); must divide "
        "a minute or an hour",
    )
    shards: int = Field(
        default=1,
        ge=1,
        le=1024,
        description="Hash-tag shards of the keyspace (Redis Cluster); the first worker records it "
        "in Redis, and a worker started with another count exits 2",
    )

    max_attributes_bytes: int = Field(
        default=65_536,
        ge=2,
        le=16_777_216,
        description="Bytes of JSON one enrollment's attributes may take, 2 to 16777216",
    )
    max_payload_bytes: int = Field(
        default=65_536,
        ge=2,
        le=16_777_216,
        description="Bytes of JSON one signal's payload may take, 2 to 16777216",
    )
    max_definition_bytes: int = Field(
        default=1_048_576,
        ge=1024,
        le=67_108_864,
        description="Bytes of JSON one campaign definition may take, 1024 to 67108864",
    )
    max_nodes: int = Field(
        default=10_000, ge=1, le=100_000, description="Nodes one campaign may have, 1 to 100000"
    )
    max_name_length: int = Field(
        default=128,
        ge=16,
        le=1024,
        description="Characters of a campaign id, node, event, action or outcome name, 16 to 1024",
    )
    max_reason_length: int = Field(
        default=1000,
        ge=16,
        le=65_536,
        description="Characters of a cancel reason, 16 to 65536",
    )
    max_duration: timedelta = Field(
        default=timedelta(days=3650),
        description="Longest delay, wait, retry delay or action timeout (ISO 8601 or seconds), "
        "from PT1M to P3650D (10 years); a business-time delay or wait must also end within it",
    )
    retention: timedelta | None = Field(
        default=None,
        description="Finished enrollments (completed, failed, cancelled) older than this (ISO 8601 "
        "duration, e.g. P30D, or seconds) are deleted with their history by a periodic job; "
        "unset keeps them",
    )
    sentry_dsn: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("SENTRY_DSN", "CAMPAIGN_SENTRY_DSN"),
        description="When set, failed steps are reported to Sentry (needs the sentry extra)",
    )
    metrics_max_campaigns: int = Field(
        default=100,
        ge=0,
        le=100_000,
        description="Campaigns that get their own campaign_enrollments series on /metrics (most "
        'active first); the others are summed under campaign="_other"',
    )

    api_host: str = Field(
        default="127.0.0.1", description="Control API and console address (campaign-worker api)"
    )
    api_port: int = Field(default=8000, ge=0, le=65535, description="Control API and console port")
    api_tokens: SecretStr | None = Field(
        default=None,
        description="Comma-separated bearer tokens of the control API and console (at least 16 "
        "characters each); a token written ro:TOKEN may only read. campaign-worker api refuses "
        "to start without one",
    )
    trace_url: str = Field(
        default="",
        description="Link from the console to a trace, with {trace_id} in it (e.g. "
        "http://jaeger:16686/trace/{trace_id}); empty: no link",
    )

    @field_validator("max_duration", "retention", mode="before")
    @classmethod
    def _duration_seconds(cls, value: object) -> object:
        # From the environment "86400" means seconds, as in campaign definitions.
        if isinstance(value, str) and re.fullmatch(r"\s*\d{1,12}(\.\d{1,9})?\s*", value):
            return float(value)
        return value

    @field_validator("max_duration")
    @classmethod
    def _check_max_duration(cls, value: timedelta) -> timedelta:
        if not timedelta(minutes=1) <= value <= MAX_DURATION_CEILING:
            raise ValueError("must be from PT1M (60 seconds) to P3650D (10 years)")
        return value

    @field_validator("retention")
    @classmethod
    def _check_retention(cls, value: timedelta | None) -> timedelta | None:
        if value is not None and not timedelta(minutes=1) <= value <= MAX_DURATION_CEILING:
            raise ValueError("must be from PT1M (60 seconds) to P3650D (10 years)")
        return value

    @field_validator("sentry_dsn", mode="before")
    @classmethod
    def _empty_dsn_is_unset(cls, value: object) -> object:
        # SENTRY_DSN= (empty) is how sentry-sdk itself reads "off".
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("key_prefix")
    @classmethod
    def _check_key_prefix(cls, value: str) -> str:
        if any(ch in "{}" or ch.isspace() for ch in value):
            raise ValueError("must not contain '{', '}' or whitespace")
        return value

    @field_validator("reconcile_every")
    @classmethod
    def _check_reconcile_every(cls, value: int) -> int:
        if value not in RECONCILE_EVERY_ALLOWED:
            allowed = ", ".join(str(n) for n in RECONCILE_EVERY_ALLOWED)
            raise ValueError(f"must divide a minute or an hour, one of {allowed}")
        return value

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: SecretStr) -> SecretStr:
        check_redis_url(value.get_secret_value())
        return value

    @field_validator("http_action_secret")
    @classmethod
    def _check_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip():
            raise ValueError("is set but empty; unset it to send http actions unsigned")
        return value

    @field_validator("http_allowed_hosts")
    @classmethod
    def _check_allowed_hosts(cls, value: str) -> str:
        for entry in (e.strip() for e in value.split(",")):
            if entry and not _is_host_pattern(entry):
                raise ValueError(
                    f"entry {entry[:80]!r} is not a host name, *.domain, IP address or CIDR"
                )
        return value

    @field_validator("api_tokens")
    @classmethod
    def _check_api_tokens(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            parse_api_tokens(value.get_secret_value())
        return value

    @field_validator("trace_url")
    @classmethod
    def _check_trace_url(cls, value: str) -> str:
        if value and ("{trace_id}" not in value or not re.match(r"https?://[^\s]+$", value)):
            raise ValueError("must be an http(s) URL with {trace_id} in it")
        return value

    @field_validator("http_host", "api_host")
    @classmethod
    def _check_http_host(cls, value: str) -> str:
        if value == "" or _is_ip(value) or _HOST_NAME.fullmatch(value):
            return value
        raise ValueError("must be an IP address or a host name")

    @classmethod
    def load(cls, **overrides: object) -> Settings:
        """Read the environment; raise :class:`ConfigError` naming the bad variable."""
        try:
            return cls(**overrides)  # type: ignore[arg-type]
        except ValidationError as exc:
            raise ConfigError(describe_validation_error(exc)) from None

    @property
    def arq_queue(self) -> str:
        """arq's own queue: ``queue_name`` when set, else ``<key_prefix>:{arq:abort}``.

        The hash tag keeps every key arq touches in one Redis Cluster slot, so that its
        transactions never span slots: our job ids on arq's queue (ping, cron) start with the
        queue name, so its job, result and in-progress keys carry the tag; and the tag is
        the name of arq's one fixed key, ``arq:abort`` (which arq's ``finish_job`` writes),
        so that key hashes to the same slot."""
        return self.queue_name or f"{self.key_prefix}:{{arq:abort}}"

    def arq_job_id(self, name: str) -> str:
        """An id for one of our jobs on arq's queue (it shares the queue's hash tag)."""
        return f"{self.arq_queue}:{name}"

    def redacted_redis_url(self) -> str:
        """The Redis URL with any password replaced, safe for logs."""
        return redact_url(self.redis_url.get_secret_value())


#: Shortest API token accepted: a guessable token is no protection.
MIN_TOKEN_LENGTH = 16
#: Longest API token accepted (worker.api.auth refuses longer ones unread).
MAX_TOKEN_LENGTH = 4096


def parse_api_tokens(text: str) -> dict[str, bool]:
    """``CAMPAIGN_API_TOKENS`` as ``{token: may_write}``; a token too short or with a
    character that cannot travel in a header is a ValueError that does not echo it."""
    tokens: dict[str, bool] = {}
    for number, entry in enumerate((e.strip() for e in text.split(",")), 1):
        if not entry:
            continue
        read_only = entry.startswith("ro:")
        token = entry.removeprefix("ro:")
        if len(token) < MIN_TOKEN_LENGTH:
            raise ValueError(
                f"token {number} is shorter than {MIN_TOKEN_LENGTH} characters "
                "(make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))')"
            )
        if len(token) > MAX_TOKEN_LENGTH:
            raise ValueError(f"token {number} is longer than {MAX_TOKEN_LENGTH} characters")
        if not re.fullmatch(r"[A-Za-z0-9._~+/=-]+", token):
            raise ValueError(
                f"token {number} has a character other than letters, digits and ._~+/=-"
            )
        tokens[token] = tokens.get(token, False) or not read_only
    return tokens


#: Query parameters of a Redis URL whose values are secret (matched in lower case).
_SECRET_PARAM = re.compile(r"pass|pwd|secret|token|auth|credential")


def redact_url(url: str) -> str:
    """The URL with its password (userinfo) and secret-looking query parameters as ``***``.

    Safe for logs and error messages: also a URL that does not parse is never echoed.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    netloc = parts.netloc
    userinfo, at, hostport = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.partition(':')[0]}:***@{hostport}"
    rest = url[len(parts.scheme) + 1 :] if parts.scheme else url
    out = f"{parts.scheme}:" if parts.scheme else ""
    if netloc or rest.startswith("//"):
        out += f"//{netloc}"  # kept for unix:///path (urlunsplit would drop the "//")
    out += parts.path
    if parts.query:
        out += f"?{_redact_params(parts.query)}"
    if parts.fragment:
        out += f"#{_redact_params(parts.fragment)}"
    return out


def _redact_params(text: str) -> str:
    if not text:
        return text
    out = []
    for item in text.split("&"):
        name, eq, _value = item.partition("=")
        if eq and _SECRET_PARAM.search(unquote_plus(name).lower()):
            item = f"{name}=***"
        out.append(item)
    return "&".join(out)


_HOST_NAME = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"
)


def _is_host_pattern(entry: str) -> bool:
    """A host name, ``*.`` and a domain, an IP address or a CIDR block."""
    try:
        ipaddress.ip_network(entry, strict=False)
    except ValueError:
        name = entry.removeprefix("*.")
        return "*" not in name and _HOST_NAME.fullmatch(name) is not None
    return True


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _positive_seconds(text: str) -> None:
    value = float(text)
    if not (math.isfinite(value) and 0 < value <= 3600):
        raise ValueError("must be seconds above 0 and at most 3600")


def _int_between(low: int, high: int) -> Callable[[str], None]:
    def check(text: str) -> None:
        if not text.strip().isdigit() or not low <= int(text) <= high:
            raise ValueError(f"must be a whole number from {low} to {high}")

    return check


def _one_of(*choices: str) -> Callable[[str], None]:
    def check(text: str) -> None:
        if text.lower() not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")

    return check


def _any(_text: str) -> None:
    return None


_MAX_DB = 1_000_000
_COMMON_PARAMS: dict[str, Callable[[str], None]] = {
    "db": _int_between(0, _MAX_DB),
    "username": _any,
    "password": _any,
    "client_name": _any,
    "socket_timeout": _positive_seconds,
    "socket_connect_timeout": _positive_seconds,
    "health_check_interval": _int_between(0, 3600),
    "max_connections": _int_between(1, 100_000),
    "retry_on_timeout": _any,
}
_TCP_PARAMS = {**_COMMON_PARAMS, "socket_keepalive": _any}
_TLS_PARAMS = {
    **_TCP_PARAMS,
    "ssl_keyfile": _any,
    "ssl_certfile": _any,
    "ssl_ca_certs": _any,
    "ssl_ciphers": _any,
    "ssl_check_hostname": _any,
    "ssl_cert_reqs": _one_of("none", "optional", "required"),
}
#: The query parameters each scheme accepts (what redis-py passes to that connection type).
REDIS_URL_PARAMS: dict[str, dict[str, Callable[[str], None]]] = {
    "redis": _TCP_PARAMS,
    "rediss": _TLS_PARAMS,
    "unix": _COMMON_PARAMS,
}


#: Sentinel URL schemes, and whether they use TLS.
SENTINEL_SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}
_SENTINEL_PARAMS: dict[str, Callable[[str], None]] = {
    "socket_timeout": _positive_seconds,
    "socket_connect_timeout": _positive_seconds,
    "health_check_interval": _int_between(0, 3600),
    "client_name": _any,
    "sentinel_username": _any,
    "sentinel_password": _any,
}
_SENTINEL_TLS_PARAMS = {
    **_SENTINEL_PARAMS,
    "ssl_keyfile": _any,
    "ssl_certfile": _any,
    "ssl_ca_certs": _any,
    "ssl_cert_reqs": _one_of("none", "optional", "required"),
}


@dataclass(frozen=True)
class SentinelURL:
    """``redis+sentinel://[user:password@]host:port[,host:port...]/service[/db][?params]``:
    the sentinels to ask, the master's service name, and how to log in to the master
    (``rediss+sentinel://`` uses TLS for both)."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int
    username: str | None
    password: str | None
    tls: bool
    params: dict[str, str]


def parse_sentinel_url(raw: str) -> SentinelURL:
    """Parse a Sentinel URL; ``ValueError`` (never echoing the URL) says what is wrong."""
    parts = urlsplit(raw)
    tls = SENTINEL_SCHEMES[parts.scheme]
    userinfo, at, hostlist = parts.netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    sentinels = []
    for item in hostlist.split(","):
        host, colon, port = item.strip().rpartition(":")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(
                "must list sentinels as host:port[,host:port...] "
                "(redis+sentinel://host:26379,host2:26379/service/0)"
            )
        sentinels.append((host.strip("[]"), int(port)))
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2:
        raise ValueError("must name the master's service after the hosts (.../mymaster/0)")
    db = path[1] if len(path) == 2 else "0"
    if not (db.isdigit() and int(db) <= _MAX_DB):
        raise ValueError(f"database must be a number from 0 to {_MAX_DB}")
    allowed = _SENTINEL_TLS_PARAMS if tls else _SENTINEL_PARAMS
    params = _checked_query(parts.query, parts.scheme, allowed)
    return SentinelURL(tuple(sentinels), unquote(path[0]), int(db), username, password,
                       tls, params)  # fmt: skip


def check_redis_url(raw: str) -> None:
    """Raise ``ValueError`` (never echoing the URL) unless redis-py can use ``raw``."""
    try:
        scheme = urlsplit(raw).scheme
    except ValueError:
        raise ValueError("has a bad port or host") from None
    if scheme in SENTINEL_SCHEMES:
        parse_sentinel_url(raw)
        return
    try:
        parts = urlsplit(raw)
        _ = parts.port
    except ValueError:
        raise ValueError("has a bad port or host") from None
    if parts.scheme not in REDIS_URL_PARAMS:
        raise ValueError(
            "must be a redis://, rediss://, unix://, redis+sentinel:// or rediss+sentinel:// URL"
        )
    if parts.scheme == "unix":
        if not parts.path.strip("/"):
            raise ValueError("has no socket path (unix:///path/to/redis.sock)")
        if parts.hostname:
            raise ValueError("must not name a host (unix:///path/to/redis.sock)")
    else:
        if not parts.hostname:
            raise ValueError("has no host")
        db = parts.path.lstrip("/")
        if db and not (db.isdigit() and int(db) <= _MAX_DB):
            raise ValueError(f"database must be a number from 0 to {_MAX_DB}")
    _checked_query(parts.query, parts.scheme, REDIS_URL_PARAMS[parts.scheme])


def _checked_query(
    query: str, scheme: str, allowed: dict[str, Callable[[str], None]]
) -> dict[str, str]:
    """A URL's query parameters, each one known to ``scheme`` and valid (``ValueError``
    naming the parameter otherwise, never echoing its value)."""
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise ValueError("has a malformed query string") from None
    params: dict[str, str] = {}
    for name, value in pairs:
        check = allowed.get(name)
        if check is None:
            shown = repr(name) if re.fullmatch(r"[A-Za-z_]{1,40}", name) else "(unnamed)"
            raise ValueError(
                f"query parameter {shown} is not supported with {scheme}:// "
                f"(supported: {', '.join(sorted(allowed))})"
            )
        try:
            check(value)
        except ValueError as exc:
            message = str(exc) if str(exc).startswith("must") else "is not a valid value"
            raise ValueError(f"query parameter {name!r} {message}") from None
        params[name] = value
    return params


_SECRET_FIELDS = {"redis_url", "http_action_secret", "sentry_dsn", "api_tokens"}


def describe_validation_error(exc: ValidationError) -> str:
    """One line per bad variable: ``CAMPAIGN_MAX_JOBS: Input should be greater than 0 (got '-1')``."""
    lines = []
    for err in exc.errors():
        field = str(err["loc"][0]).lower().removeprefix("campaign_") if err["loc"] else "?"
        env = "REDIS_URL" if field == "redis_url" else f"CAMPAIGN_{field.upper()}"
        msg = err["msg"].removeprefix("Value error, ")
        if field in _SECRET_FIELDS:
            lines.append(f"{env}: {msg}")
        else:
            lines.append(f"{env}: {msg} (got {err.get('input')!r})")
    return "; ".join(lines)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings.load()
