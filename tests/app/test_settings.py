"""Settings: every variable documented, bad values named, secrets never echoed."""

from __future__ import annotations

import pytest

from app.settings import ConfigError, Settings, redact_url
from tests.conftest import ROOT


def _env_name(field: str) -> str:
    return field.upper() if field in {"redis_url", "sentry_dsn"} else f"CAMPAIGN_{field.upper()}"


def test_every_setting_is_in_the_readme_table() -> None:
    readme = (ROOT / "README.md").read_text()
    rows = {
        line.split("|")[1].strip().strip("`")
        for line in readme.splitlines()
        if line.startswith("| `")
    }
    for field in Settings.model_fields:
        assert _env_name(field) in rows, (
            f"{_env_name(field)} is missing from the README settings table"
        )


@pytest.mark.parametrize(
    ("env", "value", "fragment"),
    [
        ("REDIS_URL", "notaurl", "redis://, rediss://, unix://, redis+sentinel://"),
        ("REDIS_URL", "redis://host:99999/0", "bad port"),
        ("REDIS_URL", "redis://host/abc", "database must be a number"),
        ("CAMPAIGN_MAX_JOBS", "0", "greater than 0"),
        ("CAMPAIGN_POLL_DELAY", "fast", "valid number"),
        ("CAMPAIGN_LOG_FORMAT", "xml", "'auto', 'json' or 'text'"),
        ("CAMPAIGN_HTTP_PORT", "70000", "less than or equal to 65535"),
    ],
)
def test_bad_values_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, fragment: str
) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError) as err:
        Settings.load()
    assert str(err.value).startswith(f"{env}: ") and fragment in str(err.value)


def test_secrets_are_not_echoed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "rediss://app:hunter2@redis.internal:notaport/0")
    with pytest.raises(ConfigError) as err:
        Settings.load()
    assert "hunter2" not in str(err.value)
    ok = Settings(redis_url="rediss://app:hunter2@redis.internal:6380/1")  # type: ignore[arg-type]
    assert "hunter2" not in repr(ok) and "hunter2" not in ok.redacted_redis_url()
    assert redact_url("redis://u:p@h:1/0") == "redis://u:***@h:1/0"
    assert redact_url("redis://h:1/0") == "redis://h:1/0"


def test_defaults_favour_low_latency() -> None:
    s = Settings()
    assert s.poll_delay <= 0.05  # arq's 0.5 s default makes deferred jobs late
    assert s.shutdown_grace < 30  # below Kubernetes' default termination grace period


# --- bounds: every numeric setting is finite and bounded (issue 10, item 3) ---------------

_NUMERIC = [
    name
    for name, info in Settings.model_fields.items()
    if info.annotation in (int, float) and name != "reconcile_every"
]


def _bounds(field: str) -> tuple[float | None, float | None]:
    low = high = None
    for meta in Settings.model_fields[field].metadata:
        low = getattr(meta, "ge", None) if getattr(meta, "ge", None) is not None else low
        low = getattr(meta, "gt", None) if getattr(meta, "gt", None) is not None else low
        high = getattr(meta, "le", None) if getattr(meta, "le", None) is not None else high
        high = getattr(meta, "lt", None) if getattr(meta, "lt", None) is not None else high
    return low, high


@pytest.mark.parametrize("field", _NUMERIC)
def test_every_numeric_setting_has_finite_bounds(field: str) -> None:
    low, high = _bounds(field)
    assert low is not None and high is not None, f"{field} needs both bounds"
    default = Settings.model_fields[field].default
    assert low <= default <= high


@pytest.mark.parametrize("field", _NUMERIC)
@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e300", "100000000000000000000"])
def test_numeric_settings_refuse_inf_nan_and_huge(
    monkeypatch: pytest.MonkeyPatch, field: str, value: str
) -> None:
    env = _env_name(field)
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError) as err:
        Settings.load()
    assert str(err.value).startswith(f"{env}: ") and "\n" not in str(err.value)


