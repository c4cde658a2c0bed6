"""Configuration from the environment: one place for every setting.

``REDIS_URL`` and the project's own ``CAMPAIGN_*`` variables are read here; the
standard ``OTEL_*`` variables are read by the OpenTelemetry SDK itself.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["ConfigError", "Settings", "get_settings"]


class ConfigError(Exception):
    """A setting has a bad value; the message names the variable and never echoes secrets."""


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
        description="Redis to use: redis://[user:pass@]host:port/db, rediss:// for TLS, unix://",
    )
    key_prefix: str = Field(
        default="campaign", min_length=1, description="Prefix of every key this service writes"
    )
    queue_name: str = Field(
        default="",
        description="arq's own queue (maintenance jobs such as ping and the reconciler); "
        "default <prefix>:arq",
    )
    max_jobs: int = Field(default=50, gt=0, le=10_000, description="Jobs one worker runs at once")
    job_timeout: float = Field(
        default=60.0,
        gt=0,
        description="Seconds a job may take (a step past 95 % of it is re-run; its handler "
        "gets at most 80 %); a killed worker's job is re-run after this plus 10 s",
    )
    max_tries: int = Field(
        default=20,
        gt=0,
        description="arq-level starts of one job (crash re-runs) before it is dropped",
    )
    keep_result: float = Field(
        default=0.0,
        ge=0,
        description="Seconds arq keeps a job result (state lives in the enrollment)",
    )
    poll_delay: float = Field(
        default=0.05, gt=0, le=5, description="Seconds between queue polls (bounds lateness)"
    )
    job_expiry_extra: float = Field(
        default=7 * 86400.0,
        gt=0,
        description="Seconds a queued job key outlives its due time",
    )
    http_host: str = Field(default="0.0.0.0", description="Health and metrics server address")  # noqa: S104
    http_port: int = Field(
        default=8080, ge=0, le=65535, description="Health and metrics server port"
    )
    shutdown_grace: float = Field(
        default=20.0, ge=0, description="Seconds running jobs get to finish after SIGTERM"
    )
    redis_backoff_max: float = Field(
        default=2.0, gt=0, description="Cap of the reconnect backoff in seconds"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Log level"
    )
    log_format: Literal["auto", "json", "text"] = Field(
        default="auto", description="json lines, text, or auto (text on a terminal)"
    )
    history_limit: int = Field(default=100, gt=0, description="History entries kept per enrollment")
    max_steps: int = Field(
        default=1000, gt=0, description="Steps one enrollment may take before it is failed"
    )
    actions: str = Field(
        default="",
        description="Comma-separated import paths of modules or objects that register action handlers",
    )
    http_action_timeout: float = Field(
        default=10.0, gt=0, description="Default seconds for an http action call"
    )
    http_action_secret: SecretStr | None = Field(
        default=None, description="When set, http actions carry an HMAC-SHA256 signature header"
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
        description="Hash-tag shards of the keyspace (Redis Cluster); recorded in Redis at "
        "first start",
    )

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
        raw = value.get_secret_value()
        parts = urlsplit(raw)
        if parts.scheme not in {"redis", "rediss", "unix"}:
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        if parts.scheme != "unix" and not parts.hostname:
            raise ValueError("has no host")
        try:
            _ = parts.port
        except ValueError:
            raise ValueError("has a bad port") from None
        db = parts.path.lstrip("/")
        if parts.scheme != "unix" and db and not db.isdigit():
            raise ValueError("database must be a number")
        return value

    @classmethod
    def load(cls, **overrides: object) -> Settings:
        """Read the environment; raise :class:`ConfigError` naming the bad variable."""
        try:
            return cls(**overrides)  # type: ignore[arg-type]
        except ValidationError as exc:
            raise ConfigError(describe_validation_error(exc)) from None

    @property
    def arq_queue(self) -> str:
        """arq's own queue: ``queue_name`` when set, else ``<key_prefix>:arq``."""
        return self.queue_name or f"{self.key_prefix}:arq"

    def redacted_redis_url(self) -> str:
        """The Redis URL with any password replaced, safe for logs."""
        return redact_url(self.redis_url.get_secret_value())


def redact_url(url: str) -> str:
    """Replace the password of a URL with ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


_SECRET_FIELDS = {"redis_url", "http_action_secret"}


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
