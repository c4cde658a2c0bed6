"""``redis+sentinel://`` URLs: parsing, the errors that name what is wrong, redaction."""

from __future__ import annotations

import pytest

from app.settings import ConfigError, Settings, parse_sentinel_url, redact_url


def test_hosts_service_db_and_credentials() -> None:
    url = "redis+sentinel://app:p%2Bq+r%40s@s1:26379,s2:26380,[::1]:26381/my%20master/3"
    parsed = parse_sentinel_url(url)
    assert parsed.sentinels == (("s1", 26379), ("s2", 26380), ("::1", 26381))
    assert (parsed.service, parsed.db) == ("my master", 3)
    # as redis-py reads redis:// URLs: %XX decoded, a literal + kept
    assert (parsed.username, parsed.password) == ("app", "p+q+r@s")
    assert parsed.tls is False
    assert parse_sentinel_url("rediss+sentinel://h:1/m").tls is True
    assert parse_sentinel_url("redis+sentinel://h:1/m").db == 0


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+sentinel://h:26379", "must name the master's service"),
        ("redis+sentinel://h:26379/m/0/x", "must name the master's service"),
        ("redis+sentinel://h/m", "must list sentinels as host:port"),
        ("redis+sentinel://h:99999/m", "must list sentinels as host:port"),
        ("redis+sentinel://h:1/m/x", "database must be a number"),
        ("redis+sentinel://h:1/m?db=2", "query parameter 'db' is not supported"),
        ("redis+sentinel://h:1/m?socket_timeout=-1", "query parameter 'socket_timeout' must be"),
    ],
)
def test_bad_urls_are_named(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as caught:
        Settings.load(redis_url=url)
    assert "REDIS_URL" in str(caught.value)


def test_passwords_are_redacted() -> None:
    url = "redis+sentinel://app:secret@h1:26379,h2:26379/m/0?sentinel_password=other"
    shown = redact_url(url)
    assert "secret" not in shown and "other" not in shown
    assert shown == "redis+sentinel://app:***@h1:26379,h2:26379/m/0?sentinel_password=***"