@pytest.mark.parametrize("field", [f for f in _NUMERIC if _bounds(f)[1] is not None])
def test_numeric_settings_refuse_just_past_the_upper_bound(
    monkeypatch: pytest.MonkeyPatch, field: str
) -> None:
    _low, high = _bounds(field)
    assert high is not None
    monkeypatch.setenv(_env_name(field), str(int(high) + 1))
    with pytest.raises(ConfigError, match=f"^{_env_name(field)}: .*less than or equal"):
        Settings.load()
    monkeypatch.setenv(_env_name(field), str(high if isinstance(high, float) else int(high)))
    assert Settings.load()


@pytest.mark.parametrize(
    ("env", "value", "fragment"),
    [
        ("CAMPAIGN_JOB_TIMEOUT", "inf", "finite number"),
        ("CAMPAIGN_JOB_TIMEOUT", "1e300", "less than or equal to 86400"),
        ("CAMPAIGN_KEEP_RESULT", "inf", "finite number"),
        ("CAMPAIGN_JOB_EXPIRY_EXTRA", "inf", "finite number"),
        ("CAMPAIGN_JOB_EXPIRY_EXTRA", "1e300", "less than or equal to 31622400"),
        ("CAMPAIGN_JOB_EXPIRY_EXTRA", "1", "greater than or equal to 60"),
        ("CAMPAIGN_HISTORY_LIMIT", "100000000000000000000", "less than or equal to 10000"),
        ("CAMPAIGN_LEASE", "0.5", "greater than or equal to 1"),
        ("CAMPAIGN_LEASE", "301", "less than or equal to 300"),
        ("CAMPAIGN_LEASE", "nan", "finite number"),
        ("CAMPAIGN_SHARDS", "0", "greater than or equal to 1"),
        ("CAMPAIGN_SHARDS", "1025", "less than or equal to 1024"),
        ("CAMPAIGN_HTTP_MAX_RESPONSE_BYTES", "1023", "greater than or equal to 1024"),
        ("CAMPAIGN_HTTP_MAX_RESPONSE_BYTES", "104857601", "less than or equal to 104857600"),
        ("CAMPAIGN_RECONCILE_EVERY", "7", "one of 1, 2, 3, 4, 5, 6, 10, 12, 15, 20, 30, 60, 120"),
        ("CAMPAIGN_RECONCILE_EVERY", "0", "must divide a minute or an hour"),
        ("CAMPAIGN_RECONCILE_EVERY", "7200", "must divide a minute or an hour"),
        ("CAMPAIGN_RECONCILE_EVERY", "90", "must divide a minute or an hour"),
        ("CAMPAIGN_KEY_PREFIX", "app{1}", "must not contain '{', '}' or whitespace"),
        ("CAMPAIGN_KEY_PREFIX", "my app", "must not contain '{', '}' or whitespace"),
        ("CAMPAIGN_KEY_PREFIX", "tab\there", "must not contain '{', '}' or whitespace"),
        ("CAMPAIGN_HTTP_HOST", "not a host", "IP address or a host name"),
        ("CAMPAIGN_HTTP_HOST", "http://x", "IP address or a host name"),
        ("CAMPAIGN_HTTP_HOST", "a" * 300, "IP address or a host name"),
        ("CAMPAIGN_HTTP_ALLOWED_HOSTS", "api.example.com, bad host", "entry 'bad host' is not"),
        ("CAMPAIGN_HTTP_ALLOWED_HOSTS", "http://api.example.com", "is not a host name"),
        ("CAMPAIGN_HTTP_ALLOWED_HOSTS", "10.0.0.0/33", "or CIDR"),
        ("CAMPAIGN_HTTP_ALLOWED_HOSTS", "*.*.example.com", "*.domain"),
        ("CAMPAIGN_HTTP_ALLOWED_HOSTS", "api*.example.com", "*.domain"),
    ],
)
def test_bounded_settings_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, fragment: str
) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError) as err:
        Settings.load()
    assert str(err.value).startswith(f"{env}: ") and fragment in str(err.value)


