"""Settings: every variable documented, bad values named, secrets never echoed."""

from __future__ import annotations

import pytest

from app.settings import ConfigError, Settings, redact_url
from tests.conftest import ROOT


def _env_name(field: str) -> str:
    return "REDIS_URL" if field == "redis_url" else f"CAMPAIGN_{field.upper()}"


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
        ("REDIS_URL", "notaurl", "redis://, rediss:// or unix://"),
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