def test_reconcile_every_accepts_exactly_the_divisors_of_a_minute_or_an_hour() -> None:
    allowed = {
        n for n in range(1, 3601) if (n <= 60 and 60 % n == 0) or (n % 60 == 0 and 3600 % n == 0)
    }
    assert allowed == {1, 2, 3, 4, 5, 6, 10, 12, 15, 20, 30, 60, 120, 180, 240, 300, 360, 600,
                       720, 900, 1200, 1800, 3600}  # fmt: skip
    for n in range(0, 3700):
        if n in allowed:
            assert Settings.load(reconcile_every=n).reconcile_every == n
        else:
            with pytest.raises(ConfigError, match=r"^CAMPAIGN_RECONCILE_EVERY: must divide"):
                Settings.load(reconcile_every=n)


def test_new_settings_defaults() -> None:
    s = Settings()
    assert (s.lease, s.reconcile_every, s.shards) == (10.0, 60, 1)
    assert s.http_allowed_hosts == "" and s.http_max_response_bytes == 1_048_576
    assert s.redis_backoff_max == 2.0
    assert s.queue_name == "" and s.arq_queue == "campaign:{arq:abort}"
    assert Settings(key_prefix="acme").arq_queue == "acme:{arq:abort}"
    assert Settings(key_prefix="acme", queue_name="jobs").arq_queue == "jobs"
    assert Settings(http_host="::").http_host == "::"
    assert Settings(http_host="worker-1.internal").http_host == "worker-1.internal"
    hosts = "api.example.com, *.example.org,127.0.0.1 ,10.0.0.0/8,::1,fd00::/8,localhost,"
    assert Settings(http_allowed_hosts=hosts).http_allowed_hosts == hosts


@pytest.mark.parametrize("value", ["", " ", "\t\n"])
def test_an_empty_http_action_secret_is_an_error(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("CAMPAIGN_HTTP_ACTION_SECRET", value)
    with pytest.raises(ConfigError) as err:
        Settings.load()
    assert str(err.value) == (
        "CAMPAIGN_HTTP_ACTION_SECRET: is set but empty; unset it to send http actions unsigned"
    )
    monkeypatch.setenv("CAMPAIGN_HTTP_ACTION_SECRET", "k3y")
    secret = Settings.load().http_action_secret
    assert secret is not None and secret.get_secret_value() == "k3y"
    monkeypatch.delenv("CAMPAIGN_HTTP_ACTION_SECRET")
    assert Settings.load().http_action_secret is None


# --- REDIS_URL: schemes, query parameters, redaction (issue 10, items 4 and 5) -------------


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("unix://", "no socket path"),
        ("unix://host/tmp/redis.sock", "must not name a host"),
        (
            "unix:///tmp/r.sock?socket_keepalive=true",
            "'socket_keepalive' is not supported with unix://",
        ),
        ("redis://h:6379/0?ssl_ca_certs=/ca.crt", "'ssl_ca_certs' is not supported with redis://"),
        ("redis://h:6379/0?nosuch=1", "'nosuch' is not supported"),
        ("redis://h:6379/0?db=x", "'db' must be a whole number"),
        ("redis://h:6379/0?socket_timeout=inf", "'socket_timeout' must be seconds"),
        ("redis://h:6379/0?socket_timeout=nan", "'socket_timeout' must be seconds"),
        ("redis://h:6379/0?socket_connect_timeout=-1", "'socket_connect_timeout' must be seconds"),
        ("redis://h:6379/0?health_check_interval=1.5", "'health_check_interval' must be a whole"),
        ("redis://h:6379/0?max_connections=0", "'max_connections' must be a whole number"),
        ("rediss://h:6379/0?ssl_cert_reqs=maybe", "'ssl_cert_reqs' must be one of none"),
        ("redis://h:6379/0?novalue", "malformed query string"),
        ("redis://[::1/0", "bad port or host"),
        ("redis://h:6379/99999999999999999999", "database must be a number from 0 to"),
    ],
)
def test_redis_url_is_checked_before_redis_py_sees_it(
    monkeypatch: pytest.MonkeyPatch, url: str, fragment: str
) -> None:
    monkeypatch.setenv("REDIS_URL", url)
    with pytest.raises(ConfigError) as err:
        Settings.load()
    assert str(err.value).startswith("REDIS_URL: ") and fragment in str(err.value)


@pytest.mark.parametrize(
    "url",
    [
        "unix:///tmp/redis.sock",
        "unix:///tmp/redis.sock?db=3&password=pw",
        "unix://:pw@/tmp/redis.sock",
        "redis://h:6379/0?socket_timeout=2.5&health_check_interval=0&client_name=w1",
        "rediss://u:p@h:6380/1?ssl_ca_certs=/ca.crt&ssl_cert_reqs=required",
        "redis://[::1]:6379/0",
    ],
)
def test_good_redis_urls_pass(url: str) -> None:
    assert Settings.load(redis_url=url).redis_url.get_secret_value() == url


@pytest.mark.parametrize(
    "url",
    [
        "redis://h:6379/0?password=hunter2",
        "redis://h:6379/0?db=1&password=hunter2&client_name=w",
        "redis://:hunter2@h:6379/0",
        "redis://user:hunter2@h:6379/0?ssl_password=hunter2",
        "rediss://h:6379/0?auth_token=hunter2",
        "redis://h:6379/0?Secret=hunter2",
        "redis://h:6379/0?pass%77ord=hunter2",
        "unix://:hunter2@/tmp/redis.sock?password=hunter2",
        "redis://h:6379/0#password=hunter2",
    ],
)
def test_redact_url_hides_userinfo_and_query_secrets(url: str) -> None:
    redacted = redact_url(url)
    assert "hunter2" not in redacted and "***" in redacted


def test_redact_url_keeps_the_rest() -> None:
    assert redact_url("redis://h:6379/0?db=1&password=x&client_name=w") == (
        "redis://h:6379/0?db=1&password=***&client_name=w"
    )
    assert redact_url("redis://user:pw@h:6379/0") == "redis://user:***@h:6379/0"
    assert redact_url("redis://user@h:6379/0") == "redis://user@h:6379/0"
    assert redact_url("unix:///tmp/r.sock?db=2") == "unix:///tmp/r.sock?db=2"
    assert redact_url("redis://[::1/0?password=x") == "<unparseable URL>"


@pytest.mark.parametrize(
    "url",
    [
        "redis://h:notaport/0?password=hunter2",
        "redis://h:6379/0?password=hunter2&db=x",
        "redis://h:6379/0?password=hunter2&hunter2=1",
        "redis://h:6379/0?password=hunter2&x%3Dhunter2",
        "ftp://u:hunter2@h/0?password=hunter2",
        "unix://:hunter2@/tmp/r.sock?socket_keepalive=hunter2",
    ],
)
def test_redis_url_errors_never_echo_the_password(
    monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    monkeypatch.setenv("REDIS_URL", url)
    with pytest.raises(ConfigError) as err:
        Settings.load()
    assert str(err.value).startswith("REDIS_URL: ") and "hunter2" not in str(err.value)


def test_a_good_url_with_a_query_password_is_redacted_everywhere() -> None:
    s = Settings.load(redis_url="redis://h:6379/0?password=hunter2")
    assert s.redacted_redis_url() == "redis://h:6379/0?password=***"
    assert "hunter2" not in repr(s) and "hunter2" not in str(s.model_dump())


@pytest.mark.parametrize(
    ("tokens", "says"),
    [
        ("a" * 5000, "token 1 is longer than 4096 characters"),
        ("ok-token-0123456789, short", "token 2 is shorter than 16 characters"),
        ("ok-token-0123456789,to ken-0123456789abc", "token 2 has a character"),
    ],
)
def test_api_tokens_are_checked_without_being_echoed(tokens: str, says: str) -> None:
    with pytest.raises(ConfigError, match=f"^CAMPAIGN_API_TOKENS: {says}") as exc:
        Settings.load(api_tokens=tokens)
    assert "ok-token" not in str(exc.value) and "aaaa" not in str(exc.value)
